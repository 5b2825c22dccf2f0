"""Tiny data for the engine and algorithm tests, as SampleDataset items.

Images of one coloured square on a noisy background; a question about its
colour. SFT items carry the answer; preference items carry the correct colour
(chosen) and a wrong one (rejected). Batches come from the real collators
(tpo.data.collate), built by the engine from ``data.collator``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from tpo.registry import build_model, load_config

ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG = ROOT / "configs" / "mllm" / "timm_mlp_llama.py"
COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235), "yellow": (235, 220, 30),
}
QUESTION = "What colour is the shape?"


def colour_image(colour: str, rng: np.random.Generator, size: int = 32,
                 side: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [3, size, size]: a square of ``colour`` at a random place, on noise; its side is drawn in
    ``side`` (pixels, inclusive; by default half to three quarters of the image)."""
    img = rng.integers(0, 60, size=(size, size, 3))
    lo, hi = side or (size // 2, 3 * size // 4)
    side = int(rng.integers(lo, hi + 1))
    y, x = rng.integers(0, size - side + 1, size=2)
    rgb = np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3)
    img[y : y + side, x : x + side] = np.clip(rgb, 0, 255)
    return torch.from_numpy(img.astype(np.uint8).transpose(2, 0, 1).copy())


def qa_items(n: int, seed: int = 0, prefix: str = "qa") -> list[dict]:
    """Items as SampleDataset gives them: id, media, media_type, conversations, meta."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = names[int(rng.integers(len(names)))]
        answer = colour if rng.random() < 0.5 else f"The shape is {colour}."  # answers of several lengths
        out.append({
            "id": f"{prefix}-{i}", "media": colour_image(colour, rng), "media_type": "image",
            "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}],
            "preference": None, "meta": {"task": "qa", "answer": colour, "answer_type": "open",
                                         "question_type": "color"},
        })
    return out


def pair_items(n: int, seed: int = 0, prefix: str = "pair", side: tuple[int, int] | None = None) -> list[dict]:
    """Preference items as SampleDataset gives them: the correct colour is chosen, a wrong one rejected
    (``side``: the squares' sides, as :func:`colour_image` takes it)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = names[int(rng.integers(len(names)))]
        wrong = [c for c in names if c != colour]
        prompt = f"<image>\n{QUESTION}"
        out.append({
            "id": f"{prefix}-{i}", "media": colour_image(colour, rng, side=side), "media_type": "image",
            "conversations": [{"from": "human", "value": prompt}],
            "preference": {"prompt": prompt, "chosen": colour, "rejected": wrong[int(rng.integers(len(wrong)))],
                           "judge": "ground truth"},
            "meta": {"task": "preference"},
        })
    return out


def conversation_collator(proc, max_length: int = 128):
    """The real SFT collator (what the engine builds from ``data.collator``)."""
    from tpo.data.collate import ConversationCollator

    return ConversationCollator(proc, max_length=max_length)


def preference_collator(proc, max_length: int = 128):
    from tpo.data.collate import PreferenceCollator

    return PreferenceCollator(proc, max_length=max_length)


def model_config(**overrides) -> dict:
    cfg = load_config(MODEL_CONFIG).to_dict()["model"]
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def processor(model_cfg: dict | None = None):
    """The processor of a model of ``model_cfg`` (built apart; the processor
    depends on the config only)."""
    return build_model(copy.deepcopy(model_cfg or model_config())).processor


def train_config(work_dir, algorithm=None, model=None, **sections) -> dict:
    """A complete training config; ``sections`` update the defaults below."""
    cfg = {
        "work_dir": str(work_dir),
        "model": model or model_config(),
        "algorithm": algorithm or {"type": "SFT"},
        "train": {"batch_size": 4, "max_steps": 4, "seed": 0, "progress_bar": False, "tensorboard": False},
        "data": {"collator": {"max_length": 128}},
        "optim": {"lr": 3e-3},
        "schedule": {"type": "cosine", "warmup_steps": 1},
        "checkpoint": {"interval": None, "keep_last": 2, "save_final": False},
        "evaluation": {"interval": None, "at_end": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return cfg


def losses_of(work_dir) -> dict[int, float]:
    """``{step: loss}`` of the training records in ``metrics.jsonl``."""
    out = {}
    with open(Path(work_dir) / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            r = json.loads(line)
            if r["split"] == "train":
                out[r["step"]] = r["loss"]
    return out
