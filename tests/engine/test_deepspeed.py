"""DeepSpeed ZeRO-2 on two CPU processes (DeepSpeed's CPU accelerator, gloo),
launched with `accelerate launch` and an accelerate DeepSpeed config: the
same loss curve as one process with the same global batch, an exact resume
from DeepSpeed's checkpoint, and a gathered ``model.safetensors``.

Skipped without DeepSpeed (not a dependency: ``pip install deepspeed``
builds from source; its first run compiles a shared-memory op, minutes)."""
import importlib.util

import pytest
from launch_testkit import launch_and_compare

DEEPSPEED_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
use_cpu: false
deepspeed_config:
  zero_stage: 2
  gradient_clipping: auto
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero2_two_processes_match_one_and_resume(tmp_path):
    facts, final = launch_and_compare(tmp_path, DEEPSPEED_CONFIG)
    assert facts["distributed_type"] == "DistributedType.DEEPSPEED"
    assert (final / "pytorch_model").is_dir() and (final / "latest").is_file()  # DeepSpeed's own checkpoint
