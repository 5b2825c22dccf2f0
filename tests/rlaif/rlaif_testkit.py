"""Paths and option helpers of the RLAIF tests (imported by the tests and
the fixtures of conftest.py; pytest runs with --import-mode=importlib, which
puts no test folder on sys.path, so conftest.py adds this one)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MLLM_CONFIG = str(ROOT / "configs" / "mllm" / "timm_mlp_llama.py")
SFT_CONFIG = str(ROOT / "configs" / "rlaif" / "sft_timm_mlp_llama.py")
GEN_CONFIG = str(ROOT / "configs" / "rlaif" / "generate_rule_timm_mlp_llama.py")
RM_CONFIG = str(ROOT / "configs" / "rlaif" / "reward_timm_mlp_llama.py")
PPO_CONFIG = str(ROOT / "configs" / "rlaif" / "ppo_timm_mlp_llama.py")
QUIET = {"train.progress_bar": False, "train.tensorboard": False}
NUM_FRAMES = 2


def generation_options(synth: Path, checkpoint: str, split: str, limit=None, **extra) -> dict:
    return {"policy.config": MLLM_CONFIG, "policy.cfg_options": {"model.num_frames": NUM_FRAMES},
            "policy.checkpoint": checkpoint, "data.ann_file": str(synth / f"{split}.jsonl"), "data.limit": limit,
            "sampling.temperature": 1.8, "sampling.max_new_tokens": 6, **extra}


def reward_model_config(**overrides) -> dict:
    """The RewardModel of configs/rlaif/reward_*.py, without init_from, with
    ``overrides`` (dotted keys under ``model``)."""
    from tpo.registry import load_config

    options = {"model.init_from": None, "model.num_frames": NUM_FRAMES}
    options.update({f"model.{k}": v for k, v in overrides.items()})
    return load_config(RM_CONFIG, options).to_dict()["model"]


def policy_config(**overrides) -> dict:
    from tpo.registry import load_config

    options = {"model.num_frames": NUM_FRAMES, **{f"model.{k}": v for k, v in overrides.items()}}
    return load_config(MLLM_CONFIG, options).to_dict()["model"]


def save_weights(model, path) -> str:
    from safetensors.torch import save_model

    save_model(model, str(path))
    return str(path)


def run_torchrun(script: str, nproc: int = 2, timeout: float = 600) -> str:
    """Run ``script`` (a Python file) on ``nproc`` CPU processes with
    torchrun (gloo); returns the output, or fails the test with its tail."""
    import os
    import socket
    import subprocess
    import sys

    import pytest

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the Python interpreter")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           script]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout
