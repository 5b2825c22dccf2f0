"""An object-trained vision tower for the tiny CPU models: the tiny timm ViT of
``configs/_base_/models/vision_timm_vit_tiny.py``, at the synthetic benchmark's
64 pixels (8x8 patches, 4 blocks, 64 channels), trained to say of every shape
of an image its colour, its shape and its place (the region of a 3x3 grid)
from the mean of the patch tokens it covers, and of every patch the colour
that covers it. It stands in for the pretrained tower a real run loads
(nothing is downloaded): the random tower of the tiny configs keeps the
colours of large squares but not those of the benchmark's small shapes, and
the tiny LLM does not learn to see them within a CPU budget
(``bench_dpo_heldout.py``'s rows).

    python benchmarks/synth_vision_tower.py --out work_dirs/vision_tower [--steps 5000] [--images 20000]
        [--seed 777] [--threads 2]

The images are scenes of ``tpo data synth`` with 1-4 shapes from their own
seed (by default 777 and, held out, 778; the benchmark's runs use seeds 0-4,
whose scenes are others). Writes ``OUT/model.safetensors`` (the timm model's
weights, which ``TimmVisionEncoder(pretrained=...)`` loads through timm) and
``OUT/tower.json``: the config options that build the tower in a
composition (``model.vision_encoder.*``, ``pretrained`` included), the
training settings, the held-out accuracies and the seconds it took. The
defaults took 10.5 minutes on one thread beside another run (2-core Intel
Xeon; held-out colour 0.995, shape 0.94, region 0.98).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VISION_CONFIG = ROOT / "configs" / "_base_" / "models" / "vision_timm_vit_tiny.py"
# the tower's shape: the benchmark's 64 pixels in 8x8 patches (an 8x8 grid of tokens), four blocks
MODEL_KWARGS = dict(img_size=64, patch_size=8, depth=4, embed_dim=64, num_heads=4)
MAX_OBJECTS = 4
IGNORE = -100


def image_targets(scene, grid: int, max_objects: int = MAX_OBJECTS) -> dict[str, np.ndarray]:
    """What the tower learns of the first frame of ``scene`` on a ``grid x grid`` patch grid:
    ``patch_colour [grid*grid]`` (0: background, else 1 + the index in ``COLORS`` of the shape
    covering at least 1/8 of the patch), ``weights [max_objects, grid*grid]`` (each shape's share of
    its visible pixels in each patch, rows of absent shapes zero) and ``colour``, ``shape``, ``region``
    ``[max_objects]`` (indices in ``COLORS``, ``SHAPES``, ``REGIONS``; ``-100`` for absent shapes)."""
    from tpo.data.synth import COLORS, REGIONS, SHAPES, region_of

    labels = scene.labels[0]
    size = labels.shape[0]
    if size % grid:
        raise ValueError(f"a {size}-pixel frame does not split into a {grid}x{grid} grid")
    if len(scene.shapes) > max_objects:
        raise ValueError(f"scene {scene.index} has {len(scene.shapes)} shapes, more than max_objects={max_objects}")
    cell = size // grid
    cells = labels.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    colours = list(COLORS)
    out = {
        "patch_colour": np.zeros(grid * grid, np.int64),
        "weights": np.zeros((max_objects, grid * grid), np.float32),
        **{key: np.full(max_objects, IGNORE, np.int64) for key in ("colour", "shape", "region")},
    }
    for k, s in enumerate(scene.shapes):
        pixels = (cells == k + 1).sum(1)
        out["patch_colour"][pixels >= max(1, cell * cell // 8)] = 1 + colours.index(s.color)
        if pixels.sum() == 0:
            continue
        out["weights"][k] = pixels / pixels.sum()
        out["colour"][k] = colours.index(s.color)
        out["shape"][k] = SHAPES.index(s.shape)
        out["region"][k] = REGIONS.index(region_of(*s.centre(0), size, size))
    return out


def make_split(encoder, num: int, seed: int, grid: int) -> dict[str, torch.Tensor]:
    """``num`` images of 1-4 shapes (scenes ``0..num-1`` of ``seed``), preprocessed for ``encoder``,
    with their targets stacked."""
    from tpo.data.synth import make_scene

    pixels, targets = [], []
    for i in range(num):
        scene = make_scene(i, seed, objects=(1, MAX_OBJECTS), image_fraction=1.0)
        pixels.append(torch.from_numpy(scene.frames()[0].transpose(2, 0, 1).copy()))
        targets.append(image_targets(scene, grid))
    batch = {key: torch.from_numpy(np.stack([t[key] for t in targets])) for key in targets[0]}
    batch["pixels"] = encoder.preprocess(pixels)
    return batch


class Heads(torch.nn.Module):
    """Linear read-outs: the colour of each patch, and each shape's colour, shape and region from the
    weighted mean of its tokens."""

    def __init__(self, dim: int):
        from tpo.data.synth import COLORS, REGIONS, SHAPES

        super().__init__()
        self.patch_colour = torch.nn.Linear(dim, 1 + len(COLORS))
        self.colour = torch.nn.Linear(dim, len(COLORS))
        self.shape = torch.nn.Linear(dim, len(SHAPES))
        self.region = torch.nn.Linear(dim, len(REGIONS))

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = weights @ tokens  # [B, objects, C]
        return {"patch_colour": self.patch_colour(tokens), "colour": self.colour(pooled),
                "shape": self.shape(pooled), "region": self.region(pooled)}


def _losses_and_logits(encoder, heads, batch):
    tokens = encoder(batch["pixels"])[:, 0]  # [B, N, C]: an image is one frame
    logits = heads(tokens, batch["weights"])
    losses = {key: torch.nn.functional.cross_entropy(value.flatten(0, 1), batch[key].flatten(), ignore_index=IGNORE)
              for key, value in logits.items()}
    return losses, logits


@torch.no_grad()
def accuracies(encoder, heads, batch, chunk: int = 250) -> dict[str, float]:
    """Held-out accuracy of each read-out (the patch colours over the patches a shape covers)."""
    was = encoder.training
    encoder.eval()
    hits = {key: [0, 0] for key in ("patch_colour", "colour", "shape", "region")}
    for start in range(0, batch["pixels"].shape[0], chunk):
        part = {key: value[start:start + chunk] for key, value in batch.items()}
        _, logits = _losses_and_logits(encoder, heads, part)
        for key, value in logits.items():
            target = part[key]
            keep = target > 0 if key == "patch_colour" else target != IGNORE
            hits[key][0] += int((value.argmax(-1)[keep] == target[keep]).sum())
            hits[key][1] += int(keep.sum())
    encoder.train(was)
    return {key: round(right / max(total, 1), 4) for key, (right, total) in hits.items()}


def train_tower(out: str | Path, steps: int = 5000, images: int = 20000, held_out: int = 500, seed: int = 777,
                batch_size: int = 64, lr: float = 2e-3, log=print) -> dict:
    """Train the tower and write ``out/model.safetensors`` and ``out/tower.json``; returns the latter's
    contents."""
    from safetensors.torch import save_file
    from tpo.registry import build_vision_encoder

    if steps < 1 or images < 1 or held_out < 1:
        raise ValueError(f"steps, images and held_out must be >= 1, got {steps}, {images}, {held_out}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {f"model_kwargs.{key}": value for key, value in MODEL_KWARGS.items()}
    torch.manual_seed(seed)
    encoder = build_vision_encoder(str(VISION_CONFIG), cfg_options={
        **{f"vision_encoder.{key}": value for key, value in options.items()}, "vision_encoder.freeze": False})
    grid = MODEL_KWARGS["img_size"] // MODEL_KWARGS["patch_size"]
    if encoder.num_tokens != grid * grid:
        raise RuntimeError(f"the tower gives {encoder.num_tokens} tokens an image, not the {grid}x{grid} grid of "
                           f"{MODEL_KWARGS}: were the options applied?")
    tic = time.perf_counter()
    train, val = make_split(encoder, images, seed, grid), make_split(encoder, held_out, seed + 1, grid)
    log(f"{images} training and {held_out} held-out images in {time.perf_counter() - tic:.0f} s")
    heads = Heads(encoder(val["pixels"][:1]).shape[-1])
    params = list(encoder.parameters()) + list(heads.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    draw = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        index = torch.randint(0, images, (batch_size,), generator=draw)
        losses, _ = _losses_and_logits(encoder, heads, {key: value[index] for key, value in train.items()})
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss {loss.item()} ({ {k: v.item() for k, v in losses.items()} })")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracies(encoder, heads, val)}, "
                f"{time.perf_counter() - tic:.0f} s")
    weights = out / "model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({key: value.contiguous() for key, value in encoder.model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    report = {
        "cfg_options": {**{f"model.vision_encoder.{key}": value for key, value in options.items()},
                        "model.vision_encoder.pretrained": str(weights.resolve())},
        "train": dict(steps=steps, images=images, held_out=held_out, seed=seed, batch_size=batch_size, lr=lr,
                      torch_threads=torch.get_num_threads()),
        "held_out_accuracy": accuracies(encoder, heads, val),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    tmp = out / "tower.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "tower.json")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.safetensors and tower.json")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--images", type=int, default=20000, help="training images (scenes of --seed)")
    parser.add_argument("--held-out", type=int, default=500, help="held-out images (scenes of --seed + 1)")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("steps", "images", "held_out"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    report = train_tower(args.out, args.steps, args.images, args.held_out, args.seed)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
