"""`python fsdp_cpu_launch.py MODULE ARGS...` under torchrun: runs MODULE as __main__ with Accelerate's FSDP path
open to CPU processes. Test-only. Accelerate selects FSDP only for accelerator back-ends (MULTI_GPU, ...), so on a
CPU machine the HF Trainer would ignore train.fsdp and run plain DDP; this keeps the FSDP plugin the Trainer
built, so that its real FSDP2 code runs on gloo: accelerate's fully_shard wrapping, the full-state save, the
sharded checkpoint resume, evaluation. Nothing else is changed."""
import runpy
import sys

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__
_plugin = []


def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        _plugin[:] = [fsdp_plugin]
    # the state is shared and rebuilt (Trainer, TrainingArguments): keep FSDP on every rebuild, not just the first
    if _plugin and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


state.AcceleratorState.__init__ = _init_keeping_fsdp
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
