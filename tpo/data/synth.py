"""A procedurally rendered benchmark with exact ground truth for every task.

Each *scene* is a short video (``.npy`` uint8 ``[T, H, W, 3]``) or an image
(PNG): coloured shapes (circle, square, triangle, diamond, cross; eight
colours, unique within a scene) on a plain background. In a video, shapes
enter, leave, move in a straight line (left, right, up or down) and pass in
front of each other. From the scene's own state come

* multiple-choice and open questions: colour, shape, count, position, order of
  appearance, direction of motion, what happens at a given time; many need
  localisation in space ("the shape at the top left") or time ("at 0.38");
* a referring box per frame (the tight box of the shape's visible pixels);
* the temporal span of each event ("when does the red triangle enter?");
* masks: COCO RLE of the shape's visible pixels, per frame;
* tracks: per-frame boxes of one shape (one that moves, where the video has one) from the box where it first appears;
* a detailed, correct description, sentence by sentence (a judge's context),
  and preference pairs (the correct answer chosen over a wrong option): one
  per scene, or with ``preference_pairs="all"`` one per question. The wrong
  options are drawn so that an answer's text alone does not tell right from
  wrong (a count pair rejects the count of another shape or at another time,
  an event pair an event of the same kind): only the frames do.

Time follows :mod:`tpo.data.video`: frame ``i`` of ``T`` covers
``[i/T, (i+1)/T)``; an event on frames ``a..b`` has the span ``[a/T, (b+1)/T]``.
"Enters at t" means the shape is first visible on the frame that holds t,
"leaves at t" that it is gone from the frame that holds t, "moves from t1 to
t2" that it is displaced on the frames whose centres lie in ``[t1, t2]``. Times
are written rounded (:func:`fmt_time`): a start inside its frame, an end inside
its frame or on its end, so that the written span holds the frames of the exact one.

Guarantees (checked while rendering; a scene that breaks one is drawn again):
every shape present on a frame shows at least 40% of its pixels; a moving shape
is drawn above every shape it touches and never touches another moving shape,
so it is fully visible; each motion step uncovers or covers background.

Scenes go to train/val/test by index (no scene in two splits); the scene of
index ``i`` comes from ``numpy.random.default_rng([seed, i])`` alone, so a
seed gives the same files on any machine and with any number of workers.

Command line (``tpo data synth`` calls :func:`main`)::

    tpo data synth --out DIR --num N --seed S [--frames T --size H] [--preference-pairs all] [--objects 1 1]
        [--max-speed 4]

writes ``DIR/{train,val,test}.jsonl``, ``DIR/media/`` and ``DIR/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .schema import encode_mask

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
    "pink": (240, 110, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPLITS = ("train", "val", "test")
TASKS = ("qa", "grounding", "temporal_grounding", "segmentation", "tracking", "caption", "preference")
LETTERS = "ABCDEFGH"
PREFERENCE_PAIRS = ("one", "all")
# Bumped whenever a seed's files change (summary.json records it, so that a benchmark written by an
# earlier version is told apart): 2 = tracks follow a moving shape where the video has one; 3 = times
# written inside the frame they describe (rounded up from a frame's start, down from its end), regions from
# the centre of a shape's centre pixel.
VERSION = 3
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 6


def fmt_time(frame: int, frames: int, end: bool = False) -> str:
    """The start of ``frame`` of ``frames`` (with ``end``: its end) as a normalised time written in
    questions and descriptions: the start rounded up, so that the time lies inside the frame (which covers
    ``[frame/T, (frame+1)/T)``), the end rounded down, so that it lies inside the frame or on its end; to
    2 decimals, or more where frames are too short for them to stay within half a frame of the exact time
    (a span written so holds the same frames as the exact one: :func:`tpo.data.video.span_frame_mask`)."""
    digits = 2
    while 10 ** digits < 2 * frames:
        digits += 1
    scale = 10 ** digits
    ticks = (frame + 1) * scale // frames if end else -(-frame * scale // frames)  # exact: integers only
    return f"{ticks / scale:.{digits}f}"


def fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def region_of(cx: int, cy: int, width: int, height: int) -> str:
    """The cell of a 3x3 grid that holds the centre of pixel ``(cx, cy)`` (at ``cx + 0.5, cy + 0.5``:
    the centre of the box of a shape centred on that pixel, see :func:`mask_box`)."""
    col = min(2, int(3 * (cx + 0.5) / width))
    row = min(2, int(3 * (cy + 0.5) / height))
    return REGIONS[3 * row + col]


def stencil(shape: str, r: int) -> np.ndarray:
    """The bool pixel mask ``[2r+1, 2r+1]`` of a shape of radius ``r`` centred on its middle pixel."""
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    if shape == "circle":
        return dx * dx + dy * dy <= r * r + r // 2
    if shape == "square":
        s = max(1, int(round(0.8 * r)))
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base at the bottom
        return 2 * np.abs(dx) <= dy + r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        t = max(1, r // 3)
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


@dataclass
class Shape:
    """One object of a scene; frames ``first..last`` present, moving on frames ``move_first..move_last``."""

    color: str
    shape: str
    radius: int
    first: int
    last: int
    x0: int
    y0: int
    move_first: int | None = None
    move_last: int | None = None
    direction: str | None = None
    speed: int = 0
    z: int = 0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def moves(self) -> bool:
        return self.direction is not None

    def present(self, t: int) -> bool:
        return self.first <= t <= self.last

    def centre(self, t: int) -> tuple[int, int]:
        if not self.moves:
            return self.x0, self.y0
        steps = min(max(t - self.move_first + 1, 0), self.move_last - self.move_first + 1)
        ux, uy = DIRECTIONS[self.direction]
        return self.x0 + ux * self.speed * steps, self.y0 + uy * self.speed * steps


@dataclass
class Scene:
    """A rendered scene: ``labels[t]`` holds 0 for background and ``k + 1`` where shape ``k`` is visible."""

    index: int
    background: str
    shapes: list[Shape]
    labels: np.ndarray  # [T, H, W] int8
    is_video: bool

    @property
    def num_frames(self) -> int:
        return self.labels.shape[0]

    def frames(self) -> np.ndarray:
        palette = np.array([BACKGROUNDS[self.background]] + [COLORS[s.color] for s in self.shapes], dtype=np.uint8)
        return palette[self.labels]

    def visible(self, k: int, t: int) -> np.ndarray:
        return self.labels[t] == k + 1


# ---------------------------------------------------------------- drawing a scene


def _amodal(shape: Shape, t: int, size: int) -> np.ndarray:
    st = stencil(shape.shape, shape.radius)
    cx, cy = shape.centre(t)
    r = shape.radius
    out = np.zeros((size, size), dtype=bool)
    out[cy - r:cy + r + 1, cx - r:cx + r + 1] = st
    return out


def _render(shapes: list[Shape], frames: int, size: int) -> np.ndarray:
    labels = np.zeros((frames, size, size), dtype=np.int8)
    order = sorted(range(len(shapes)), key=lambda k: shapes[k].z)
    stencils = {k: stencil(shapes[k].shape, shapes[k].radius) for k in order}
    for t in range(frames):
        for k in order:
            s = shapes[k]
            if not s.present(t):
                continue
            cx, cy = s.centre(t)
            r = s.radius
            window = labels[t, cy - r:cy + r + 1, cx - r:cx + r + 1]
            window[stencils[k]] = k + 1
    return labels


def _scene_ok(shapes: list[Shape], labels: np.ndarray, size: int) -> bool:
    frames = labels.shape[0]
    for k, s in enumerate(shapes):
        area = int(stencil(s.shape, s.radius).sum())
        need = max(MIN_VISIBLE_PIXELS, int(np.ceil(MIN_VISIBLE_FRACTION * area)))
        for t in range(s.first, s.last + 1):
            if int((labels[t] == k + 1).sum()) < need:
                return False
    movers = [k for k, s in enumerate(shapes) if s.moves]
    for t in range(frames):
        for i in movers:
            if not shapes[i].present(t):
                continue
            mi = _amodal(shapes[i], t, size)
            if int((labels[t] == i + 1).sum()) != int(mi.sum()):
                return False  # a moving shape is always fully visible
            for j in movers:
                if j > i and shapes[j].present(t) and (mi & _amodal(shapes[j], t, size)).any():
                    return False
    for k in movers:
        s = shapes[k]
        for t in range(s.move_first, s.move_last + 1):
            delta = (labels[t] == k + 1) ^ (labels[t - 1] == k + 1)
            if not (delta & ((labels[t] == 0) | (labels[t - 1] == 0))).any():
                return False
    return True


def default_max_speed(size: int) -> int:
    """The fastest a shape moves by default, in pixels a frame: 2 up to 59-pixel frames, ``size // 20`` above."""
    return max(2, size // 20)


def _draw_shapes(rng: np.random.Generator, frames: int, size: int, is_video: bool,
                 objects: tuple[int, int] = (2, 4), max_speed: int | None = None) -> list[Shape]:
    n = int(rng.integers(objects[0], objects[1] + 1))
    colors = [str(c) for c in rng.choice(list(COLORS), size=n, replace=False)]
    r_min, r_max = max(3, size // 12), max(4, size // 7)
    max_speed = default_max_speed(size) if max_speed is None else max_speed
    shapes: list[Shape] = []
    for color in colors:
        shape = str(rng.choice(SHAPES))
        r = int(rng.integers(r_min, r_max + 1))
        first, last = 0, frames - 1
        if is_video:
            if rng.random() < 0.5:
                first = int(rng.integers(1, frames - 2))
            if rng.random() < 0.4 and last - first >= 3:
                last = int(rng.integers(first + 2, frames - 1))
        s = Shape(color, shape, r, first, last, 0, 0)
        lo, hi = r, size - 1 - r
        if is_video and rng.random() < 0.55 and last - first >= 2:
            s.direction = str(rng.choice(list(DIRECTIONS)))
            s.move_first = int(rng.integers(first + 1, last + 1))
            s.move_last = int(rng.integers(s.move_first, last + 1))
            s.speed = int(rng.integers(2, max_speed + 1))
            travel = s.speed * (s.move_last - s.move_first + 1)
            while travel > hi - lo and s.move_last > s.move_first:
                s.move_last -= 1
                travel = s.speed * (s.move_last - s.move_first + 1)
            if travel > hi - lo:
                s.direction, s.move_first, s.move_last, s.speed = None, None, None, 0
        if s.moves:
            ux, uy = DIRECTIONS[s.direction]
            travel = s.speed * (s.move_last - s.move_first + 1)
            along = [lo + travel, hi] if (ux < 0 or uy < 0) else [lo, hi - travel]
            start = int(rng.integers(along[0], along[1] + 1))
            across = int(rng.integers(lo, hi + 1))
            statics = [o for o in shapes if not o.moves]
            if statics and rng.random() < 0.5:  # aim the path across a static shape
                target = statics[int(rng.integers(len(statics)))]
                across = int(np.clip((target.y0 if ux else target.x0) + rng.integers(-r // 2, r // 2 + 1), lo, hi))
            s.x0, s.y0 = (start, across) if ux else (across, start)
        else:
            s.x0, s.y0 = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        shapes.append(s)
    statics = [s for s in shapes if not s.moves]
    movers = [s for s in shapes if s.moves]
    for z, s in enumerate([statics[i] for i in rng.permutation(len(statics))] + movers):
        s.z = z
    return shapes


def make_scene(index: int, seed: int, frames: int = 8, size: int = 64, image_fraction: float = 0.25,
               objects: tuple[int, int] = (2, 4), max_speed: int | None = None) -> Scene:
    """Draw and render scene ``index`` of the benchmark of ``seed`` (deterministic), with
    ``objects[0]``..``objects[1]`` shapes (inclusive), moving shapes 2 to ``max_speed`` pixels a frame
    (:func:`default_max_speed` when ``None``; the speed is one draw whatever its range, so the scenes differ
    only in how fast their shapes move)."""
    rng = np.random.default_rng([seed, index])
    is_video = bool(rng.random() >= image_fraction) and frames > 1
    t = frames if is_video else 1
    background = str(rng.choice(list(BACKGROUNDS)))
    for _ in range(1000):
        shapes = _draw_shapes(rng, t, size, is_video, objects, max_speed)
        labels = _render(shapes, t, size)
        if _scene_ok(shapes, labels, size):
            return Scene(index, background, shapes, labels, is_video)
    raise RuntimeError(f"scene {index} of seed {seed}: no valid layout in 1000 draws (size {size} too small?)")


# ---------------------------------------------------------------- what happens in a scene


@dataclass
class Event:
    kind: str  # enter | leave | move | occlude
    obj: int
    first: int  # first frame of the event
    last: int  # last frame of the event
    other: int | None = None  # occlude: the shape covered
    direction: str | None = None


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The normalised tight box ``[x1, y1, x2, y2]`` of a pixel mask (pixel edges), or ``None`` when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def scene_events(scene: Scene) -> list[Event]:
    """The scene's events in time order."""
    T = scene.num_frames
    size = scene.labels.shape[1]
    events: list[Event] = []
    for k, s in enumerate(scene.shapes):
        if s.first > 0:
            events.append(Event("enter", k, s.first, s.first))
        if s.last < T - 1:
            events.append(Event("leave", k, s.last + 1, s.last + 1))
        if s.moves:
            events.append(Event("move", k, s.move_first, s.move_last, direction=s.direction))
    for k, s in enumerate(scene.shapes):  # k covers part of o
        for o, other in enumerate(scene.shapes):
            if other.z >= s.z:
                continue
            frames = [
                t for t in range(T)
                if s.present(t) and other.present(t) and (_amodal(s, t, size) & _amodal(other, t, size)).any()
            ]
            if frames:
                events.append(Event("occlude", k, frames[0], frames[-1], other=o))
    order = {"enter": 0, "move": 1, "occlude": 2, "leave": 3}
    events.sort(key=lambda e: (e.first, order[e.kind], e.obj))
    return events


def _name_list(names: Sequence[str]) -> str:
    items = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _the_list(names: Sequence[str]) -> str:
    items = [f"the {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def event_sentence(scene: Scene, e: Event) -> str:
    T, size = scene.num_frames, scene.labels.shape[1]
    s = scene.shapes[e.obj]
    if e.kind == "enter":
        return f"At {fmt_time(e.first, T)}, the {s.name} enters at the {region_of(*s.centre(e.first), size, size)}."
    if e.kind == "leave":
        where = region_of(*s.centre(e.first - 1), size, size)
        return f"At {fmt_time(e.first, T)}, the {s.name} leaves from the {where}."
    if e.kind == "move":
        end = region_of(*s.centre(e.last), size, size)
        return (
            f"From {fmt_time(e.first, T)} to {fmt_time(e.last, T, end=True)}, the {s.name} moves {e.direction}"
            f" and stops at the {end}."
        )
    other = scene.shapes[e.other].name
    if scene.is_video:
        return (f"From {fmt_time(e.first, T)} to {fmt_time(e.last, T, end=True)}, the {s.name} covers part of "
                f"the {other}.")
    return f"The {s.name} covers part of the {other}."


def describe(scene: Scene, events: list[Event] | None = None) -> list[str]:
    """A correct, detailed description of the scene, one sentence per fact, in time order."""
    events = scene_events(scene) if events is None else events
    size, T = scene.labels.shape[1], scene.num_frames
    names = [s.name for s in scene.shapes]
    medium = "video" if scene.is_video else "image"
    n = len(names)
    noun = "shape" if n == 1 else "shapes"
    out = [f"The {medium} shows {NUMBER_WORDS[n]} {noun} on a {scene.background} background: {_name_list(names)}."]
    if not scene.is_video:
        for s in scene.shapes:
            out.append(f"The {s.name} is at the {region_of(*s.centre(0), size, size)}.")
        out += [event_sentence(scene, e) for e in events]
        return out
    at_start = [s for s in scene.shapes if s.present(0)]
    for s in at_start:
        out.append(f"At the start, the {s.name} is at the {region_of(*s.centre(0), size, size)}.")
    out += [event_sentence(scene, e) for e in events]
    at_end = [s.name for s in scene.shapes if s.present(T - 1)]
    out.append(f"At the end, {_the_list(at_end)} {'is' if len(at_end) == 1 else 'are'} visible."
               if at_end else "At the end, no shape is visible.")
    return out


# ---------------------------------------------------------------- questions


@dataclass
class Question:
    qtype: str
    text: str
    answer: str
    options: list[str]  # candidate answers, the correct one included
    localisation: str  # none | space | time
    obj: int | None = None
    # wrong options that are the right answers of sibling questions about the same scene (the count of
    # another shape, at another time): a preference pair rejects one of them when there are any, so
    # that chosen and rejected answers come from the same distribution and their text alone tells nothing
    foils: tuple[str, ...] = ()


def _options(rng: np.random.Generator, answer: str, pool: Sequence[str], n: int = 4) -> list[str]:
    others = [p for p in dict.fromkeys(pool) if p != answer]
    picked = [others[i] for i in rng.permutation(len(others))[: n - 1]]
    opts = picked + [answer]
    return [opts[i] for i in rng.permutation(len(opts))]


def _questions(scene: Scene, events: list[Event], rng: np.random.Generator) -> list[Question]:
    shapes, T, size = scene.shapes, scene.num_frames, scene.labels.shape[1]
    qs: list[Question] = []
    shape_counts = Counter(s.shape for s in shapes)
    colors_all, shapes_all = list(COLORS), list(SHAPES)

    def region(k: int, t: int) -> str:
        return region_of(*shapes[k].centre(t), size, size)

    # colour
    unique_shape = [k for k, s in enumerate(shapes) if shape_counts[s.shape] == 1]
    start_regions = Counter(region(k, 0) for k, s in enumerate(shapes) if s.present(0))
    by_region = [k for k, s in enumerate(shapes) if s.present(0) and start_regions[region(k, 0)] == 1]
    enters = [e for e in events if e.kind == "enter"]
    enter_times = Counter(e.first for e in enters)
    by_enter = [e for e in enters if enter_times[e.first] == 1]
    variants = []
    if unique_shape:
        k = unique_shape[int(rng.integers(len(unique_shape)))]
        variants.append((f"What colour is the {shapes[k].shape}?", k, "none"))
    if by_region:
        k = by_region[int(rng.integers(len(by_region)))]
        when = " at the start" if scene.is_video else ""
        variants.append((f"What colour is the shape at the {region(k, 0)}{when}?", k, "space"))
    if by_enter:
        e = by_enter[int(rng.integers(len(by_enter)))]
        variants.append((f"What colour is the shape that enters at {fmt_time(e.first, T)}?", e.obj, "time"))
    if variants:
        text, k, loc = variants[int(rng.integers(len(variants)))]
        qs.append(Question("color", text, shapes[k].color, _options(rng, shapes[k].color, colors_all), loc, k))

    # shape
    variants = []
    k = int(rng.integers(len(shapes)))
    variants.append((f"What shape is the {shapes[k].color} object?", k, "none"))
    if by_region:
        k2 = by_region[int(rng.integers(len(by_region)))]
        when = " at the start" if scene.is_video else ""
        variants.append((f"What shape is at the {region(k2, 0)}{when}?", k2, "space"))
    movers = [m for m, s in enumerate(shapes) if s.moves]
    dir_counts = Counter(shapes[m].direction for m in movers)
    uniq_dir = [m for m in movers if dir_counts[shapes[m].direction] == 1]
    if uniq_dir:
        m = uniq_dir[int(rng.integers(len(uniq_dir)))]
        variants.append((f"What shape moves {shapes[m].direction}?", m, "none"))
    text, k, loc = variants[int(rng.integers(len(variants)))]
    qs.append(Question("shape", text, shapes[k].shape, _options(rng, shapes[k].shape, shapes_all), loc, k))

    # count; the wrong options are first the answers of the same question at another time or about
    # another shape (so they follow the answers' own distribution), then the numbers nearest the answer
    if scene.is_video and rng.random() < 0.5:
        t = int(rng.integers(T))
        n = sum(s.present(t) for s in shapes)
        siblings = [sum(s.present(u) for s in shapes) for u in range(T) if u != t]
        text, loc = f"How many shapes are visible at {fmt_time(t, T)}?", "time"
    else:
        shape = str(rng.choice(SHAPES))
        n = shape_counts[shape]
        siblings = [shape_counts[other] for other in SHAPES if other != shape]
        where = "appear in the video" if scene.is_video else "are in the image"
        text, loc = f"How many {PLURALS[shape]} {where}?", "none"
    foils = [str(v) for v in dict.fromkeys(siblings[i] for i in rng.permutation(len(siblings))) if v != n][:3]
    near = sorted((v for v in range(max(6, n + 4)) if v != n and str(v) not in foils),
                  key=lambda v: (abs(v - n), rng.random()))
    wrong = foils + [str(v) for v in near[: 3 - len(foils)]]
    options = [(wrong + [str(n)])[i] for i in rng.permutation(4)]
    qs.append(Question("count", text, str(n), options, loc, foils=tuple(foils)))

    # position
    k = int(rng.integers(len(shapes)))
    if scene.is_video:
        text = f"Where is the {shapes[k].name} when it first appears?"
        ans = region(k, shapes[k].first)
        qs.append(Question("position", text, ans, _options(rng, ans, REGIONS), "space", k))
    else:
        others = [o for o in range(len(shapes)) if o != k and abs(shapes[o].x0 - shapes[k].x0) >= 2]
        if others:
            o = others[int(rng.integers(len(others)))]
            ans = "left" if shapes[k].x0 < shapes[o].x0 else "right"
            text = f"Is the {shapes[k].name} to the left or to the right of the {shapes[o].name}?"
            qs.append(Question("position", text, ans, ["left", "right"], "space", k))
        else:
            ans = region(k, 0)
            qs.append(Question("position", f"Where is the {shapes[k].name}?", ans,
                               _options(rng, ans, REGIONS), "space", k))
    if not scene.is_video:
        return qs

    # order of appearance
    pairs = [(i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes))
             if shapes[i].first != shapes[j].first]
    if pairs:
        i, j = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
            i, j = j, i
        first = i if shapes[i].first < shapes[j].first else j
        text = f"Which appears first, the {shapes[i].name} or the {shapes[j].name}?"
        qs.append(Question("order", text, f"the {shapes[first].name}",
                           [f"the {shapes[i].name}", f"the {shapes[j].name}"], "time", first))

    # direction of motion
    if movers:
        m = movers[int(rng.integers(len(movers)))]
        d = shapes[m].direction
        qs.append(Question("direction", f"In which direction does the {shapes[m].name} move?", d,
                           _options(rng, d, list(DIRECTIONS)), "none", m))

    # what happens when
    starts = Counter(e.first for e in events)
    single = [e for e in events if e.kind in ("enter", "leave", "move") and starts[e.first] == 1]
    if single:
        e = single[int(rng.integers(len(single)))]
        phrase = {"enter": "enters", "leave": "leaves", "move": f"starts moving {e.direction}"}

        def say(ev_kind: str, name: str, direction: str | None = None) -> str:
            verb = f"starts moving {direction}" if ev_kind == "move" else phrase[ev_kind]
            return f"the {name} {verb}"

        ans = say(e.kind, shapes[e.obj].name, e.direction)
        kind_of = {say(x.kind, shapes[x.obj].name, x.direction): x.kind for x in events
                   if x.kind in ("enter", "leave", "move") and x is not e}
        # made-up events of absent colours: the first of the answer's kind, the others of the kinds of this
        # scene's events
        real = [x.kind for x in events if x.kind in ("enter", "leave", "move")]
        absent = [c for c in COLORS if c not in {s.color for s in shapes}]
        for j, i in enumerate(rng.permutation(len(absent))[:3]):
            kind = e.kind if j == 0 else real[int(rng.integers(len(real)))]
            direction = str(rng.choice(list(DIRECTIONS))) if kind == "move" else None
            kind_of.setdefault(say(kind, f"{absent[i]} {rng.choice(SHAPES)}", direction), kind)
        kind_of.pop(ans, None)
        # one wrong option of the answer's kind, the preference pair's rejected answer: "enters" or
        # "starts moving" alone then says nothing about which option happened
        same = [o for o, k in kind_of.items() if k == e.kind]
        foil = same[int(rng.integers(len(same)))]
        options = _options(rng, ans, [o for o in kind_of if o != foil], n=3) + [foil]
        options = [options[i] for i in rng.permutation(len(options))]
        foils = tuple(o for o in options if o != ans and kind_of[o] == e.kind)
        qs.append(Question("event", f"What happens at {fmt_time(e.first, T)}?", ans, options, "time", e.obj,
                           foils=foils))
    return qs


# ---------------------------------------------------------------- samples of a scene


def _mc_text(question: str, options: list[str]) -> str:
    lines = [question, "Options:"] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines + ["Answer with the option's letter."])


def scene_samples(scene: Scene, media_path: str, split: str, seed: int, preference_pairs: str = "one") -> list[dict]:
    """Every sample (JSON dict) of one scene; ``media_path`` is relative to the JSONL folder.
    ``preference_pairs``: ``"one"`` preference pair per scene (a random question's) or ``"all"``
    (one per question of the scene: the samples of ``"one"``, unchanged, then the other questions' pairs)."""
    if preference_pairs not in PREFERENCE_PAIRS:
        raise ValueError(f"preference_pairs must be one of {PREFERENCE_PAIRS}, got {preference_pairs!r}")
    rng = np.random.default_rng([seed, scene.index, 1])
    events = scene_events(scene)
    desc = describe(scene, events)
    shapes, T = scene.shapes, scene.num_frames
    token = "<video>" if scene.is_video else "<image>"
    sid = f"scene{scene.index:06d}"
    samples: list[dict] = []

    def add(task: str, question: str, answer: str | None, meta: dict, **fields) -> None:
        conv = [{"from": "human", "value": f"{token}\n{question}"}]
        if answer is not None:
            conv.append({"from": "gpt", "value": answer})
        samples.append({
            "id": f"{sid}-{len(samples):02d}", "media": media_path, "conversations": conv, **fields,
            "description": desc, "meta": {"scene": sid, "split": split, "task": task, **meta},
        })

    def boxes_of(k: int) -> list[tuple[int, tuple[float, float, float, float]]]:
        return [(t, mask_box(scene.visible(k, t))) for t in range(T) if shapes[k].present(t)]

    questions = _questions(scene, events, rng)
    for q in questions:
        meta = {"question_type": q.qtype, "localisation": q.localisation, "answer_text": q.answer}
        if q.obj is not None:
            meta["object"] = shapes[q.obj].name
        if rng.random() < 0.5:
            letter = LETTERS[q.options.index(q.answer)]
            add("qa", _mc_text(q.text, q.options), letter,
                {**meta, "answer_type": "mc", "options": q.options, "answer": letter})
        else:
            add("qa", q.text, q.answer, {**meta, "answer_type": "open", "answer": q.answer})

    # preference: the correct answer over a wrong option (of one question here; with preference_pairs="all"
    # the other questions' pairs come last, from their own random stream, so every other sample is the same)
    def add_pair(q: Question, draw: np.random.Generator) -> None:
        wrong = list(q.foils) or [o for o in q.options if o != q.answer]
        rejected = wrong[int(draw.integers(len(wrong)))]
        add("preference", q.text, None, {"question_type": q.qtype, "localisation": q.localisation},
            preference={"prompt": f"{token}\n{q.text}", "chosen": q.answer, "rejected": rejected,
                        "judge": "synthetic ground truth"})

    picked = int(rng.integers(len(questions)))
    add_pair(questions[picked], rng)

    # referring boxes
    k = int(rng.integers(len(shapes)))
    name = shapes[k].name
    if scene.is_video:
        per_frame = boxes_of(k)
        answer = "; ".join(f"frame {t}: {fmt_box(b)}" for t, b in per_frame)
        add("grounding", f"Give the bounding box of the {name} in every frame where it is visible.", answer,
            {"object": name}, boxes=[{"frame": t, "box": list(b)} for t, b in per_frame])
    else:
        box = mask_box(scene.visible(k, 0))
        add("grounding", f"Give the bounding box of the {name}.", fmt_box(box), {"object": name}, boxes=list(box))

    # temporal spans
    if scene.is_video:
        s = shapes[k]
        choices = [("visible", f"When is the {name} visible?", s.first, s.last)]
        for e in events:
            if e.obj == k and e.kind == "enter":
                choices.append(("enter", f"When does the {name} enter?", e.first, e.last))
            elif e.obj == k and e.kind == "leave":
                choices.append(("leave", f"When does the {name} leave?", e.first, e.last))
            elif e.obj == k and e.kind == "move":
                choices.append(("move", f"When does the {name} move?", e.first, e.last))
        kind, text, a, b = choices[int(rng.integers(len(choices)))]
        span = [a / T, (b + 1) / T]
        add("temporal_grounding", text, f"From {fmt_time(a, T)} to {fmt_time(b, T, end=True)}.",
            {"object": name, "event": kind}, spans=[span])

    # masks of the visible pixels
    k = int(rng.integers(len(shapes)))
    name = shapes[k].name
    if scene.is_video:
        masks = [{"frame": t, "mask": encode_mask(scene.visible(k, t))} for t in range(T)]
        add("segmentation", f"Segment the {name} in every frame.", f"Here is the mask of the {name} in every frame.",
            {"object": name}, masks=masks)
    else:
        add("segmentation", f"Segment the {name}.", f"Here is the mask of the {name}.", {"object": name},
            masks=encode_mask(scene.visible(k, 0)))

    # tracking from the first box: a shape that moves when there is one (a static one is tracked by
    # keeping its first box, which tells trackers apart from doing nothing on no sample)
    if scene.is_video:
        pool = [m for m, s in enumerate(shapes) if s.moves] or list(range(len(shapes)))
        k = pool[int(rng.integers(len(pool)))]
        s = shapes[k]
        init = mask_box(scene.visible(k, s.first))
        track = {
            "object": s.name, "init_frame": s.first, "init_box": list(init),
            "boxes": [{"frame": t, "box": (list(b) if (b := mask_box(scene.visible(k, t))) else None)}
                      for t in range(s.first, T)],
        }
        add("tracking", f"Track the object in the box {fmt_box(init)} of frame {s.first} through the video.",
            f"The object is the {s.name}; it is visible from frame {s.first} to frame {s.last}.",
            {"object": s.name}, tracks=[track])

    add("caption", f"Describe the {'video' if scene.is_video else 'image'} in detail.", " ".join(desc), {})
    if preference_pairs == "all":
        extra = np.random.default_rng([seed, scene.index, 2])
        for i, q in enumerate(questions):
            if i != picked:
                add_pair(q, extra)
    return samples


# ---------------------------------------------------------------- the whole benchmark


def split_of(index: int, num: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split of scene ``index`` of ``num``: the first scenes train, then val, then test."""
    total = float(sum(fractions))
    n_train = int(round(num * fractions[0] / total))
    n_val = int(round(num * fractions[1] / total))
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_val else "test"


def _write_scene(args) -> list[dict]:
    index, num, seed, frames, size, image_fraction, objects, max_speed, fractions, out_dir, preference_pairs = args
    scene = make_scene(index, seed, frames, size, image_fraction, objects, max_speed)
    split = split_of(index, num, fractions)
    if scene.is_video:
        rel = f"media/scene{index:06d}.npy"
        np.save(os.path.join(out_dir, rel), scene.frames())
    else:
        from PIL import Image

        rel = f"media/scene{index:06d}.png"
        Image.fromarray(scene.frames()[0]).save(os.path.join(out_dir, rel), compress_level=1)
    return scene_samples(scene, rel, split, seed, preference_pairs)


def synthesize(
    out_dir: str | os.PathLike,
    num: int,
    seed: int = 0,
    frames: int = 8,
    size: int = 64,
    image_fraction: float = 0.25,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int = 1,
    verbose: bool = False,
    preference_pairs: str = "one",
    objects: Sequence[int] = (2, 4),
    max_speed: int | None = None,
) -> dict:
    """Render ``num`` scenes (each gives about 8 image or 13 video samples)
    into ``out_dir``: ``{train,val,test}.jsonl``, ``media/`` and
    ``summary.json``. ``preference_pairs``: ``"one"`` preference pair per
    scene (the correct answer of a random question of the scene over one of
    its wrong options) or ``"all"`` (such a pair for every question: about 5
    per image, 7 per video; a superset of ``"one"``, every other sample
    unchanged). ``objects``: the least and most shapes in a scene (inclusive;
    by default 2 to 4: the benchmark; ``(1, 1)``, a scene of one shape, is its
    easiest form: no question then needs telling shapes apart, and none asks
    for an order of appearance). ``max_speed``: the fastest a shape moves, pixels a frame (default
    :func:`default_max_speed`: 2 at 32 and 64 pixels; faster shapes make tracking harder to do by keeping
    the first box). Returns the summary (counts per split, task, question
    type, answer type and localisation; plus timing, which summary.json leaves
    out so that the files of a seed are identical run to run)."""
    if num < 1:
        raise ValueError(f"num (the number of scenes) must be >= 1, got {num}")
    if frames < 4:
        raise ValueError(f"frames must be >= 4 for videos with events, got {frames}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
    if preference_pairs not in PREFERENCE_PAIRS:
        raise ValueError(f"preference_pairs must be one of {PREFERENCE_PAIRS}, got {preference_pairs!r}")
    objects = tuple(objects)
    if (len(objects) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in objects)
            or not 1 <= objects[0] <= objects[1] <= len(COLORS)):
        raise ValueError(f"objects is (least, most) shapes in a scene, integers with 1 <= least <= most <= "
                         f"{len(COLORS)} (one colour each), got {list(objects)}")
    max_speed = default_max_speed(size) if max_speed is None else max_speed
    if isinstance(max_speed, bool) or not isinstance(max_speed, int) or not 2 <= max_speed <= size // 4:
        raise ValueError(f"max_speed (pixels a frame) must be an integer from 2 to size // 4 = {size // 4}, "
                         f"got {max_speed!r}")
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits are three non-negative fractions (train, val, test), got {list(splits)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "media"), exist_ok=True)
    start = time.perf_counter()
    jobs = [(i, num, seed, frames, size, image_fraction, objects, max_speed, tuple(splits), out_dir, preference_pairs)
            for i in range(num)]
    handles = {s: open(os.path.join(out_dir, f"{s}.jsonl"), "w", encoding="utf-8") for s in SPLITS}
    counts = {key: Counter() for key in ("splits", "scenes", "tasks", "question_types", "answer_types", "localisation")}
    media = Counter()
    try:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
            results = pool.imap(_write_scene, jobs, chunksize=8)
        else:
            pool, results = None, map(_write_scene, jobs)
        for samples in results:
            split = samples[0]["meta"]["split"]
            counts["scenes"][split] += 1
            media["video" if samples[0]["media"].endswith(".npy") else "image"] += 1
            for sample in samples:
                handles[split].write(json.dumps(sample, separators=(",", ":")) + "\n")
                meta = sample["meta"]
                counts["splits"][split] += 1
                counts["tasks"][meta["task"]] += 1
                if meta["task"] == "qa":
                    counts["question_types"][meta["question_type"]] += 1
                    counts["answer_types"][meta["answer_type"]] += 1
                    counts["localisation"][meta["localisation"]] += 1
            if verbose and sum(counts["scenes"].values()) % 500 == 0:
                print(f"{sum(counts['scenes'].values())}/{num} scenes", file=sys.stderr)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        for h in handles.values():
            h.close()
    seconds = time.perf_counter() - start
    n_samples = sum(counts["splits"].values())
    summary = {
        "version": VERSION, "seed": seed, "frames": frames, "size": size, "image_fraction": image_fraction,
        "objects": list(objects), "max_speed": max_speed, "num_scenes": num, "split_fractions": [float(f) for f in splits],
        "num_samples": n_samples, "preference_pairs": preference_pairs,
        "media": dict(sorted(media.items())),
        "splits": {s: {"scenes": counts["scenes"][s], "samples": counts["splits"][s]} for s in SPLITS},
        "tasks": {t: counts["tasks"][t] for t in TASKS},
        "question_types": dict(sorted(counts["question_types"].items())),
        "answer_types": dict(sorted(counts["answer_types"].items())),
        "localisation": dict(sorted(counts["localisation"].items())),
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    summary["seconds"] = round(seconds, 3)
    summary["samples_per_second"] = round(n_samples / seconds, 1) if seconds > 0 else None
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpo data synth",
        description="Render the synthetic shapes benchmark (videos and images with exact ground truth).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, required=True, help="number of scenes (about 12 samples each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=8, help="frames per video (T)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width (H = W)")
    parser.add_argument("--image-fraction", type=float, default=0.25, help="share of scenes that are images")
    parser.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--workers", type=int, default=1, help="processes rendering scenes")
    parser.add_argument("--objects", type=int, nargs=2, default=(2, 4), metavar=("LEAST", "MOST"),
                        help="shapes in a scene (inclusive); 1 1 is the easiest form of the benchmark")
    parser.add_argument("--max-speed", type=int, default=None,
                        help="fastest a shape moves, pixels a frame (default 2, or size // 20 above 59 pixels)")
    parser.add_argument("--preference-pairs", choices=PREFERENCE_PAIRS, default="one",
                        help="preference pairs: one per scene (a random question's) or one per question")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tpo data synth --out DIR --num N --seed S [--frames T --size H]``:
    write the benchmark, print its summary as JSON, return 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = synthesize(
            args.out, args.num, args.seed, frames=args.frames, size=args.size, image_fraction=args.image_fraction,
            splits=args.splits, workers=args.workers, verbose=True, preference_pairs=args.preference_pairs,
            objects=tuple(args.objects), max_speed=args.max_speed,
        )
    except ValueError as err:  # synthesize checks its arguments before it writes anything
        parser.error(str(err))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
