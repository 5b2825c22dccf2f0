"""Readers of public annotation formats, from local files, into samples.

* :func:`read_llava` -- LLaVA instruction data (``.json`` list or ``.jsonl``
  of ``{id, image|video, conversations}``)
* :func:`read_refcoco` -- RefCOCO-style referring expressions: a COCO
  instances JSON and a JSON list of refs ``{ref_id, ann_id, image_id, split,
  sentences: [{sent}]}`` (the refs pickle converted to JSON)
* :func:`read_charades_sta` -- Charades-STA temporal grounding: lines
  ``vid start end##sentence`` and the videos' durations in seconds
* :func:`read_trl_preference` -- TRL preference JSONL ``{prompt, chosen,
  rejected}`` (plain strings or conversational message lists)

Each returns validated :class:`~tpo.data.schema.Sample` objects (media paths
resolved); write them with :func:`~tpo.data.schema.write_jsonl`, which makes
the paths relative to the output file. Every problem of an input file is
collected and raised as one ``ValueError`` naming the file, the line (JSONL
and text files, 1-based) or the entry (JSON lists, 0-based index), the sample
id and the field.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator, Mapping

from .schema import IMAGE_TOKEN, VIDEO_TOKEN, Problem, Sample, format_problems, validate_record
from .video import IMAGE_EXTENSIONS

ROLE_MAP = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class _Collector:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.samples: list[Sample] = []

    def add(self, line: int, sample_id: str | None, fld: str, message: str) -> None:
        self.problems.append(Problem(self.file, line, sample_id, fld, message))

    def sample(self, record: dict, line: int, check_media: bool) -> None:
        sample, problems = validate_record(record, self.file, line, root=os.getcwd(), check_media=check_media)
        self.problems.extend(problems)
        if sample is not None:
            self.samples.append(sample)

    def result(self) -> list[Sample]:
        if self.problems:
            raise ValueError(format_problems(self.file, self.problems))
        return self.samples


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err


def _json_lines(path: str, col: _Collector) -> Iterator[tuple[int, Any]]:
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist") from None
    with handle:
        for lineno, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as err:
                col.add(lineno, None, "<json>", f"not valid JSON: {err}")


def _abs(root: str, path: str) -> str:
    return os.path.abspath(os.path.join(root, path))


def _with_placeholder(text: str, token: str) -> str:
    """Put the media placeholder at the start of ``text`` unless it is there;
    LLaVA video data often writes ``<image>`` for a video."""
    if token == VIDEO_TOKEN:
        text = text.replace(IMAGE_TOKEN, VIDEO_TOKEN)
    return text if token in text else f"{token}\n{text}"


# ---------------------------------------------------------------- LLaVA


def read_llava(path: str | os.PathLike, media_root: str | os.PathLike | None = None,
               check_media: bool = False) -> list[Sample]:
    """LLaVA instruction data: a JSON list (or JSONL) of ``{id, image | video,
    conversations: [{from: human|gpt, value}]}``; media paths are relative to
    ``media_root`` (default: the file's folder). A missing placeholder is put
    at the start of the first human turn; ``<image>`` becomes ``<video>`` for a video."""
    path = os.fspath(path)
    root = os.fspath(media_root) if media_root is not None else os.path.dirname(os.path.abspath(path))
    col = _Collector(path)
    if path.endswith(".jsonl"):
        entries = list(_json_lines(path, col))
    else:
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: LLaVA data is a JSON list of samples, got {type(data).__name__}")
        entries = list(enumerate(data))
    for line, entry in entries:
        if not isinstance(entry, dict):
            col.add(line, None, "<entry>", f"a sample is an object, got {type(entry).__name__}")
            continue
        sid = entry.get("id")
        sid = str(sid) if sid is not None else None
        if sid is None:
            col.add(line, None, "id", "missing")
            continue
        media_keys = [k for k in ("image", "video") if k in entry]
        if len(media_keys) > 1:
            col.add(line, sid, "image", "a sample has an image or a video, not both")
            continue
        media, token = None, None
        if media_keys:
            value = entry[media_keys[0]]
            if isinstance(value, list):
                if len(value) != 1:
                    col.add(line, sid, media_keys[0], f"{len(value)} media items; samples hold one image or video")
                    continue
                value = value[0]
            if not isinstance(value, str):
                col.add(line, sid, media_keys[0], f"must be a path, got {type(value).__name__}")
                continue
            media = _abs(root, value)
            is_image = media_keys[0] == "image" and os.path.splitext(value)[1].lower() in IMAGE_EXTENSIONS
            token = IMAGE_TOKEN if is_image else VIDEO_TOKEN
        turns = entry.get("conversations")
        if not isinstance(turns, list) or not turns:
            col.add(line, sid, "conversations", "must be a non-empty list")
            continue
        conv, bad = [], False
        for i, turn in enumerate(turns):
            role = ROLE_MAP.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                col.add(line, sid, f"conversations[{i}]",
                        f"a turn is {{from: human|gpt, value: str}}, got {turn!r:.80}")
                bad = True
                continue
            conv.append({"from": role, "value": turn["value"]})
        if bad:
            continue
        if token is not None:
            first = next((t for t in conv if t["from"] == "human"), None)
            if first is not None:
                first["value"] = _with_placeholder(first["value"], token)
        record = {"id": sid, "conversations": conv}
        if media is not None:
            record["media"] = media
        col.sample(record, line, check_media)
    return col.result()


# ---------------------------------------------------------------- RefCOCO


def _coco_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, or RLE with list or string counts)
    as one RLE dict with a string ``counts``."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
    else:
        raise ValueError(f"segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def read_refcoco(
    instances: str | os.PathLike,
    refs: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str | None = None,
    masks: bool = True,
    check_media: bool = False,
) -> list[Sample]:
    """RefCOCO/RefCOCO+/RefCOCOg: one sample per referring sentence, with the
    referred object's box (normalised xyxy) and, when ``masks``, its mask as
    COCO RLE. ``refs`` is a JSON list of ``{ref_id, ann_id, image_id, split,
    sentences: [{sent}]}``; ``split`` keeps one split (``train``, ``val``, ``testA``...)."""
    instances, refs, image_root = os.fspath(instances), os.fspath(refs), os.fspath(image_root)
    coco = _load_json(instances)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{instances}: a COCO instances file is an object with 'images' and 'annotations'")
    images = {img["id"]: img for img in coco["images"]}
    anns = {ann["id"]: ann for ann in coco["annotations"]}
    ref_list = _load_json(refs)
    if not isinstance(ref_list, list):
        raise ValueError(f"{refs}: the refs file is a JSON list of refs, got {type(ref_list).__name__}")
    col = _Collector(refs)
    for idx, ref in enumerate(ref_list):
        if not isinstance(ref, dict):
            col.add(idx, None, "<entry>", f"a ref is an object, got {type(ref).__name__}")
            continue
        rid = ref.get("ref_id")
        sid = f"ref{rid}"
        if split is not None and ref.get("split") != split:
            continue
        ann = anns.get(ref.get("ann_id"))
        if ann is None:
            col.add(idx, sid, "ann_id", f"annotation {ref.get('ann_id')!r} is not in {instances}")
            continue
        image_id = ref.get("image_id", ann.get("image_id"))
        img = images.get(image_id)
        if img is None:
            col.add(idx, sid, "image_id", f"image {image_id!r} is not in {instances}")
            continue
        if ann.get("image_id") != image_id:
            col.add(idx, sid, "image_id",
                    f"annotation {ann['id']} belongs to image {ann.get('image_id')}, not {image_id}")
            continue
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            col.add(idx, sid, "sentences", "must be a non-empty list of {sent}")
            continue
        w, h = img["width"], img["height"]
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            col.add(idx, sid, "bbox", f"annotation {ann['id']}: bbox must be [x, y, w, h], got {bbox!r}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        box = [max(0.0, x / w), max(0.0, y / h), min(1.0, (x + bw) / w), min(1.0, (y + bh) / h)]
        mask = None
        if masks and ann.get("segmentation"):
            try:
                mask = _coco_rle(ann["segmentation"], h, w)
            except (ValueError, TypeError, KeyError) as err:
                col.add(idx, sid, "segmentation", f"annotation {ann['id']}: {err}")
                continue
        for j, sentence in enumerate(sentences):
            text = sentence.get("sent") if isinstance(sentence, dict) else sentence
            if not isinstance(text, str) or not text.strip():
                col.add(idx, f"{sid}-{j}", f"sentences[{j}]", "a sentence is {sent: str} or a string")
                continue
            record = {
                "id": f"{sid}-{j}",
                "media": _abs(image_root, img["file_name"]),
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nGive the bounding box of: {text.strip()}"},
                    {"from": "gpt", "value": "[" + ", ".join(f"{v:.3f}" for v in box) + "]"},
                ],
                "boxes": box,
                "meta": {"task": "grounding", "ref_id": rid, "ann_id": ann["id"], "image_id": image_id,
                         "split": ref.get("split"), "category_id": ann.get("category_id")},
            }
            if mask is not None:
                record["masks"] = mask
            col.sample(record, idx, check_media)
    return col.result()


# ---------------------------------------------------------------- Charades-STA


def _durations(durations: Mapping[str, float] | str | os.PathLike) -> dict[str, float]:
    if isinstance(durations, Mapping):
        return {str(k): float(v) for k, v in durations.items()}
    path = os.fspath(durations)
    if path.endswith(".json"):
        data = _load_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: durations JSON is an object {{video_id: seconds}}")
        return {str(k): float(v) for k, v in data.items()}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "id" not in reader.fieldnames or "length" not in reader.fieldnames:
                raise ValueError(f"{path}: a durations CSV has the columns 'id' and 'length' (Charades_v1_*.csv)")
            return {row["id"]: float(row["length"]) for row in reader}
    except FileNotFoundError:
        raise FileNotFoundError(f"durations file {path!r} does not exist") from None


def read_charades_sta(
    annotations: str | os.PathLike,
    durations: Mapping[str, float] | str | os.PathLike,
    video_root: str | os.PathLike,
    video_ext: str = ".mp4",
    check_media: bool = False,
) -> list[Sample]:
    """Charades-STA: lines ``vid start end##sentence`` (seconds) and each
    video's duration (a dict, a JSON ``{vid: seconds}`` or a Charades CSV with
    ``id`` and ``length``). Spans are normalised by the duration; an end past
    the duration (it happens in Charades-STA) is clipped to 1. Videos are
    ``video_root/vid + video_ext`` (``video_ext=""``: frame folders)."""
    annotations, video_root = os.fspath(annotations), os.fspath(video_root)
    lengths = _durations(durations)
    col = _Collector(annotations)
    try:
        handle = open(annotations, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{annotations!r} does not exist") from None
    with handle:
        for lineno, text in enumerate(handle, start=1):
            text = text.strip()
            if not text:
                continue
            head, sep, sentence = text.partition("##")
            parts = head.split()
            if not sep or len(parts) != 3 or not sentence.strip():
                col.add(lineno, None, "<line>", f"expected 'vid start end##sentence', got {text!r:.80}")
                continue
            vid = parts[0]
            sid = f"{vid}-{lineno}"
            try:
                start, end = float(parts[1]), float(parts[2])
            except ValueError:
                col.add(lineno, sid, "start/end", f"times must be numbers of seconds, got {parts[1]!r} {parts[2]!r}")
                continue
            if vid not in lengths:
                col.add(lineno, sid, "duration", f"no duration for video {vid!r}")
                continue
            dur = lengths[vid]
            if dur <= 0:
                col.add(lineno, sid, "duration", f"video {vid!r} has duration {dur}")
                continue
            if start < 0 or end <= start:
                col.add(lineno, sid, "start/end", f"needs 0 <= start < end, got {start} {end}")
                continue
            if start >= dur:
                col.add(lineno, sid, "start", f"starts at {start}s, past the video's end ({dur}s)")
                continue
            span = [start / dur, min(1.0, end / dur)]
            record = {
                "id": sid,
                "media": _abs(video_root, vid + video_ext),
                "conversations": [
                    {"from": "human", "value": f"{VIDEO_TOKEN}\nWhen does \"{sentence.strip()}\" happen in the video?"},
                    {"from": "gpt", "value": f"From {span[0]:.2f} to {span[1]:.2f}."},
                ],
                "spans": [span],
                "meta": {"task": "temporal_grounding", "video": vid, "start_s": start, "end_s": end, "duration_s": dur},
            }
            col.sample(record, lineno, check_media)
    return col.result()


# ---------------------------------------------------------------- TRL preference


def _message_text(content: Any) -> str | None:
    """The text of a message's content: a string, or TRL vision parts
    ``[{type: image}, {type: text, text}]`` with images as ``<image>``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict):
                return None
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif part.get("type") in ("image", "video"):
                out.append(IMAGE_TOKEN if part["type"] == "image" else VIDEO_TOKEN)
            else:
                return None
        return "\n".join(out)
    return None


def read_trl_preference(path: str | os.PathLike, media_root: str | os.PathLike | None = None,
                        check_media: bool = False) -> list[Sample]:
    """TRL preference JSONL: ``{prompt, chosen, rejected}``, each a string or
    (conversational) a list of ``{role, content}`` messages; optional ``id``,
    ``image``/``images`` (one path) or ``video``, relative to ``media_root``
    (default: the file's folder). Other keys go into ``meta``. The prompt
    becomes the conversation (ending with its last user turn), the pair the
    sample's ``preference``."""
    path = os.fspath(path)
    root = os.fspath(media_root) if media_root is not None else os.path.dirname(os.path.abspath(path))
    col = _Collector(path)
    for lineno, rec in _json_lines(path, col):
        if not isinstance(rec, dict):
            col.add(lineno, None, "<line>", f"a record is an object, got {type(rec).__name__}")
            continue
        sid = str(rec.get("id", f"{os.path.splitext(os.path.basename(path))[0]}-{lineno}"))
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            for k in missing:
                col.add(lineno, sid, k, "missing")
            continue
        prompt = rec["prompt"]
        conv: list[dict] = []
        if isinstance(prompt, str):
            conv = [{"from": "human", "value": prompt}]
        elif isinstance(prompt, list):
            for i, msg in enumerate(prompt):
                role = ROLE_MAP.get(msg.get("role")) if isinstance(msg, dict) else None
                text = _message_text(msg.get("content")) if isinstance(msg, dict) else None
                if role is None or text is None:
                    col.add(lineno, sid, f"prompt[{i}]",
                            f"a message is {{role: user|assistant, content}}, got {msg!r:.80}")
                    conv = []
                    break
                conv.append({"from": role, "value": text})
        else:
            col.add(lineno, sid, "prompt", f"must be a string or a list of messages, got {type(prompt).__name__}")
        if not conv:
            continue
        answers = {}
        for key in ("chosen", "rejected"):
            value = rec[key]
            if isinstance(value, list):
                texts = [_message_text(m.get("content")) for m in value
                         if isinstance(m, dict) and ROLE_MAP.get(m.get("role")) == "gpt"]
                value = texts[-1] if texts else None
            if not isinstance(value, str):
                col.add(lineno, sid, key, "must be a string or a list of messages with an assistant message")
                continue
            answers[key] = value
        if len(answers) != 2:
            continue
        record: dict[str, Any] = {"id": sid}
        media_keys = [k for k in ("image", "images", "video") if rec.get(k)]
        if len(media_keys) > 1:
            col.add(lineno, sid, media_keys[1], "a record has one image or one video")
            continue
        if media_keys:
            value = rec[media_keys[0]]
            if isinstance(value, list):
                if len(value) != 1 or not isinstance(value[0], str):
                    col.add(lineno, sid, media_keys[0], "one media path per record is supported")
                    continue
                value = value[0]
            if not isinstance(value, str):
                col.add(lineno, sid, media_keys[0], f"must be a path, got {type(value).__name__}")
                continue
            record["media"] = _abs(root, value)
            token = VIDEO_TOKEN if media_keys[0] == "video" else IMAGE_TOKEN
            first = next((t for t in conv if t["from"] == "human"), None)
            if first is not None and IMAGE_TOKEN not in first["value"] and VIDEO_TOKEN not in first["value"]:
                first["value"] = f"{token}\n{first['value']}"
        record["conversations"] = conv
        record["preference"] = {"prompt": conv[-1]["value"], "chosen": answers["chosen"],
                                "rejected": answers["rejected"]}
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt", "chosen", "rejected", *media_keys)}
        record["meta"] = {"task": "preference", **extra}
        col.sample(record, lineno, check_media)
    return col.result()
