"""The evaluation loop: a model answers every sample of a dataset, and the
answers are scored with the metrics the papers report.

A :class:`~tpo.models.tpo_model.TPOModel` answers grounding questions with its
task heads (when it emits a task token); any other model answers in text, and
boxes (``[x1, y1, x2, y2]``) and spans (``from a to b``) are read from it, so an
SFT-only baseline and a TPO model are scored on the same samples.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from tpo.data.collate import track_prompt

from .metrics import box_iou, mask_iou, qa_correct, span_iou, success_auc

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
_SPAN = re.compile(r"from\s+" + _NUMBER + r"\s+to\s+" + _NUMBER, re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<image>\n?|<video>\n?")
_FRAME_BOX = re.compile(r"(?:frame\s+(\d+)\s*:\s*)?" + _BOX.pattern, re.IGNORECASE)  # "frame 3: [...]"


def parse_box(text: str) -> np.ndarray | None:
    """The first ``[x1, y1, x2, y2]`` in ``text``, or None."""
    match = _BOX.search(text)
    return None if match is None else np.array([float(v) for v in match.groups()])


def parse_span(text: str) -> np.ndarray | None:
    """The first ``from a to b`` in ``text``, or None."""
    match = _SPAN.search(text)
    return None if match is None else np.array([float(v) for v in match.groups()])


def _text_box(text: str, item: dict) -> tuple[np.ndarray | None, torch.Tensor]:
    """A text answer's first box and the box it is scored against: the annotated box of the source frame
    its ``frame N:`` label names (as the reference answers of videos write them), sampled or not, when
    there is one; else the first annotated box on the sampled frames (``item["boxes"][0]``)."""
    match = _FRAME_BOX.search(text)
    pred = None if match is None else np.array([float(v) for v in match.groups()[1:]])
    frames = item.get("source_box_frames")
    if match is not None and match.group(1) is not None and frames is not None:
        hit = (torch.as_tensor(frames) == int(match.group(1))).nonzero()
        if len(hit):
            return pred, item["source_boxes"][int(hit[0, 0])]
    return pred, item["boxes"][0]


def _question(item: dict) -> str:
    human = next(turn["value"] for turn in item["conversations"] if turn["from"] == "human")
    return _PLACEHOLDER.sub("", human).strip()


@torch.no_grad()
def evaluate(model, dataset: Iterable[dict], max_new_tokens: int = 48, limit: int | None = None,
             predictions: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score ``model`` on the items of a :class:`~tpo.data.datasets.SampleDataset`.

    Returns ``qa/accuracy``; ``box/acc@0.5`` and ``box/miou`` (a grounding
    sample's first annotated box on the sampled frames; a text answer's first
    box against the box of the frame its ``frame N:`` label names, when
    annotated); ``temporal/R@{0.3,0.5,0.7}`` and
    ``temporal/mIoU``; ``mask/miou`` (mean over annotated sampled frames);
    ``track/auc`` (the OTB success AUC of a tracking sample's first track, over
    the sampled frames it is visible on; a TPO model is given its box on the
    first of them as the box prompt; text answers are not read for tracks); the
    counts of each kind (``count/unscored`` and ``unscored/<task>``: the
    samples not scored, not answered either: captions, preference pairs, task
    samples without their annotation on a sampled frame), and ``*/unanswered``: samples whose answer held no
    box, span or mask (scored as IoU 0). For a TPO model, task assignment:
    ``assign/accuracy`` (the answer ran exactly the heads trained on its
    task's annotation, and none for a question) and ``assign/<task>`` per
    task; ``None`` for other models.

    ``predictions``: a ``.jsonl`` path that receives one line per scored
    sample (its id, task, question, the model's text, the task heads it ran,
    what was scored against what, and the score), written atomically once
    all are scored.
    """
    from tpo.models.tpo_model import TPOModel

    check_predictions_path(predictions)
    tokenizer = getattr(model, "tokenizer", None)
    frames = getattr(getattr(model, "processor", None), "num_frames", None)
    if tokenizer is not None and hasattr(dataset, "samples"):  # a SampleDataset: checked before any answer
        check_answer_budget(tokenizer, dataset, max_new_tokens, limit)
        _check_frames(getattr(dataset, "num_frames", None), frames)
    model.eval()
    is_tpo = isinstance(model, TPOModel)

    def answer(item: dict) -> tuple[str, dict]:
        if tokenizer is not None and not hasattr(dataset, "samples"):  # any other iterable: item by item
            _check_budget(tokenizer, [(item["conversations"], item.get("meta") or {}, item.get("id"))], max_new_tokens)
        if item["media_type"] == "video":
            _check_frames(item["media"].shape[0], frames, item.get("id"))
        media = {"image" if item["media_type"] == "image" else "video": item["media"]}
        if is_tpo:
            inputs = {"output_size": tuple(item["media"].shape[-2:])}
            prompt = _track_prompt(item)
            if prompt is not None:  # a box on one of the frames, as `tpo chat --input-box/--input-frame` gives it
                inputs["init_frames"] = torch.tensor([prompt[0]])
            result = model.predict(_question(item), max_new_tokens=max_new_tokens,
                                   input_box=None if prompt is None else prompt[1].tolist(), head_inputs=inputs,
                                   **media)
            return result["text"], result["tasks"]
        return model.chat(_question(item), max_new_tokens=max_new_tokens, **media), {}

    expected = None
    if is_tpo:  # the heads a task's question should run: those trained on its annotation
        expected = {task: sorted(n for n, t in model.tasks.items() if t["annotation"] == kind)
                    for task, kind in _TASK_ANNOTATION.items()}
        expected["qa"] = []
    return _score(dataset, answer, limit, predictions, expected)


def _check_frames(given: int | None, model_frames: int | None, sample=None) -> None:
    """A video's frames must be the model's: its per-frame masks and tracks are scored frame by frame against
    the sample's, and the model resamples any other number of frames to its own."""
    if given is None or model_frames is None or given == model_frames:
        return
    where = "the dataset samples" if sample is None else f"sample {sample!r} has"
    raise ValueError(f"{where} {given} frames per video but the model reads {model_frames}: build the dataset with "
                     f"num_frames={model_frames} (data.<split>.num_frames; `tpo eval` takes the model's)")


_TASK_ANNOTATION = {"grounding": "boxes", "temporal_grounding": "spans", "segmentation": "masks",
                    "tracking": "tracks"}
SCORED_TASKS = ("qa", *_TASK_ANNOTATION)


def _scorable(item: dict, task: str | None) -> bool:
    """Whether a sample is scored: a question, or a task sample with the annotation it is scored on."""
    if task == "qa":
        return True
    if task == "grounding":
        return len(item["boxes"]) > 0
    if task == "temporal_grounding":
        return len(item["spans"]) > 0
    if task == "segmentation":  # a video's masks: on a sampled frame
        valid = item.get("mask_valid")
        return item.get("masks") is not None and (valid is None or bool(torch.as_tensor(valid).any()))
    return task == "tracking" and _scored_track(item) is not None


def _track_prompt(item: dict) -> tuple[int, torch.Tensor] | None:
    """A tracking sample's box prompt: ``(frame, box)``, its scored track's own box on the first frame
    its object is on (:func:`~tpo.data.collate.track_prompt`, as trained); None for other samples."""
    track = _scored_track(item)
    return None if track is None else track_prompt(track["boxes"], track["valid"])


def _scored_track(item: dict) -> dict | None:
    """The track a tracking sample is scored on (its first), when it is visible on a sampled frame."""
    if (item.get("meta") or {}).get("task") != "tracking" or not item.get("tracks"):
        return None
    track = item["tracks"][0]
    return track if bool(torch.as_tensor(track["valid"]).any()) else None


def _scored_reference(conversations: list[dict], task: str | None) -> str | None:
    """The part of a sample's reference answer that a text answer is scored on:
    all of it for a question, up to the first box or span for grounding; None
    where text is not scored (masks come only from a mask head)."""
    reference = next((turn["value"] for turn in conversations if turn["from"] == "gpt"), None)
    if reference is None or task not in ("qa", "grounding", "temporal_grounding"):
        return None
    if task != "qa":
        found = (_BOX if task == "grounding" else _SPAN).search(reference)
        reference = reference[:found.end()] if found else reference
    return reference


def _check_budget(tokenizer, samples: Iterable[tuple[list[dict], dict, Any]], max_new_tokens: int) -> None:
    """A ValueError when ``max_new_tokens`` cannot hold the scored part of the
    reference answer of one of ``samples`` (``(conversations, meta, id)``):
    such answers would be cut short and scored wrong or unanswered, whatever
    the model knows. It names the longest, so one fix is enough."""
    longest = (0, None, None, None)
    for conversations, meta, sample_id in samples:
        reference = _scored_reference(conversations, meta.get("task"))
        if reference is not None:
            needed = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
            longest = max(longest, (needed, sample_id, meta.get("task"), reference), key=lambda x: x[0])
    needed, sample_id, task, reference = longest
    if needed > max_new_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} cannot hold the reference answer of sample {sample_id!r} "
            f"({task}: {needed} tokens up to what is scored, {reference!r}); a model's answer would be "
            f"cut short and scored as wrong. Raise max_new_tokens (evaluation.max_new_tokens) to at least {needed}"
        )


def check_answer_budget(tokenizer, dataset, max_new_tokens: int, limit: int | None = None) -> None:
    """Check, from the annotations alone (no media is read), that answers of
    ``max_new_tokens`` tokens can hold the scored part of every reference
    answer among the first ``limit`` samples of a
    :class:`~tpo.data.datasets.SampleDataset`; a ValueError naming the longest
    and the budget it needs otherwise. :func:`evaluate` runs it first; run it
    yourself before training to fail early (``tpo experiment`` does)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: a positive int, got {max_new_tokens!r}")
    _check_budget(tokenizer, [([t.to_dict() for t in sample.conversations], sample.meta, sample.id)
                              for sample in dataset.samples[:limit]], max_new_tokens)


def evaluate_trivial(dataset: Iterable[dict], limit: int | None = None,
                     predictions: str | os.PathLike | None = None) -> dict[str, Any]:
    """The metrics of :func:`evaluate` for answers that look at nothing: option
    (A) for every question (right on the multiple-choice ones whose answer is
    A, wrong on the open ones), the whole frame as the box and as the mask,
    the whole clip as the span, the first box on every frame as the track. A model's number means something where it
    beats this one (on short clips, the whole clip already overlaps most spans)."""

    def answer(item: dict) -> tuple[str, dict]:
        heads = {"region": {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])},
                 "temporal": {"spans": torch.tensor([[0.0, 1.0]])}}
        if item.get("masks") is not None:
            heads["mask"] = {"masks": torch.ones_like(item["masks"], dtype=torch.bool)[None]}
        prompt = _track_prompt(item)
        if prompt is not None:  # a tracker that never moves: the prompt box on every frame
            heads["track"] = {"boxes": prompt[1].expand(len(item["tracks"][0]["valid"]), 4)[None]}
        return "A", heads

    return _score(dataset, answer, limit, predictions)


def check_predictions_path(path: str | os.PathLike | None, name: str = "predictions") -> None:
    """A ValueError unless ``path`` (the ``name`` option) is None or ends in ``.jsonl``."""
    if path is not None and Path(path).suffix != ".jsonl":
        raise ValueError(f"{name}: a .jsonl path, got {str(path)!r}")


def _values(x) -> list | None:
    return None if x is None else [round(float(v), 4) for v in np.asarray(x).reshape(-1)]


def _score(dataset: Iterable[dict], answer, limit: int | None,
           predictions: str | os.PathLike | None = None,
           expected_heads: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Score ``answer(item) -> (text, task head outputs)`` on the evaluated items of ``dataset``;
    with ``predictions``, write what was scored to that ``.jsonl`` file; with
    ``expected_heads`` (task -> the heads its question should run), score
    task assignment too."""
    check_predictions_path(predictions)  # before any answer is computed
    qa, boxes, spans, masks, tracks = [], [], [], [], []
    unanswered = {"box": 0, "temporal": 0, "mask": 0, "track": 0}
    records: list[dict] = []
    unscored: dict[str, int] = {}
    for n, item in enumerate(dataset):
        if limit is not None and n >= limit:
            break
        task = (item.get("meta") or {}).get("task")
        if not _scorable(item, task):  # counted, not answered
            unscored[str(task)] = unscored.get(str(task), 0) + 1
            continue
        text, heads = answer(item)
        meta = item["meta"]
        record = {"id": item.get("id"), "task": task, "question": _question(item), "text": text,
                  "heads": sorted(heads)}  # the task heads the answer ran (a TPO model's emitted task tokens)
        if task == "qa":
            qa.append(qa_correct(text, meta["answer"], meta.get("answer_type", "open"), meta.get("options")))
            record.update(answer=meta["answer"], score=float(qa[-1]))
        elif task == "grounding":
            if "region" in heads:  # a head's box: on the first sampled frame the object is annotated on
                pred, target = heads["region"]["boxes"][0].cpu().numpy(), item["boxes"][0]
            else:
                pred, target = _text_box(text, item)
            record.update(source="head" if "region" in heads else "text", target=_values(target))
            if pred is None or not np.all(np.isfinite(pred)) or pred[2] < pred[0] or pred[3] < pred[1]:
                unanswered["box"] += 1
                boxes.append(0.0)
            else:
                boxes.append(float(box_iou(pred[None], target[None].numpy())[0]))
            record.update(pred=_values(pred), score=boxes[-1])
        elif task == "temporal_grounding":
            pred = heads["temporal"]["spans"][0].cpu().numpy() if "temporal" in heads else parse_span(text)
            record.update(source="head" if "temporal" in heads else "text", target=_values(item["spans"][0]))
            if pred is None or not np.all(np.isfinite(pred)) or pred[1] < pred[0]:
                unanswered["temporal"] += 1
                spans.append(0.0)
            else:
                spans.append(float(span_iou(pred[None], item["spans"][:1].numpy())[0]))
            record.update(pred=_values(pred), score=spans[-1])
        elif task == "segmentation":
            target = item["masks"].bool()
            target = target[None] if target.dim() == 2 else target
            if "mask" not in heads:
                unanswered["mask"] += 1
                masks.append(0.0)
            else:
                pred = heads["mask"]["masks"][0].cpu().bool()
                pred = pred[None] if pred.dim() == 2 else pred
                valid = item.get("mask_valid")
                frames = range(target.shape[0]) if valid is None else [t for t in range(target.shape[0]) if valid[t]]
                masks.append(float(np.mean([mask_iou(pred[min(t, pred.shape[0] - 1)].numpy(), target[t].numpy())
                                            for t in frames])))
            record.update(source="head" if "mask" in heads else None, score=masks[-1])  # masks: only the IoU
        else:  # tracking
            track = _scored_track(item)
            gt = track["boxes"].double().numpy().copy()
            gt[~torch.as_tensor(track["valid"]).bool().numpy()] = np.nan  # frames the object is absent from
            pred = heads["track"]["boxes"][0].double().cpu().numpy() if "track" in heads else None
            record.update(source="head" if "track" in heads else None, init=_values(_track_prompt(item)[1]))
            if pred is None or pred.shape != gt.shape:  # text answers are not read for tracks
                unanswered["track"] += 1
                tracks.append(0.0)
            else:
                tracks.append(success_auc(pred, gt))
                visible = ~np.isnan(gt).any(axis=1)
                record.update(mean_iou=round(float(box_iou(pred[visible], gt[visible]).mean()), 4))
            record.update(score=tracks[-1])
        if expected_heads is not None:
            record["assigned"] = record["heads"] == expected_heads[task]
        records.append(record)
    spans_arr, boxes_arr = np.array(spans), np.array(boxes)
    report: dict[str, Any] = {
        "qa/accuracy": float(np.mean(qa)) if qa else None,
        "box/acc@0.5": float((boxes_arr >= 0.5).mean()) if boxes else None,
        "box/miou": float(boxes_arr.mean()) if boxes else None,
        "temporal/mIoU": float(spans_arr.mean()) if spans else None,
        "mask/miou": float(np.mean(masks)) if masks else None,
        "track/auc": float(np.mean(tracks)) if tracks else None,
        "count/qa": len(qa), "count/box": len(boxes), "count/temporal": len(spans), "count/mask": len(masks),
        "count/track": len(tracks),
        # task assignment (TPO models): the answer ran exactly the heads its task needs (none for a question)
        "assign/accuracy": (float(np.mean([r["assigned"] for r in records])) if expected_heads is not None
                            and records else None),
    }
    if expected_heads is not None:
        for task in SCORED_TASKS:
            mine = [r["assigned"] for r in records if r["task"] == task]
            report[f"assign/{task}"] = float(np.mean(mine)) if mine else None
    for t in (0.3, 0.5, 0.7):
        report[f"temporal/R@{t}"] = float((spans_arr >= t).mean()) if spans else None
    report.update({f"{k}/unanswered": v for k, v in unanswered.items()})
    # the samples not scored (captions, preference pairs, task samples without their annotation), by task
    report["count/unscored"] = sum(unscored.values())
    report.update({f"unscored/{task}": count for task, count in sorted(unscored.items())})
    if predictions is not None:
        from tpo.data.schema import write_jsonl

        write_jsonl(records, predictions)
    return report
