"""Assertions on finished run directories, shared by the pipeline tests."""
from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_weights(run_a: Path, run_b: Path) -> dict:
    """The two runs saved the same tensors, bit for bit (resume tests). Returns run_a's state dict."""
    a = load_file(str(Path(run_a) / "model.safetensors"))
    b = load_file(str(Path(run_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    return a


def assert_close_weights(a: dict, b: dict) -> None:
    """State dicts of runs that saw the same global batches in different process layouts: masks and signs bit for
    bit, every other tensor within float tolerance (the order of the reductions differs)."""
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith((".mask", ".signed")):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def with_scalar_clips(model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
    """A checkpoint as written before the clips became one-element tensors: the clips, and their optimizer state
    (momentum, Adam's moments; every one-element state but the step counter), 0-dim. For resume tests."""
    model_state = {k: v.reshape(()) if k.endswith((".lo", ".hi")) else v for k, v in model_state.items()}
    for st in optimizer_state["state"].values():
        for k, v in st.items():
            if k != "step" and torch.is_tensor(v) and v.shape == (1,):
                st[k] = v.reshape(())
    return model_state, optimizer_state
