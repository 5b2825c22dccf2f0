"""Can the box and track heads localise what the tiny configs' vision tower shows?

The heads alone (no LLM) on ``tpo data synth`` scenes at 32 pixels, seen through the frozen random timm
ViT of ``configs/_base_/models/vision_timm_vit_tiny.py`` (8-pixel patches: a 4x4 grid of 32-d tokens),
built with torch seed 0 as a run builds it. The query stands in for the LLM's hidden state at a task
token: a learnt embedding of the named shape's colour plus one of its kind, trained with the head.

* boxes (images, every shape of a scene a sample): ``RegionHead`` (the paper's MLP on the query) and
  ``RegionDecoderHead`` (reads the patches too), for each ``--box-scenes`` count of training scenes;
  Acc@0.5 and mean IoU on the test scenes.
* tracks (4-frame videos, every moving shape visible on two frames or more a sample; the object's box
  on its first visible frame is the prompt): ``TrackHead``, ``RegionDecoderHead`` run on each frame
  alone, and keeping the first box, for each ``--speeds`` (``synthesize(max_speed=...)``: shapes move 2
  to that many pixels a frame); OTB success AUC and mean IoU over the visible frames of the test clips.

    python benchmarks/bench_localisation.py [--box-scenes 40 2000] [--speeds 2 4] [--steps 1500]
        [--batch 64] [--test-scenes 300] [--threads 1] [--out DIR]

Rows go to ``benchmarks/results/<machine>/localisation.csv`` (with the seconds each head trained,
torch threads and the load average). The committed rows took about 5 minutes on one thread.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

SIZE, FRAMES, GRID, HIDDEN = 32, 4, (4, 4), 64


def tower():
    import torch
    from tpo.registry import VISION_ENCODERS, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/_base_/models/vision_timm_vit_tiny.py")
    torch.manual_seed(0)
    return VISION_ENCODERS.build(cfg.to_dict()["vision_encoder"]).eval()


def box_samples(encoder, scenes: range, seed: int):
    """Every shape of ``scenes`` (images): features ``[n, 1, N, C]``, query ids ``[n, 2]``, boxes ``[n, 4]``."""
    import numpy as np
    import torch

    from tpo.data.synth import COLORS, SHAPES, make_scene, mask_box

    frames, names, boxes = [], [], []
    for i in scenes:
        scene = make_scene(i, seed, frames=1, size=SIZE, image_fraction=1.0)
        for k, shape in enumerate(scene.shapes):
            frames.append(scene.frames()[0])
            names.append((list(COLORS).index(shape.color), list(SHAPES).index(shape.shape)))
            boxes.append(mask_box(scene.visible(k, 0)))
    pixels = encoder.preprocess(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
    with torch.no_grad():
        feats = torch.cat([encoder(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    return feats, torch.tensor(names), torch.tensor(boxes, dtype=torch.float32)


def track_samples(encoder, scenes: range, seed: int, max_speed: int):
    """Every moving shape of ``scenes`` (videos) visible on two frames or more: features ``[n, T, N, C]``,
    query ids ``[n, 2]``, boxes ``[n, T, 4]``, visible ``[n, T]``, first visible frame ``[n]``."""
    import numpy as np
    import torch

    from tpo.data.synth import COLORS, SHAPES, make_scene, mask_box

    clips, names, boxes, visible = [], [], [], []
    for i in scenes:
        scene = make_scene(i, seed, frames=FRAMES, size=SIZE, image_fraction=0.0, max_speed=max_speed)
        for k, shape in enumerate(scene.shapes):
            per_frame = [mask_box(scene.visible(k, t)) for t in range(FRAMES)]
            if not shape.moves or sum(b is not None for b in per_frame) < 2:
                continue
            clips.append(scene.frames())
            names.append((list(COLORS).index(shape.color), list(SHAPES).index(shape.shape)))
            boxes.append([b if b is not None else (0.0, 0.0, 1.0, 1.0) for b in per_frame])
            visible.append([b is not None for b in per_frame])
    video = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).reshape(-1, 3, SIZE, SIZE)
    pixels = encoder.preprocess(video).reshape(len(clips), FRAMES, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = torch.cat([encoder(pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
    visible = torch.tensor(visible)
    return feats, torch.tensor(names), torch.tensor(boxes, dtype=torch.float32), visible, visible.int().argmax(1)


def visual(feats):
    return dict(features=feats, grid_size=GRID, image_size=(SIZE, SIZE))


def train(head, step_loss, steps: int, batch: int, count: int):
    """``steps`` AdamW steps of ``step_loss(head, query_of(ids), index)`` on random batches of ``count``
    samples; returns the query function (the learnt name embedding) and the seconds."""
    import torch

    from tpo.data.synth import COLORS, SHAPES

    torch.manual_seed(1)
    table = torch.nn.Embedding(len(COLORS) + len(SHAPES), HIDDEN)

    def query_of(ids):
        return table(ids[:, 0]) + table(len(COLORS) + ids[:, 1])

    opt = torch.optim.AdamW([*head.parameters(), *table.parameters()], lr=2e-3)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, count, (batch,))
        loss = step_loss(head, query_of, index)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    return query_of, time.perf_counter() - start


def iou(pred, target):
    from torchvision.ops import box_iou

    return box_iou(pred.reshape(-1, 4), target.reshape(-1, 4)).diag().reshape(target.shape[:-1])


def track_scores(pred, boxes, visible) -> dict:
    """The mean over clips of the OTB success AUC (as ``tpo eval`` scores a track: over the frames the object
    is visible on) and of the mean IoU there."""
    import numpy as np

    from tpo.evaluation.metrics import success_auc

    target = boxes.double().numpy().copy()
    target[~visible.numpy()] = np.nan  # absent: left out
    ious = iou(pred, boxes)
    auc = np.mean([success_auc(p, g) for p, g in zip(pred.double().numpy(), target)])
    miou = np.mean([float(ious[c][visible[c]].mean()) for c in range(len(ious))])
    return dict(value=round(float(auc), 4), miou=round(float(miou), 4))


def box_rows(encoder, train_scenes: list[int], test_scenes: int, steps: int, batch: int) -> list[dict]:
    import torch
    from tpo.registry import build_task_head

    test = box_samples(encoder, range(test_scenes), seed=1)
    rows = []
    for scenes in train_scenes:
        feats, names, boxes = box_samples(encoder, range(scenes), seed=0)
        for cfg in (dict(type="RegionHead", hidden_dim=HIDDEN, num_layers=2),
                    dict(type="RegionDecoderHead", visual_dim=feats.shape[-1], hidden_dim=HIDDEN, num_layers=1,
                         num_heads=4)):
            torch.manual_seed(1)
            head = build_task_head(dict(cfg, in_dim=HIDDEN))

            def step_loss(head, query_of, i, feats=feats, names=names, boxes=boxes):
                return head.loss(head(query_of(names[i]), visual(feats[i])), dict(boxes=boxes[i]))["loss"]

            query_of, seconds = train(head, step_loss, steps, batch, len(feats))
            with torch.no_grad():
                ious = iou(head.predict(query_of(test[1]), visual(test[0]))["boxes"], test[2])
            rows.append(dict(task="box", head=cfg["type"], train_scenes=scenes, train_samples=len(feats),
                             test_samples=len(ious), max_speed="", steps=steps, batch=batch,
                             score="acc@0.5", value=round(float((ious >= 0.5).float().mean()), 4),
                             miou=round(float(ious.mean()), 4), seconds=round(seconds, 1)))
            print(rows[-1], flush=True)
    return rows


def track_rows(encoder, speeds: list[int], train_scenes: int, test_scenes: int, steps: int, batch: int) -> list[dict]:
    import torch
    from tpo.registry import build_task_head

    rows = []
    for speed in speeds:
        feats, names, boxes, visible, first = track_samples(encoder, range(train_scenes), 0, speed)
        t_feats, t_names, t_boxes, t_visible, t_first = track_samples(encoder, range(test_scenes), 1, speed)
        rows_of = range(len(t_boxes))
        common = dict(task="track", train_scenes=train_scenes, train_samples=len(feats), test_samples=len(t_feats),
                      max_speed=speed, batch=batch, score="auc")
        keep = t_boxes[rows_of, t_first][:, None].expand_as(t_boxes)
        rows.append(dict(common, head="keep the first box", steps=0, **track_scores(keep, t_boxes, t_visible),
                         seconds=0.0))
        print(rows[-1], flush=True)

        torch.manual_seed(1)
        tracker = build_task_head(dict(type="TrackHead", in_dim=HIDDEN, visual_dim=feats.shape[-1], hidden_dim=32,
                                       num_layers=1, num_heads=4))

        def track_loss(head, query_of, i):
            init = boxes[i, first[i]]
            out = head(query_of(names[i]), visual(feats[i]), init_boxes=init, init_frames=first[i])
            return head.loss(out, dict(boxes=boxes[i], valid=visible[i]))["loss"]

        query_of, seconds = train(tracker, track_loss, steps, batch, len(feats))
        with torch.no_grad():
            pred = tracker.predict(query_of(t_names), visual(t_feats), init_boxes=t_boxes[rows_of, t_first],
                                   init_frames=t_first)["boxes"]
        rows.append(dict(common, head="TrackHead", steps=steps, **track_scores(pred, t_boxes, t_visible),
                         seconds=round(seconds, 1)))
        print(rows[-1], flush=True)

        torch.manual_seed(1)
        decoder = build_task_head(dict(type="RegionDecoderHead", in_dim=HIDDEN, visual_dim=feats.shape[-1],
                                       hidden_dim=32, num_layers=1, num_heads=4))
        pairs = visible.nonzero()  # (clip, frame) of every visible box: the decoder learns frames alone

        def frame_loss(head, query_of, i):
            clip, frame = pairs[i, 0], pairs[i, 1]
            out = head(query_of(names[clip]), visual(feats[clip, frame][:, None]))
            return head.loss(out, dict(boxes=boxes[clip, frame]))["loss"]

        query_of, seconds = train(decoder, frame_loss, steps, batch, len(pairs))
        with torch.no_grad():
            pred = torch.stack([decoder.predict(query_of(t_names), visual(t_feats[:, t][:, None]))["boxes"]
                                for t in range(FRAMES)], dim=1)
        rows.append(dict(common, head="RegionDecoderHead on each frame", steps=steps,
                         **track_scores(pred, t_boxes, t_visible), seconds=round(seconds, 1)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box-scenes", type=int, nargs="*", default=[40, 2000],
                        help="training scenes of each box run (2-4 shapes each)")
    parser.add_argument("--speeds", type=int, nargs="*", default=[2, 4], help="max_speed of each track run")
    parser.add_argument("--track-scenes", type=int, default=1500, help="training scenes of the track runs")
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<machine>)")
    args = parser.parse_args(argv)
    for name in ("box_scenes", "speeds"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: positive integers, got {getattr(args, name)}")
    if bad := [s for s in args.speeds if not 2 <= s <= SIZE // 4]:
        parser.error(f"--speeds: pixels a frame from 2 to {SIZE // 4} at {SIZE} pixels, got {bad}")
    if min(args.track_scenes, args.test_scenes, args.steps, args.batch, args.threads) < 1:
        parser.error("--track-scenes, --test-scenes, --steps, --batch and --threads: positive integers")

    import torch
    from benchkit import RESULTS, load_avg_1m, machine_name, write_csv

    torch.set_num_threads(args.threads)
    encoder = tower()
    rows = box_rows(encoder, args.box_scenes, args.test_scenes, args.steps, args.batch)
    rows += track_rows(encoder, args.speeds, args.track_scenes, args.test_scenes, args.steps, args.batch)
    load = load_avg_1m()
    for row in rows:
        row.update(torch_threads=args.threads, load_avg_1m=load)
    path = write_csv((args.out or RESULTS / machine_name()) / "localisation.csv", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
