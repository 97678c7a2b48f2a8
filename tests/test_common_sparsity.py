"""2:4 masks: correct, fixed, and held exactly through optimizer steps and quantization."""
import pytest
import torch

import common
from common.sparsity import check_nm, nm_mask


def test_nm_mask_keeps_largest_by_hand():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, -3.0, 1.0, 0.0]])
    assert torch.equal(nm_mask(w, 2, 4), torch.tensor([[False, True, True, False, True, True, False, False]]))
    assert nm_mask(torch.randn(8, 12), 1, 3).reshape(-1, 3).sum(1).eq(1).all()
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.randn(4, 6), 2, 4)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("recipe", [dict(), dict(w_bits=32, a_bits=32)])
def test_mask_fixed_through_50_steps(opt, recipe, device):
    model = common.prepare(_mlp(), common.Recipe(quantize_attention=False, skip=[], **recipe)).to(device)
    lins = list(common.compressed_linears(model).values())
    masks0 = [l.mask.clone() for l in lins]
    for l in lins:
        assert check_nm(l.mask) and check_nm(l.weight) and check_nm(l.effective_weight())
    o = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if opt == "adamw" else
         torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1))
    x, y = torch.randn(64, 16, device=device), torch.randn(64, 8, device=device)
    for _ in range(50):
        o.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        o.step()
    for l, m0 in zip(lins, masks0):
        assert torch.equal(l.mask, m0)
        assert l.weight[~l.mask].eq(0).all()  # stored weights stay pruned, not just the forward's copy
        assert l.effective_weight()[~l.mask].eq(0).all()
        assert check_nm(l.effective_weight())
        assert l.weight[l.mask].ne(0).any()  # and the kept weights did train


def test_pruned_weights_exactly_zero_after_quantization_only_on_zero_preserving_grid():
    torch.manual_seed(1)
    zp = common.prepare(_mlp(), common.Recipe(quantize_attention=False, skip=[]))
    plain = common.prepare(_mlp(), common.Recipe(quantize_attention=False, skip=[], zero_preserving=False))
    for l in common.compressed_linears(zp).values():
        w = l.effective_weight()
        assert w[~l.mask].eq(0).all() and w.unique().numel() <= 15
    for l in common.compressed_linears(plain).values():
        w = l.effective_weight()
        assert w[~l.mask].ne(0).all() and w.unique().numel() <= 16  # the plain grid silently undoes 2:4


def test_given_masks_are_used():
    lin = _mlp()
    masks = {"0": torch.ones(32, 16, dtype=torch.bool).tril(), "2": nm_mask(torch.randn(8, 32))}
    model = common.prepare(lin, common.Recipe(quantize_attention=False, skip=[]), masks=masks)
    assert torch.equal(model[0].mask, masks["0"]) and torch.equal(model[2].mask, masks["2"])
    assert common.masks_of(model.state_dict()).keys() == {"0", "2"}


def test_loading_dense_weights_keeps_the_stored_weight_pruned(float_matmul):
    # the forward uses the stored weight as it is, so every load must re-apply the mask
    model = common.prepare(_mlp(), common.Recipe(quantize_attention=False, skip=[]))
    dense = {k: (torch.randn_like(v) if k.endswith("weight") else v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    for l in common.compressed_linears(model).values():
        assert l.weight[~l.mask].eq(0).all() and l.weight[l.mask].ne(0).all()
    model.eval()
    x = torch.randn(4, 16)
    lin = model[0]
    expect = torch.nn.functional.linear(lin.input_quant(x), lin.effective_weight(), lin.bias)
    assert torch.equal(lin(x), expect)
