"""Fixtures of the data tests: one small synthetic benchmark rendered once, and
helpers that read it with numpy/Pillow alone."""
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from tpo.data.synth import synthesize


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """A benchmark of 30 scenes (seed 7): its folder, summary and samples per split."""
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, num=30, seed=7)
    samples = {}
    for split in ("train", "val", "test"):
        with open(out / f"{split}.jsonl", encoding="utf-8") as handle:
            samples[split] = [json.loads(line) for line in handle]
    return out, summary, samples


def load_frames(root, media: str) -> np.ndarray:
    """A sample's media as [T, H, W, 3] uint8, read without tpo."""
    path = os.path.join(root, media)
    if path.endswith(".npy"):
        return np.load(path)
    return np.asarray(Image.open(path).convert("RGB"))[None]


def color_mask(frames: np.ndarray, rgb) -> np.ndarray:
    """[T, H, W] bool: the pixels of exactly this colour."""
    return np.all(frames == np.asarray(rgb, dtype=np.uint8), axis=-1)


@pytest.fixture(scope="session")
def helpers():
    """``load_frames`` and ``color_mask`` (the test files run under importlib
    import mode, so they cannot import this conftest)."""
    return types.SimpleNamespace(load_frames=load_frames, color_mask=color_mask)
