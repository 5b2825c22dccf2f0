"""Shared pieces of the RLAIF tests: a small synthetic benchmark (32x32
frames), a briefly fine-tuned SFT policy, AI-feedback pairs from it, and a
reward model trained on them, each built once per session through the real
engine and generation code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from rlaif_testkit import GEN_CONFIG, NUM_FRAMES, QUIET, RM_CONFIG, SFT_CONFIG, generation_options  # noqa: E402


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    from tpo.data import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num=60, seed=0, frames=4, size=32, splits=(0.6, 0.4, 0.0))
    return out


@pytest.fixture(scope="session")
def sft_checkpoint(synth, tmp_path_factory) -> str:
    from tpo.engine import train

    work = tmp_path_factory.mktemp("sft")
    report = train(SFT_CONFIG, work_dir=str(work), cfg_options={
        **QUIET, "model.num_frames": NUM_FRAMES, "data.train.ann_file": str(synth / "train.jsonl"),
        "data.val": None, "train.max_steps": 40, "optim.lr": 3e-3, "checkpoint.interval": None,
        "evaluation.metrics": [],
    })
    return report["final_checkpoint"]


@pytest.fixture(scope="session")
def pairs(synth, sft_checkpoint, tmp_path_factory) -> dict:
    """Preference files (train: 120 prompts, val: all) from the rule judge
    with the samples' descriptions as context; their summaries."""
    from tpo.rlaif import generate

    out = tmp_path_factory.mktemp("pairs")
    result = {}
    for split, limit in (("train", 120), ("val", None)):
        path = out / f"{split}.jsonl"
        summary = generate(GEN_CONFIG, cfg_options=generation_options(synth, sft_checkpoint, split, limit),
                           out=str(path), log=lambda msg: None)
        result[split] = (path, summary)
    return result


@pytest.fixture(scope="session")
def reward_run(pairs, sft_checkpoint, tmp_path_factory) -> dict:
    from tpo.engine import train

    work = tmp_path_factory.mktemp("reward")
    return train(RM_CONFIG, work_dir=str(work), cfg_options={
        **QUIET, "model.num_frames": NUM_FRAMES, "model.init_from": sft_checkpoint,
        "data.train.ann_file": str(pairs["train"][0]), "data.val.ann_file": str(pairs["val"][0]),
        "train.max_steps": 40, "train.batch_size": 8, "optim.lr": 1e-3, "evaluation.interval": None,
    })
