import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)

# Tests taking the `device` fixture run on the CPU and, where one is present, on a CUDA GPU as well: the same
# invariants (exact equalities included) checked on the GPU code paths (Triton kernels, cuBLAS, no int8 matmul).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _runs_dir_env():
    """reproduce.main sets RUNS_DIR for its stages: restored after every test, so that no later test's stages
    resolve their output dirs into the repository's runs/."""
    old = os.environ.get("RUNS_DIR")
    yield
    if old is None:
        os.environ.pop("RUNS_DIR", None)
    else:
        os.environ["RUNS_DIR"] = old


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
