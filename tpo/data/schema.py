"""The sample format: one JSON object per line of a JSONL file.

See ``docs/data_format.md`` for the full description. In short::

    {"id": "s1-3",
     "media": "media/s1.npy",                      # image | [frames] | folder | .npy | video file
     "conversations": [{"from": "human", "value": "<video>\\nWhen does the red circle enter?"},
                       {"from": "gpt", "value": "From 0.25 to 0.38."}],
     "boxes": [{"frame": 2, "box": [0.1, 0.2, 0.3, 0.4]}],   # image: [x1, y1, x2, y2] or [[...], ...]
     "spans": [[0.25, 0.375]],
     "masks": [{"frame": 2, "mask": {"size": [64, 64], "counts": "..."}}],  # image: RLE dict or PNG path
     "tracks": [{"init_frame": 0, "init_box": [...], "boxes": [{"frame": 0, "box": [...]}, {"frame": 1, "box": null}]}],
     "preference": {"prompt": "...", "chosen": "...", "rejected": "...", "judge": "..."},
     "description": ["The video shows ...", "At 0.25, ..."],
     "meta": {...}}

:func:`load_samples` reads and validates a whole file: every problem of every
line is collected (file, line, sample id, field) and reported in one
``ValueError`` before anything trains on the data.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .video import IMAGE_EXTENSIONS, VIDEO_KINDS, media_kind, media_size, video_frame_count

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ROLES = ("human", "gpt")

TOP_LEVEL_FIELDS = (
    "id", "media", "conversations", "boxes", "spans", "masks", "tracks", "preference", "description", "meta",
)
REQUIRED_FIELDS = ("id", "conversations")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "judge")
TRACK_FIELDS = ("init_frame", "init_box", "boxes", "object")

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------- COCO RLE


def rle_string_to_counts(counts: str) -> list[int]:
    """Decode the compressed COCO RLE string (``pycocotools``' ``counts``) into
    run lengths, raising ``ValueError`` on a malformed string."""
    values: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("the counts string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} at position {p} is not a COCO RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        values.append(x)
    return values


def check_rle(rle: Any) -> str | None:
    """Why ``rle`` is not a valid COCO RLE dict (``size`` ``[h, w]``, ``counts``
    a compressed string or a list of run lengths summing to ``h * w``), or ``None``."""
    if not isinstance(rle, dict):
        return f"must be a COCO RLE dict with 'size' and 'counts', got {type(rle).__name__}"
    extra = sorted(set(rle) - {"size", "counts"})
    if extra or "size" not in rle or "counts" not in rle:
        return f"a COCO RLE dict has exactly the keys 'size' and 'counts', got {sorted(rle)}"
    size = rle["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return f"size must be [height, width] of positive integers, got {size!r}"
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            runs = rle_string_to_counts(counts)
        except ValueError as err:
            return f"counts is not a valid compressed RLE string: {err}"
    elif isinstance(counts, list):
        if not all(_is_int(v) for v in counts):
            return "counts must be a string or a list of integers"
        runs = counts
    else:
        return f"counts must be a string or a list of integers, got {type(counts).__name__}"
    if any(v < 0 for v in runs):
        return "counts has a negative run length"
    if sum(runs) != size[0] * size[1]:
        return f"run lengths sum to {sum(runs)}, not height * width = {size[0] * size[1]}"
    return None


def encode_mask(mask: np.ndarray) -> dict:
    """A bool/0-1 mask ``[H, W]`` as a COCO RLE dict with a compressed string ``counts``."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask takes one [H, W] mask, got shape {list(mask.shape)}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """A COCO RLE dict (string or list ``counts``) as a bool mask ``[H, W]``."""
    problem = check_rle(rle)
    if problem:
        raise ValueError(f"bad COCO RLE: {problem}")
    h, w = rle["size"]
    counts = rle["counts"]
    runs = rle_string_to_counts(counts) if isinstance(counts, str) else counts
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in runs:
        if value:
            flat[pos:pos + run] = True
        pos += run
        value = not value
    return flat.reshape(w, h).T.copy()  # COCO RLE runs go down the columns


def load_mask_png(path: str) -> np.ndarray:
    """A mask PNG (non-zero pixels are the mask) as bool ``[H, W]``."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return arr != 0


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Source:
    """Where a sample came from: a JSONL file and its 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Media:
    """One image or one video. ``kind`` is one of ``image``, ``frames`` (a list
    of frame files), ``folder``, ``npy``, ``video_file``; ``paths`` are
    resolved (absolute, or relative to the working directory); ``raw`` is the
    value as written in the file."""

    kind: str
    paths: tuple[str, ...]
    raw: str | list[str]

    @property
    def is_video(self) -> bool:
        return self.kind in VIDEO_KINDS

    @property
    def placeholder(self) -> str:
        return VIDEO_TOKEN if self.is_video else IMAGE_TOKEN


@dataclass
class Turn:
    """One conversation turn; ``role`` is ``human`` or ``gpt`` (the JSON key is ``from``)."""

    role: str
    value: str

    def to_dict(self) -> dict:
        return {"from": self.role, "value": self.value}


@dataclass
class FrameBox:
    """A normalised ``xyxy`` box on ``frame`` (``None`` for an image). In a
    track, ``box`` is ``None`` on frames where the object is not visible."""

    box: Box | None
    frame: int | None = None


@dataclass
class FrameMask:
    """A mask on ``frame`` (``None`` for an image): a COCO RLE dict, or the
    resolved path of a PNG whose non-zero pixels are the mask."""

    mask: dict | str
    frame: int | None = None

    def decode(self) -> np.ndarray:
        """The mask as bool ``[H, W]``."""
        return load_mask_png(self.mask) if isinstance(self.mask, str) else decode_mask(self.mask)


@dataclass
class Track:
    """One object's track: its box on ``init_frame`` and its box per frame."""

    init_frame: int
    init_box: Box
    boxes: list[FrameBox]
    object: str | None = None


@dataclass
class Preference:
    """A preference pair for the prompt: ``chosen`` is preferred to ``rejected``;
    ``judge`` says who decided (a name, or a dict with the judge's details)."""

    prompt: str
    chosen: str
    rejected: str
    judge: str | dict | None = None


@dataclass
class Sample:
    """One validated sample (see the module doc for the JSON form)."""

    id: str
    conversations: list[Turn]
    media: Media | None = None
    boxes: list[FrameBox] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    masks: list[FrameMask] = field(default_factory=list)
    tracks: list[Track] = field(default_factory=list)
    preference: Preference | None = None
    description: list[str] | None = None
    meta: dict = field(default_factory=dict)
    source: Source | None = None

    def to_dict(self, relative_to: str | None = None) -> dict:
        """The JSON form. Media and mask paths are written relative to the
        folder ``relative_to`` when given, else as they were resolved."""

        def rel(path: str) -> str:
            return os.path.relpath(path, relative_to) if relative_to else path

        out: dict[str, Any] = {"id": self.id}
        if self.media is not None:
            paths = [rel(p) for p in self.media.paths]
            out["media"] = paths if self.media.kind == "frames" else paths[0]
        out["conversations"] = [t.to_dict() for t in self.conversations]
        video = self.media is not None and self.media.is_video
        if self.boxes:
            out["boxes"] = (
                [{"frame": b.frame, "box": list(b.box)} for b in self.boxes]
                if video else [list(b.box) for b in self.boxes]
            )
        if self.spans:
            out["spans"] = [list(s) for s in self.spans]
        if self.masks:
            def mask_value(m: FrameMask):
                return rel(m.mask) if isinstance(m.mask, str) else m.mask

            out["masks"] = (
                [{"frame": m.frame, "mask": mask_value(m)} for m in self.masks]
                if video else mask_value(self.masks[0])
            )
        if self.tracks:
            out["tracks"] = [
                {
                    **({"object": t.object} if t.object is not None else {}),
                    "init_frame": t.init_frame,
                    "init_box": list(t.init_box),
                    "boxes": [{"frame": b.frame, "box": None if b.box is None else list(b.box)} for b in t.boxes],
                }
                for t in self.tracks
            ]
        if self.preference is not None:
            p = self.preference
            out["preference"] = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            if p.judge is not None:
                out["preference"]["judge"] = p.judge
        if self.description is not None:
            out["description"] = list(self.description)
        if self.meta:
            out["meta"] = self.meta
        return out


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample."""

    file: str
    line: int
    sample_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        sid = repr(self.sample_id) if self.sample_id is not None else "(no id)"
        return f"{self.file}:{self.line}: sample {sid}: field {self.field!r}: {self.message}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    """Builds a :class:`Sample` from one JSON object, collecting every problem."""

    def __init__(self, record: Any, file: str, line: int, root: str, check_media: bool):
        self.record, self.file, self.line, self.root, self.check_media = record, file, line, root, check_media
        self.problems: list[Problem] = []
        self.sample_id: str | None = None
        self.num_frames: int | None = None
        self.size: tuple[int, int] | None = None

    def problem(self, fld: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.line, self.sample_id, fld, message))

    def resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.root, os.path.expanduser(path)))

    # -- pieces

    def box(self, value: Any, fld: str) -> Box | None:
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
            self.problem(fld, f"a box is [x1, y1, x2, y2] of 4 finite numbers, got {value!r}")
            return None
        x1, y1, x2, y2 = (float(v) for v in value)
        bad = False
        if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
            self.problem(fld, f"box {list(value)} is out of range: coordinates are normalised to [0, 1]")
            bad = True
        if x2 <= x1 or y2 <= y1:
            self.problem(fld, f"box {list(value)} needs x1 < x2 and y1 < y2 (xyxy order, positive size)")
            bad = True
        return None if bad else (x1, y1, x2, y2)

    def frame_index(self, value: Any, fld: str) -> int | None:
        if not _is_int(value) or value < 0:
            self.problem(fld, f"a frame is an integer >= 0, got {value!r}")
            return None
        if self.num_frames is not None and value >= self.num_frames:
            self.problem(fld, f"frame {value} is past the end of the video ({self.num_frames} frames)")
            return None
        return value

    def text(self, value: Any, fld: str) -> str | None:
        if not isinstance(value, str):
            self.problem(fld, f"must be a string, got {type(value).__name__}")
            return None
        return value

    def unknown_keys(self, obj: dict, allowed: Sequence[str], fld: str) -> None:
        for key in obj:
            if key not in allowed:
                self.problem(f"{fld}.{key}" if fld else str(key), f"unknown field; allowed: {', '.join(allowed)}")

    # -- fields

    def media(self, value: Any) -> tuple[Media | None, bool]:
        """``(media, ok)``: a missing file still gives a Media of the kind its
        name implies, so that the rest of the sample is checked too."""
        if value is None:
            return None, True
        if isinstance(value, str):
            if not value:
                self.problem("media", "an empty path")
                return None, False
            path = self.resolve(value)
            exists = os.path.exists(path)
            ext = os.path.splitext(value)[1].lower()
            if not exists and not ext:
                kind = "folder"
            else:
                try:
                    kind = media_kind(path) if exists else media_kind(value)
                except ValueError as err:
                    self.problem("media", str(err))
                    return None, False
            media = Media(kind, (path,), value)
            if not exists:
                self.problem("media", f"{value!r} does not exist (looked for {path!r})")
                return media, False
        elif isinstance(value, list):
            if not value or not all(isinstance(v, str) and v for v in value):
                self.problem("media", "a list of frame paths must be a non-empty list of non-empty strings")
                return None, False
            not_images = [v for v in value if os.path.splitext(v)[1].lower() not in IMAGE_EXTENSIONS]
            if not_images:
                self.problem("media",
                             f"frames must be image files ({', '.join(IMAGE_EXTENSIONS)}), got {not_images[0]!r}")
                return None, False
            media = Media("frames", tuple(self.resolve(v) for v in value), list(value))
            missing = [v for v, p in zip(value, media.paths) if not os.path.isfile(p)]
            if missing:
                self.problem("media", f"{len(missing)} frame file(s) do not exist, first {missing[0]!r}")
                return media, False
        else:
            self.problem("media", f"must be a path or a list of frame paths, got {type(value).__name__}")
            return None, False
        if self.check_media:
            try:
                if media.is_video:  # a video file: from its container's header only
                    self.num_frames = video_frame_count(media.kind, media.paths, decode=False)
                self.size = media_size(media.kind, media.paths)
            except ImportError:
                pass  # a video file without a decoder: reported when it is loaded
            except (OSError, ValueError) as err:
                self.problem("media", f"cannot be read: {err}")
                return media, False
        return media, True

    def conversations(self, value: Any, media: Media | None, has_preference: bool, media_known: bool) -> list[Turn]:
        if not isinstance(value, list) or not value:
            self.problem("conversations", "must be a non-empty list of {from, value} turns")
            return []
        turns: list[Turn] = []
        counts = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}
        for i, turn in enumerate(value):
            fld = f"conversations[{i}]"
            if not isinstance(turn, dict):
                self.problem(fld, f"a turn is an object {{from, value}}, got {type(turn).__name__}")
                continue
            self.unknown_keys(turn, ("from", "value"), fld)
            role, text = turn.get("from"), turn.get("value")
            if role not in ROLES:
                self.problem(f"{fld}.from", f"must be one of {', '.join(ROLES)}, got {role!r}")
            elif role != ROLES[i % 2]:
                self.problem(f"{fld}.from", f"turns alternate human, gpt, ... starting with human; got {role!r}")
            if not isinstance(text, str):
                self.problem(f"{fld}.value", f"must be a string, got {type(text).__name__}")
                continue
            for token in counts:
                n = text.count(token)
                if n and role == "gpt":
                    self.problem(f"{fld}.value", f"a gpt turn holds the media placeholder {token}")
                counts[token] += n
            if role in ROLES:
                turns.append(Turn(role, text))
        if has_preference and turns and turns[-1].role != "human":
            self.problem("conversations", "a sample with a preference ends with the human turn the pair answers")
        if not has_preference and turns and turns[-1].role != "gpt":
            self.problem("conversations", "must end with a gpt turn (or carry a 'preference' for its last human turn)")
        n_media = 0 if media is None else 1
        expected = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}
        if media is not None:
            expected[media.placeholder] = 1
        if media_known and counts != expected:
            what = "no media" if media is None else f"1 {'video' if media.is_video else 'image'}"
            self.problem(
                "conversations",
                f"placeholder count mismatch: {counts[IMAGE_TOKEN]} {IMAGE_TOKEN} and {counts[VIDEO_TOKEN]} "
                f"{VIDEO_TOKEN} for {what} ({n_media} media item(s)); expected "
                f"{expected[IMAGE_TOKEN]} {IMAGE_TOKEN} and {expected[VIDEO_TOKEN]} {VIDEO_TOKEN}",
            )
        return turns

    def framed(self, value: Any, fld: str, key: str) -> list[tuple[int | None, Any, str]]:
        """Entries ``{frame, <key>}`` of a per-frame list: ``(frame, value, field)``."""
        if not isinstance(value, list) or not value:
            self.problem(fld, f"for a video, a non-empty list of {{frame, {key}}}")
            return []
        out, seen = [], set()
        for i, entry in enumerate(value):
            efld = f"{fld}[{i}]"
            if not isinstance(entry, dict) or "frame" not in entry or key not in entry:
                self.problem(efld, f"must be an object {{frame, {key}}}, got {entry!r:.80}")
                continue
            self.unknown_keys(entry, ("frame", key), efld)
            frame = self.frame_index(entry["frame"], f"{efld}.frame")
            if frame is not None and frame in seen:
                self.problem(f"{efld}.frame", f"frame {frame} appears twice")
            seen.add(frame)
            out.append((frame, entry[key], f"{efld}.{key}"))
        return out

    def boxes(self, value: Any, media: Media | None) -> list[FrameBox]:
        if media is None:
            self.problem("boxes", "boxes need media")
            return []
        if media.is_video:
            return [FrameBox(b, f) for f, v, fld in self.framed(value, "boxes", "box") if (b := self.box(v, fld))]
        if isinstance(value, list) and value and all(isinstance(v, (list, tuple)) for v in value):
            return [FrameBox(b) for i, v in enumerate(value) if (b := self.box(v, f"boxes[{i}]"))]
        box = self.box(value, "boxes")
        return [FrameBox(box)] if box else []

    def spans(self, value: Any, media: Media | None) -> list[tuple[float, float]]:
        if media is None or not media.is_video:
            self.problem("spans", "temporal spans need a video")
            return []
        if not isinstance(value, list) or not value:
            self.problem("spans", "must be a non-empty list of [start, end]")
            return []
        out = []
        for i, span in enumerate(value):
            fld = f"spans[{i}]"
            if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(_is_number(v) for v in span)):
                self.problem(fld, f"a span is [start, end] of 2 finite numbers, got {span!r}")
                continue
            start, end = float(span[0]), float(span[1])
            ok = True
            if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
                self.problem(fld, f"span {list(span)} is out of range: spans are normalised to [0, 1] of the video")
                ok = False
            if end <= start:
                self.problem(fld, f"span {list(span)} needs start < end")
                ok = False
            if ok:
                out.append((start, end))
        return out

    def mask(self, value: Any, fld: str) -> dict | str | None:
        if isinstance(value, str):
            path = self.resolve(value)
            if not os.path.isfile(path):
                self.problem(fld, f"mask PNG {value!r} does not exist (looked for {path!r})")
                return None
            if self.check_media and self.size is not None:
                from .video import image_size

                try:
                    size = image_size(path)
                except OSError as err:
                    self.problem(fld, f"mask PNG {value!r} cannot be read: {err}")
                    return None
                if size != self.size:
                    self.problem(fld, f"mask PNG {value!r} is {size[0]}x{size[1]}, "
                                      f"the media {self.size[0]}x{self.size[1]}")
                    return None
            return path
        problem = check_rle(value)
        if problem:
            self.problem(fld, f"bad RLE: {problem}")
            return None
        if self.size is not None and tuple(value["size"]) != self.size:
            self.problem(fld, f"mask size {value['size']} differs from the media size {list(self.size)} "
                              "(height, width)")
            return None
        return value

    def masks(self, value: Any, media: Media | None) -> list[FrameMask]:
        if media is None:
            self.problem("masks", "masks need media")
            return []
        if media.is_video:
            return [FrameMask(m, f) for f, v, fld in self.framed(value, "masks", "mask") if (m := self.mask(v, fld))]
        mask = self.mask(value, "masks")
        return [FrameMask(mask)] if mask else []

    def tracks(self, value: Any, media: Media | None) -> list[Track]:
        if media is None or not media.is_video:
            self.problem("tracks", "tracks need a video")
            return []
        if not isinstance(value, list) or not value:
            self.problem("tracks", "must be a non-empty list of {init_frame, init_box, boxes}")
            return []
        out = []
        for i, track in enumerate(value):
            fld = f"tracks[{i}]"
            if not isinstance(track, dict):
                self.problem(fld, f"a track is an object {{init_frame, init_box, boxes}}, got {type(track).__name__}")
                continue
            self.unknown_keys(track, TRACK_FIELDS, fld)
            missing = [k for k in ("init_frame", "init_box", "boxes") if k not in track]
            if missing:
                self.problem(fld, f"missing {', '.join(missing)}")
                continue
            init_frame = self.frame_index(track["init_frame"], f"{fld}.init_frame")
            init_box = self.box(track["init_box"], f"{fld}.init_box")
            obj = track.get("object")
            if obj is not None and not isinstance(obj, str):
                self.problem(f"{fld}.object", f"must be a string, got {type(obj).__name__}")
            boxes = []
            for frame, box, bfld in self.framed(track["boxes"], f"{fld}.boxes", "box"):
                boxes.append(FrameBox(None if box is None else self.box(box, bfld), frame))
            if init_frame is not None and init_box is not None:
                at_init = [b for b in boxes if b.frame == init_frame]
                if at_init and at_init[0].box is None:
                    self.problem(f"{fld}.init_box", f"gives a box on frame {init_frame}, where the track's box is "
                                                    f"null (not visible); make init_frame a frame the object is on, "
                                                    f"or give its box there")
                elif at_init and not np.allclose(at_init[0].box, init_box, atol=1e-6):
                    self.problem(f"{fld}.init_box", f"differs from the track's box on frame {init_frame}")
                out.append(Track(init_frame, init_box, boxes, obj))
        return out

    def preference(self, value: Any) -> Preference | None:
        if not isinstance(value, dict):
            self.problem("preference",
                         f"must be an object {{prompt, chosen, rejected, judge}}, got {type(value).__name__}")
            return None
        self.unknown_keys(value, PREFERENCE_FIELDS, "preference")
        parts = {}
        for key in ("prompt", "chosen", "rejected"):
            if key not in value:
                self.problem(f"preference.{key}", "missing")
            else:
                parts[key] = self.text(value[key], f"preference.{key}")
        judge = value.get("judge")
        if judge is not None and not isinstance(judge, (str, dict)):
            self.problem("preference.judge", f"must be a string or an object, got {type(judge).__name__}")
        if any(parts.get(k) is None for k in ("prompt", "chosen", "rejected")):
            return None
        if parts["chosen"] == parts["rejected"]:
            self.problem("preference", "chosen and rejected are the same text")
        return Preference(parts["prompt"], parts["chosen"], parts["rejected"], judge)

    # -- the whole sample

    def sample(self) -> Sample | None:
        rec = self.record
        if not isinstance(rec, dict):
            self.problem("<line>", f"a sample is a JSON object, got {type(rec).__name__}")
            return None
        sid = rec.get("id")
        if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid):
            self.sample_id = str(sid)
        else:
            self.problem("id", f"must be a non-empty string, got {sid!r}")
        self.unknown_keys(rec, TOP_LEVEL_FIELDS, "")
        if "conversations" not in rec:
            self.problem("conversations", "missing")
        media, media_ok = self.media(rec.get("media"))
        media_known = media_ok or media is not None
        preference = self.preference(rec["preference"]) if "preference" in rec else None
        turns = (
            self.conversations(rec["conversations"], media, "preference" in rec, media_known)
            if "conversations" in rec else []
        )
        if preference is not None and turns and turns[-1].role == "human" and preference.prompt != turns[-1].value:
            self.problem("preference.prompt", "differs from the last human turn of conversations")
        sample = Sample(id=self.sample_id or "", conversations=turns, media=media, source=Source(self.file, self.line))
        if media_known:
            if "boxes" in rec:
                sample.boxes = self.boxes(rec["boxes"], media)
            if "spans" in rec:
                sample.spans = self.spans(rec["spans"], media)
            if "masks" in rec:
                sample.masks = self.masks(rec["masks"], media)
            if "tracks" in rec:
                sample.tracks = self.tracks(rec["tracks"], media)
        sample.preference = preference
        if "description" in rec:
            desc = rec["description"]
            if isinstance(desc, str) and desc:
                sample.description = [desc]
            elif isinstance(desc, list) and desc and all(isinstance(s, str) and s for s in desc):
                sample.description = list(desc)
            else:
                self.problem("description", "must be a non-empty string or a non-empty list of sentences")
        if "meta" in rec:
            if isinstance(rec["meta"], dict):
                sample.meta = rec["meta"]
            else:
                self.problem("meta", f"must be an object, got {type(rec['meta']).__name__}")
        return None if self.problems else sample


def validate_record(
    record: Any, file: str = "<memory>", line: int = 0, root: str | None = None, check_media: bool = True
) -> tuple[Sample | None, list[Problem]]:
    """Check one sample object: ``(sample, [])`` when valid, else ``(None,
    problems)``. Relative paths are resolved against ``root`` (default: the
    folder of ``file``). ``check_media`` also opens media headers (frame
    counts, sizes)."""
    if root is None:
        root = os.path.dirname(os.path.abspath(file)) if file != "<memory>" else os.getcwd()
    checker = _Checker(record, file, line, root, check_media)
    sample = checker.sample()
    return sample, checker.problems


def read_samples(path: str | os.PathLike, check_media: bool = True) -> tuple[list[Sample], list[Problem]]:
    """Every valid sample of a JSONL file and every problem found in it
    (blank lines are skipped; ids must be unique)."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    samples: list[Sample] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"sample file {path!r} does not exist") from None
    with handle:
        for lineno, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(Problem(path, lineno, None, "<json>", f"not valid JSON: {err}"))
                continue
            sample, found = validate_record(record, path, lineno, root, check_media)
            problems.extend(found)
            sid = record.get("id") if isinstance(record, dict) else None
            if isinstance(sid, (str, int)) and not isinstance(sid, bool):
                sid = str(sid)
                if sid in seen:
                    problems.append(Problem(path, lineno, sid, "id", f"duplicate id, first on line {seen[sid]}"))
                else:
                    seen[sid] = lineno
            if sample is not None:
                samples.append(sample)
    return samples, problems


def format_problems(path: str, problems: Sequence[Problem], limit: int = 200) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s) in {path}:\n{shown}{more}"


def load_samples(path: str | os.PathLike, check_media: bool = True) -> list[Sample]:
    """Read and validate a JSONL file of samples; raise one ``ValueError``
    listing every problem (file:line, sample id, field) if there is any."""
    samples, problems = read_samples(path, check_media)
    if problems:
        raise ValueError(format_problems(os.fspath(path), problems))
    return samples


def write_jsonl(records: Iterable[dict | Sample], path: str | os.PathLike) -> int:
    """Write samples (dicts or :class:`Sample`) as JSONL, atomically (a
    temporary file beside it, fsync, rename, fsync the folder: a reader never
    sees half a file); a Sample's paths are written relative to the file's
    folder. Returns the number written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for rec in records:
            obj = rec.to_dict(relative_to=folder) if isinstance(rec, Sample) else rec
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)
    return n


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a file created or renamed in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
