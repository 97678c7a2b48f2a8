import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)

# The datasets library caches every file it loads (the tests' tiny SQuAD json files, under new temporary paths each
# run) in ~/.cache/huggingface/datasets: the suite's copies go to a directory of its own, removed at exit, not into
# the user's home. Set before any test module imports datasets (it reads the variable at import); stages the tests
# launch as subprocesses inherit it.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="tests_hf_datasets_")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)

# Tests taking the `device` fixture run on the CPU and, where one is present, on a CUDA GPU as well: the same
# invariants (exact equalities included) checked on the GPU code paths (Triton kernels, cuBLAS, no int8 matmul).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


# `make test` runs the suite on 2 pytest-xdist workers (-n 2 --dist loadgroup). Each test module stays on one worker,
# so its module fixtures (trained runs other tests reuse) are built once; the modules that launch 2-process runs share
# one worker, so that one launch runs at a time: two at once would each take twice as long on 2 cores, and the
# accelerate launcher's free-port pick could collide. Without xdist the marks do nothing.
LAUNCHING_MODULES = {"test_distributed", "test_vit_ddp", "test_wav2vec_pipeline"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker(pytest.mark.xdist_group("launches" if module in LAUNCHING_MODULES else module))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The stages take RUNS_DIR from the environment before a runs_dir= argument, and reproduce.py and make_results.py
# default to it: a user's own (exported in the shell) must not send test runs there.
os.environ.pop("RUNS_DIR", None)


@pytest.fixture(autouse=True)
def _runs_dir_env():
    """reproduce.main sets RUNS_DIR for its stages: unset after every test, so that no later test's stages
    resolve their run dirs through it."""
    yield
    os.environ.pop("RUNS_DIR", None)


def _listing(root: Path) -> dict:
    """<scale>/<pipeline>/<stage> dirs and their files, with their modification times."""
    paths = [*root.glob("*/*/*"), *root.glob("*/*/*/*")] if root.is_dir() else []
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(autouse=True, scope="session")
def _repo_runs_untouched():
    """The repository's runs/ (the developer's own runs) is the same after the suite as before it: a test that
    resolved its run dirs there would otherwise move, replace or delete them unseen."""
    before = _listing(ROOT / "runs")
    yield
    after = _listing(ROOT / "runs")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test suite changed {ROOT / 'runs'}: {changed[:5]}"


@pytest.fixture
def float_matmul():
    """Compressed linears multiply their fake-quantized operands in float32 (common.int_matmul off), for tests
    that compare against that formula exactly; restores the mode afterwards."""
    from common import int_matmul
    old = int_matmul.int_matmul_mode()
    int_matmul.set_int_matmul(False)
    yield
    int_matmul.set_int_matmul(old)


@pytest.fixture
def eager_quantizers():
    """common.kernels' quantizers run eagerly (COMMON_COMPILE=0): compiling them for the CPU would take most of a
    short test's time; restores the mode afterwards."""
    from common import kernels
    old = kernels.compile_mode()
    kernels.set_compile("0")
    yield
    kernels.set_compile(old)
