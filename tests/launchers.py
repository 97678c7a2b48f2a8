"""Commands that start 2 local processes of an entry point, as users launch the pipelines on several GPUs."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def two_processes(launch: str, module: bool = True, n: int = 2) -> list[str]:
    """The command prefix that starts n (2) processes with `torchrun` or `accelerate launch` (whose multi-GPU
    launcher is torchrun's; on a CPU machine the processes use gloo); module=True: the next argument is a module
    name, else a script path. Each launcher picks a free port itself: torchrun on one node without --master_port
    (its c10d rendezvous binds port 0, no race), accelerate with port 0 (it finds one and releases it before
    torchrun binds it: a small race, as a test-side free port had)."""
    if launch == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    elif launch == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--main_process_port", "0"]
    else:
        raise ValueError(launch)
    return cmd + (["-m"] if module else [])


def process_env() -> dict:
    """The environment of the launched processes: one thread each (2 cores), the repository importable, and the
    caller's PYTHONPATH kept after it (e.g. other library versions put in front of the venv's); unbuffered, so
    that two ranks' lines reach the shared pipe whole, and a failure's output ends where the rank stopped."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, PYTHONUNBUFFERED="1")


def launched(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run a launch command from the repository root with `process_env()`: its exit status and output (stdout and
    stderr). Past `timeout` s it kills the launcher and all its workers and fails the test."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        output, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers
        output, _ = p.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n" + output[-3000:])
    except BaseException:  # Ctrl-C, a CI cancel: the workers are in their own session and would outlive the test
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return p.returncode, output


def run_launched(cmd: list[str], timeout: float = 600) -> str:
    """`launched(cmd, timeout)`'s output; fails the test, with the output's end, on a non-zero exit."""
    rc, output = launched(cmd, timeout)
    assert rc == 0, output[-5000:]
    return output
