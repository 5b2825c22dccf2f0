"""Metrics: plain functions, and ``METRICS``-registered classes that
accumulate them over an evaluation (the mmengine ``BaseMetric`` protocol:
``process(data_batch, data_samples)`` per batch, ``evaluate(size)`` at the end).

* QA accuracy: multiple choice by the chosen option's letter; open answers by
  exact match after :func:`normalize_answer` (lowercase, punctuation and
  articles dropped, number words as digits)
* boxes: Acc@0.5 (IoU >= 0.5) and mean IoU
* temporal grounding: R@{0.3, 0.5, 0.7} (IoU >= threshold) and mean IoU
* masks: mean IoU, cumulative IoU and DAVIS J&F (J: region IoU, F: boundary F-measure)
* tracking: the OTB success plot (fraction of frames with IoU > threshold for
  thresholds 0, 0.05, ..., 1) and its area under the curve
* reward models: pairwise accuracy (chosen scored above rejected; a tie counts half)
"""
from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric

from tpo.registry import METRICS

# ---------------------------------------------------------------- QA

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase; punctuation to spaces; number words to digits; articles
    (a, an, the) dropped; whitespace collapsed. ``"The Two red circles."`` -> ``"2 red circles"``."""
    tokens = str(text).lower().translate(_PUNCT).split()
    return " ".join(NUMBER_WORDS.get(t, t) for t in tokens if t not in ARTICLES)


# a letter at the start counts when followed by ")", ".", ":", ",", a space or the end ("B.", "(B) dog", "B the
# red one"), except "A" or "I" before a lower-case word ("A cat", "I think": an article, a pronoun); after
# "answer is" also before a space when upper case ("the answer is B because", not "the answer is a dog")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])(?=$|[.):,\s])(?!(?<=[AI])\s+[a-z])")
_ANSWER_LETTER = re.compile(r"(?i:answer\s*(?:is)?\s*:?)\s*\(?([A-Za-z])(?=$|[.):,]|(?<=[A-Z])\s)")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def extract_choice(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a prediction chooses: (given ``options``) the text of
    one option, else a leading ``B``/``(B)``/``B.``/``B:``/``B the ...`` (not
    ``A`` of ``"A cat"``), ``answer is B``/``answer: (b)``, or a lone ``(B)``; ``None`` when
    it names none (or a letter past the options)."""
    text = str(prediction).strip()
    if options:  # an option's own text first: "A cat." is option "a cat", not letter A
        norm = normalize_answer(text)
        hits = [i for i, o in enumerate(options) if normalize_answer(o) == norm]
        if len(hits) == 1:
            return chr(65 + hits[0])
    for pattern in (_LEADING_LETTER, _ANSWER_LETTER):
        m = pattern.search(text)
        if m and (options is None or ord(m.group(1).upper()) - 65 < len(options)):
            return m.group(1).upper()
    found = set(_PAREN_LETTER.findall(text))
    return found.pop() if len(found) == 1 else None


def qa_correct(prediction: str, answer: str, answer_type: str = "open", options: Sequence[str] | None = None) -> bool:
    """Whether one answer is right. ``mc``: the chosen letter equals ``answer``
    (a letter, or the text of one of ``options``); ``open``: normalised exact match."""
    if answer_type == "mc":
        key = str(answer).strip()
        if options and not (len(key) == 1 and key.isalpha()):
            norm = [normalize_answer(o) for o in options]
            if normalize_answer(key) not in norm:
                raise ValueError(
                    f"the multiple-choice answer {answer!r} is neither a letter nor one of {list(options)}")
            key = chr(65 + norm.index(normalize_answer(key)))
        return extract_choice(prediction, options) == key.upper()
    if answer_type == "open":
        return normalize_answer(prediction) == normalize_answer(answer)
    raise ValueError(f"answer_type must be 'mc' or 'open', got {answer_type!r}")


def qa_accuracy(predictions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str] | str = "open",
                options: Sequence[Sequence[str] | None] | None = None) -> float:
    """The fraction of :func:`qa_correct` answers."""
    _same_length(predictions, answers, "predictions", "answers")
    if not predictions:
        raise ValueError("qa_accuracy needs at least one prediction")
    types = [answer_types] * len(answers) if isinstance(answer_types, str) else list(answer_types)
    opts = list(options) if options is not None else [None] * len(answers)
    return float(np.mean([qa_correct(p, a, t, o) for p, a, t, o in zip(predictions, answers, types, opts)]))


# ---------------------------------------------------------------- boxes and spans


def _same_length(a, b, na: str, nb: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{na} ({len(a)}) and {nb} ({len(b)}) differ in length")


def _boxes(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] xyxy boxes, got shape {list(arr.shape)}")
    return arr


def box_iou(pred, gt) -> np.ndarray:
    """IoU of matching rows of two ``[N, 4]`` xyxy box arrays -> ``[N]`` (0 for an empty union)."""
    p, g = _boxes(pred, "pred"), _boxes(gt, "gt")
    _same_length(p, g, "pred boxes", "gt boxes")
    iw = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    union = area(p) + area(g) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_metrics(pred, gt, thresholds: Sequence[float] = (0.5,)) -> dict[str, float]:
    """``acc@t`` (fraction of boxes with IoU >= t) per threshold and ``miou``."""
    ious = box_iou(pred, gt)
    if ious.size == 0:
        raise ValueError("box_metrics needs at least one box")
    return {**{f"acc@{t:g}": float((ious >= t).mean()) for t in thresholds}, "miou": float(ious.mean())}


def span_iou(pred, gt) -> np.ndarray:
    """IoU of matching rows of two ``[N, 2]`` (start, end) span arrays -> ``[N]``."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    p = p[None] if p.ndim == 1 else p
    g = g[None] if g.ndim == 1 else g
    if p.shape != g.shape or p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"spans must both be [N, 2], got {list(p.shape)} and {list(g.shape)}")
    inter = np.clip(np.minimum(p[:, 1], g[:, 1]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    union = np.clip(p[:, 1] - p[:, 0], 0, None) + np.clip(g[:, 1] - g[:, 0], 0, None) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def temporal_metrics(pred, gt, thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> dict[str, float]:
    """``R@t`` (fraction of spans with IoU >= t) per threshold and ``mIoU``."""
    ious = span_iou(pred, gt)
    if ious.size == 0:
        raise ValueError("temporal_metrics needs at least one span")
    return {**{f"R@{t:g}": float((ious >= t).mean()) for t in thresholds}, "mIoU": float(ious.mean())}


# ---------------------------------------------------------------- masks


def mask_iou(pred, gt) -> float:
    """IoU of two bool masks ``[H, W]``; 1 when both are empty (DAVIS)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"masks differ in shape: {list(p.shape)} and {list(g.shape)}")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def seg_to_boundary(seg) -> np.ndarray:
    """The boundary pixels of a mask, as DAVIS' ``seg2bmap``: where the mask
    differs from its right, lower or lower-right neighbour."""
    seg = np.asarray(seg, dtype=bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def boundary_f(pred, gt, bound_th: float = 0.008) -> float:
    """DAVIS boundary F-measure of two bool masks ``[H, W]``: boundaries match
    within ``bound_th`` pixels (``>= 1``) or that fraction of the image diagonal (``< 1``)."""
    from scipy.ndimage import binary_dilation

    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"masks differ in shape: {list(p.shape)} and {list(g.shape)}")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*p.shape)))
    pb, gb = seg_to_boundary(p), seg_to_boundary(g)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0  # precision 1 and recall 0, or the reverse
    disk = _disk(radius)
    precision = float((pb & binary_dilation(gb, disk)).sum()) / n_p
    recall = float((gb & binary_dilation(pb, disk)).sum()) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mask_stack(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=bool)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [T, H, W] masks, got shape {list(arr.shape)}")
    return arr


def j_and_f(pred, gt, bound_th: float = 0.008) -> dict[str, float]:
    """DAVIS J (mean region IoU over frames), F (mean boundary F) and their mean ``J&F``."""
    p, g = _mask_stack(pred, "pred"), _mask_stack(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {list(p.shape)} and gt {list(g.shape)} masks differ in shape")
    j = float(np.mean([mask_iou(a, b) for a, b in zip(p, g)]))
    f = float(np.mean([boundary_f(a, b, bound_th) for a, b in zip(p, g)]))
    return {"J": j, "F": f, "J&F": (j + f) / 2}


# ---------------------------------------------------------------- tracking

OTB_THRESHOLDS = np.linspace(0.0, 1.0, 21)


def _track_boxes(x, name: str) -> np.ndarray:
    rows = [[np.nan] * 4 if b is None else b for b in x]
    return _boxes(rows, name) if rows else np.zeros((0, 4))


def success_curve(pred, gt, thresholds: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OTB success plot of one sequence: for each threshold, the fraction of
    frames whose IoU is above it. ``gt`` rows that are ``None``/NaN (object
    absent) are left out; a ``None``/NaN prediction where the object is present has IoU 0."""
    th = OTB_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    p, g = _track_boxes(pred, "pred"), _track_boxes(gt, "gt")
    _same_length(p, g, "pred boxes", "gt boxes")
    keep = ~np.isnan(g).any(axis=1)
    if not keep.any():
        raise ValueError("success_curve: the ground truth has no frame with a box")
    p, g = p[keep], g[keep]
    missing = np.isnan(p).any(axis=1)
    ious = np.zeros(len(g))
    if (~missing).any():
        ious[~missing] = box_iou(p[~missing], g[~missing])
    return th, (ious[None, :] > th[:, None]).mean(axis=1)


def success_auc(pred, gt, thresholds: Sequence[float] | None = None) -> float:
    """Area under the OTB success plot (the mean success rate over thresholds)."""
    return float(success_curve(pred, gt, thresholds)[1].mean())


# ---------------------------------------------------------------- reward models


def pairwise_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs where the chosen answer's reward is higher; a tie counts half."""
    c, r = np.asarray(chosen_rewards, dtype=np.float64), np.asarray(rejected_rewards, dtype=np.float64)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"chosen {list(c.shape)} and rejected {list(r.shape)} rewards must be equal, non-empty shapes")
    return float(((c > r) + 0.5 * (c == r)).mean())


# ---------------------------------------------------------------- registered metrics


def _get(sample: dict, key: str, metric: str) -> Any:
    if key not in sample:
        raise KeyError(f"{metric}: a data sample has no {key!r} (keys: {', '.join(map(str, sample))})")
    return sample[key]


def _as_numpy(x) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


@METRICS.register_module()
class QAAccuracy(BaseMetric):
    """QA accuracy. Each data sample: ``prediction``, ``answer``,
    ``answer_type`` (``mc``/``open``, default ``open``), optional ``options``
    and ``question_type``, and ``truncated`` (the answer ran out of its token
    budget). Reports ``accuracy``, ``accuracy/mc``, ``accuracy/open``,
    ``accuracy/<question_type>`` and, when samples say, ``truncated`` (their
    share cut short: a high one means the budget, not the model, lost points)."""

    default_prefix = "qa"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            kind = s.get("answer_type", "open")
            ok = qa_correct(_get(s, "prediction", "QAAccuracy"), _get(s, "answer", "QAAccuracy"), kind,
                            s.get("options"))
            self.results.append((ok, kind, s.get("question_type"), s.get("truncated")))

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("QAAccuracy: no results to compute (process() was never given samples)")
        out = {"accuracy": float(np.mean([r[0] for r in results]))}
        cut = [r[3] for r in results if r[3] is not None]
        if cut:
            out["truncated"] = float(np.mean(cut))
        groups: dict[str, list[bool]] = defaultdict(list)
        for ok, kind, qtype, _ in results:
            groups[kind].append(ok)
            if qtype is not None:
                groups[str(qtype)].append(ok)
        out.update({f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(groups.items())})
        return out


@METRICS.register_module()
class BoxMetric(BaseMetric):
    """Referring boxes. Each data sample: ``pred_boxes`` and ``gt_boxes``
    (``[4]`` or ``[N, 4]`` normalised xyxy; every box counts once).
    Reports ``acc@<t>`` per IoU threshold and ``miou``."""

    default_prefix = "box"

    def __init__(self, iou_thresholds: Sequence[float] = (0.5,), **kwargs):
        super().__init__(**kwargs)
        self.iou_thresholds = tuple(iou_thresholds)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            self.results.extend(box_iou(_as_numpy(_get(s, "pred_boxes", "BoxMetric")),
                                        _as_numpy(_get(s, "gt_boxes", "BoxMetric"))).tolist())

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("BoxMetric: no results to compute")
        ious = np.asarray(results)
        return {**{f"acc@{t:g}": float((ious >= t).mean()) for t in self.iou_thresholds}, "miou": float(ious.mean())}


@METRICS.register_module()
class TemporalMetric(BaseMetric):
    """Temporal grounding. Each data sample: ``pred_span`` and ``gt_span``
    (``[2]`` or ``[N, 2]`` normalised). Reports ``R@<t>`` and ``mIoU``."""

    default_prefix = "temporal"

    def __init__(self, iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7), **kwargs):
        super().__init__(**kwargs)
        self.iou_thresholds = tuple(iou_thresholds)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            self.results.extend(span_iou(_as_numpy(_get(s, "pred_span", "TemporalMetric")),
                                         _as_numpy(_get(s, "gt_span", "TemporalMetric"))).tolist())

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("TemporalMetric: no results to compute")
        ious = np.asarray(results)
        return {**{f"R@{t:g}": float((ious >= t).mean()) for t in self.iou_thresholds}, "mIoU": float(ious.mean())}


@METRICS.register_module()
class MaskMetric(BaseMetric):
    """Segmentation. Each data sample: ``pred_masks`` and ``gt_masks``
    (bool ``[H, W]`` or ``[T, H, W]``). Reports ``mIoU`` (mean over samples of
    the per-sample mean frame IoU), ``cIoU`` (all intersections over all
    unions), ``J``, ``F`` and ``J&F`` (DAVIS; per-sample means, averaged)."""

    default_prefix = "mask"

    def __init__(self, bound_th: float = 0.008, **kwargs):
        super().__init__(**kwargs)
        self.bound_th = bound_th

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            p = _mask_stack(_as_numpy(_get(s, "pred_masks", "MaskMetric")), "pred_masks")
            g = _mask_stack(_as_numpy(_get(s, "gt_masks", "MaskMetric")), "gt_masks")
            scores = j_and_f(p, g, self.bound_th)
            inter, union = int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())
            self.results.append((scores["J"], scores["F"], inter, union))

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("MaskMetric: no results to compute")
        j = float(np.mean([r[0] for r in results]))
        f = float(np.mean([r[1] for r in results]))
        union = sum(r[3] for r in results)
        return {"mIoU": j, "cIoU": 1.0 if union == 0 else sum(r[2] for r in results) / union,
                "J": j, "F": f, "J&F": (j + f) / 2}


@METRICS.register_module()
class TrackingSuccess(BaseMetric):
    """Single-object tracking. Each data sample: ``pred_boxes`` and
    ``gt_boxes`` ``[T, 4]`` (rows ``None``/NaN: no box). The success plots of
    the sequences are averaged; reports ``success_auc`` and ``success@0.5``."""

    default_prefix = "tracking"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            pred = _get(s, "pred_boxes", "TrackingSuccess")
            gt = _get(s, "gt_boxes", "TrackingSuccess")
            self.results.append(success_curve(_as_numpy(pred), _as_numpy(gt))[1])

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("TrackingSuccess: no results to compute")
        curve = np.mean(np.stack(results), axis=0)
        at_half = int(np.argmin(np.abs(OTB_THRESHOLDS - 0.5)))
        return {"success_auc": float(curve.mean()), "success@0.5": float(curve[at_half])}


@METRICS.register_module()
class PairwiseAccuracy(BaseMetric):
    """Reward-model pairwise accuracy. Each data sample: ``chosen_reward`` and
    ``rejected_reward`` (scalars). Reports TRL's names under ``rewards/``:
    ``accuracies``, ``margins``, ``chosen``, ``rejected``."""

    default_prefix = "rewards"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            c = float(_as_numpy(_get(s, "chosen_reward", "PairwiseAccuracy")))
            r = float(_as_numpy(_get(s, "rejected_reward", "PairwiseAccuracy")))
            self.results.append((c, r))

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError("PairwiseAccuracy: no results to compute")
        c, r = np.array([x[0] for x in results]), np.array([x[1] for x in results])
        return {"accuracies": pairwise_accuracy(c, r), "margins": float((c - r).mean()),
                "chosen": float(c.mean()), "rejected": float(r.mean())}
