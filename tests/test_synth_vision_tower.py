"""benchmarks/synth_vision_tower.py: the targets it learns are the scene's truth, and the tower it
writes loads into a composition through the vision encoder's ``pretrained`` option."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from synth_vision_tower import IGNORE, MAX_OBJECTS, image_targets, train_tower
from tpo.registry import build_model

from tpo.data.synth import COLORS, REGIONS, SHAPES, make_scene, region_of


@pytest.mark.parametrize("index", range(6))
def test_image_targets_are_the_scene(index):
    scene = make_scene(index, 5, objects=(1, MAX_OBJECTS), image_fraction=1.0)
    grid, cell = 8, 8
    t = image_targets(scene, grid)
    n = len(scene.shapes)
    assert t["weights"].shape == (MAX_OBJECTS, grid * grid)
    for k, s in enumerate(scene.shapes):
        visible = scene.labels[0] == k + 1
        # each shape's weights: its share of its visible pixels in each cell, cell (r, c) at index r * grid + c
        per_cell = visible.reshape(grid, cell, grid, cell).sum((1, 3)).reshape(-1) / visible.sum()
        np.testing.assert_allclose(t["weights"][k], per_cell, rtol=1e-6)
        assert t["colour"][k] == list(COLORS).index(s.color) and t["shape"][k] == SHAPES.index(s.shape)
        assert REGIONS[t["region"][k]] == region_of(*s.centre(0), 64, 64)
    assert (t["weights"][n:] == 0).all() and (t["colour"][n:] == IGNORE).all() and (t["shape"][n:] == IGNORE).all()
    # a patch is coloured where a shape covers at least 8 of its 64 pixels, background elsewhere
    counts = np.stack([(scene.labels[0] == k + 1).reshape(grid, cell, grid, cell).sum((1, 3)).reshape(-1)
                       for k in range(n)])
    covered = (counts >= 8).any(0)
    assert ((t["patch_colour"] > 0) == covered).all()


def test_image_targets_refuse_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="7x7 grid"):
        image_targets(make_scene(0, 5, image_fraction=1.0), 7)


def test_the_tower_loads_through_the_pretrained_option(tmp_path):
    torch.set_num_threads(1)
    report = train_tower(tmp_path / "tower", steps=2, images=12, held_out=6, batch_size=4, log=lambda *_: None)
    assert json.loads((tmp_path / "tower" / "tower.json").read_text()) == report
    assert set(report["held_out_accuracy"]) == {"patch_colour", "colour", "shape", "region"}
    saved = load_file(str(tmp_path / "tower" / "model.safetensors"))
    options = report["cfg_options"]
    assert options["model.vision_encoder.pretrained"] == str((tmp_path / "tower" / "model.safetensors").resolve())
    model = build_model(str(ROOT / "configs" / "mllm" / "timm_mlp_llama.py"), cfg_options=options)
    loaded = model.vision_encoder.model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert model.vision_encoder.num_tokens == 64  # 64 pixels in 8x8 patches
    untrained = build_model(str(ROOT / "configs" / "mllm" / "timm_mlp_llama.py"),
                         cfg_options={k: v for k, v in options.items() if not k.endswith("pretrained")})
    assert not torch.equal(untrained.vision_encoder.model.state_dict()["blocks.0.attn.qkv.weight"],
                           saved["blocks.0.attn.qkv.weight"])


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps, images and held_out"):
        train_tower(tmp_path, steps=0)
