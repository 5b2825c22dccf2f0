"""FSDP2 on two CPU processes (gloo), launched with `accelerate launch` and
an accelerate FSDP config: the same loss curve as one process with the same
global batch, an exact resume from accelerate's sharded checkpoint, and a
gathered ``model.safetensors`` that a one-process model loads.

accelerate (1.15) leaves CPU processes on DDP even with an FSDP config; the
trainer turns its FSDP2 path on (``tpo.engine.trainer._fsdp_on_cpu``), and
this test checks the model really is sharded: the root and both decoder
layers are ``fully_shard`` units, every parameter a DTensor; and that
generation at evaluation runs in step on both processes."""
from launch_testkit import launch_and_compare

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
"""


def test_fsdp_two_processes_match_one_and_resume(tmp_path):
    facts, final = launch_and_compare(tmp_path, FSDP_CONFIG)
    assert facts == {"distributed_type": "DistributedType.FSDP", "num_processes": 2, "fsdp_units": 3,
                     "dtensors": True, "synced_generation": True}
    assert (final / "pytorch_model_fsdp_0").is_dir() and (final / "optimizer_0").is_dir()  # accelerate's shards
