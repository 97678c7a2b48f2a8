"""The code users copy from the READMEs runs: common/README.md's "Ten lines on your own model" on a tiny BERT QA
saved where the snippet's path points."""
import re
from pathlib import Path

import torch

import common
from tiny_models import bert_batch, tiny_bert_qa

ROOT = Path(__file__).resolve().parents[1]


def _snippet(readme: Path, heading: str) -> str:
    text = readme.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_ten_lines_on_your_own_model(tmp_path, eager_quantizers):
    code = _snippet(ROOT / "common" / "README.md", "## Ten lines on your own model")
    assert '"path/to/your-finetuned-bert"' in code
    tiny_bert_qa().save_pretrained(tmp_path / "bert")
    batch = bert_batch()
    batch.update(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    scope = {"calib_batches": [bert_batch() for _ in range(2)], "batch": batch}
    exec(compile(code.replace("path/to/your-finetuned-bert", str(tmp_path / "bert")), "README snippet", "exec"),
         scope)
    model, loss = scope["model"], scope["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
    lin = common.compressed_linears(model)
    assert lin and all(isinstance(m, common.FrozenCompressedLinear) for m in lin.values()) and not model.training
