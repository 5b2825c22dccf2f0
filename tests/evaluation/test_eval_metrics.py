"""Metrics against hand-computed cases."""
import math

import numpy as np
import pytest
import torch
from tpo.registry import build_metric

from tpo.evaluation.metrics import (
    boundary_f,
    box_iou,
    box_metrics,
    extract_choice,
    j_and_f,
    mask_iou,
    normalize_answer,
    pairwise_accuracy,
    qa_accuracy,
    qa_correct,
    seg_to_boundary,
    span_iou,
    success_auc,
    success_curve,
    temporal_metrics,
)


def run(metric_cfg, samples):
    metric = build_metric(metric_cfg)
    metric.process(None, samples[: len(samples) // 2])
    metric.process(None, samples[len(samples) // 2:])
    return metric.evaluate(len(samples))


# ---------------------------------------------------------------- QA


def test_normalize_answer():
    assert normalize_answer("The Two red circles.") == "2 red circles"
    assert normalize_answer("  an apple, a PEAR!") == "apple pear"
    assert normalize_answer("twenty-one") == "20 1"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_extract_choice():
    options = ["red", "green", "blue", "yellow"]
    for text in ("B", "(B)", "B.", "B) green", "B, green", "The answer is B.", "Answer: (B)", "green", "Green."):
        assert extract_choice(text, options) == "B", text
    assert extract_choice("I think (C) blue", options) == "C"
    assert extract_choice("purple", options) is None
    assert extract_choice("E", options) is None  # not one of four options
    assert extract_choice("Blue and green", options) is None
    for text, letter in (("The answer is b.", "B"), ("Answer: (c)", "C"), ("answer is C because", "C")):
        assert extract_choice(text, options) == letter, text  # checked against the options in upper case
    # an article is not a letter: "A" or "I" before a lower-case word is not read as a leading letter
    animals = ["a dog", "a cat", "a bird"]
    assert extract_choice("A cat.", animals) == "B" and qa_correct("A cat.", "B", "mc", animals)
    assert extract_choice("The answer is a bird", animals) is None  # not A
    assert extract_choice("A cat", None) is None and extract_choice("the answer is a dog", None) is None
    assert [extract_choice(t, animals) for t in ("B: a cat", "(A) a dog", "A.", "C")] == ["B", "A", "A", "C"]
    # any other leading letter before a space is the choice (a small model's "B The The ..."), and "A" before
    # anything but a lower-case word
    for text, letter in (("B The The The", "B"), ("C the bird", "C"), ("A The", "A"), ("A  B", "A")):
        assert extract_choice(text, animals) == letter, text


def test_qa_correct_and_accuracy():
    assert qa_correct("(C) blue", "C", "mc")
    assert qa_correct("blue", "blue", "mc", ["red", "blue"])  # answer given as the option text
    assert not qa_correct("A", "B", "mc")
    assert qa_correct("Two.", "2")
    assert qa_correct("the red circle", "Red circle")
    assert not qa_correct("red circles", "red circle")
    with pytest.raises(ValueError, match="answer_type"):
        qa_correct("x", "x", "essay")
    with pytest.raises(ValueError, match="neither a letter"):
        qa_correct("x", "purple", "mc", ["red", "blue"])
    acc = qa_accuracy(["A", "B", "three", "left"], ["A", "C", "3", "right"], ["mc", "mc", "open", "open"])
    assert acc == 0.5


def test_qa_metric_groups():
    samples = [
        dict(prediction="A", answer="A", answer_type="mc", question_type="color"),
        dict(prediction="(D)", answer="B", answer_type="mc", question_type="color"),
        dict(prediction="Three", answer="3", answer_type="open", question_type="count"),
        dict(prediction="up", answer="down", question_type="direction"),
    ]
    out = run(dict(type="QAAccuracy"), samples)
    assert out == {"qa/accuracy": 0.5, "qa/accuracy/mc": 0.5, "qa/accuracy/open": 0.5,
                   "qa/accuracy/color": 0.5, "qa/accuracy/count": 1.0, "qa/accuracy/direction": 0.0}
    with pytest.raises(KeyError, match="'prediction'"):
        run(dict(type="QAAccuracy"), [dict(answer="A"), dict(answer="B")])
    cut = run(dict(type="QAAccuracy"), [dict(prediction="the red", answer="the red circle", truncated=True),
                                         dict(prediction="A", answer="A", truncated=False)])
    assert cut["qa/truncated"] == 0.5 and cut["qa/accuracy"] == 0.5


# ---------------------------------------------------------------- boxes and spans


def test_box_iou_hand_cases():
    pred = [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0, 0, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]]
    gt = [[0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], [0.5, 0.5, 1, 1], [0.25, 0.25, 0.5, 0.75]]
    # identical: 1; half-shifted: 0.125 / (0.25 + 0.25 - 0.125) = 1/3; disjoint: 0; nested: 1/16 / (1/8)
    assert np.allclose(box_iou(pred, gt), [1, 1 / 3, 0, 0.5])
    out = box_metrics(pred, gt)
    assert out["acc@0.5"] == 0.5 and math.isclose(out["miou"], (1 + 1 / 3 + 0 + 0.5) / 4)
    metric = run(dict(type="BoxMetric", iou_thresholds=[0.3, 0.5]),
                 [dict(pred_boxes=torch.tensor(p), gt_boxes=torch.tensor(g)) for p, g in zip(pred, gt)])
    assert metric["box/acc@0.3"] == 0.75 and metric["box/acc@0.5"] == 0.5
    assert math.isclose(metric["box/miou"], out["miou"])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_iou([[0, 0, 1]], [[0, 0, 1]])


def test_span_iou_and_recalls():
    pred = [[0.0, 0.5], [0.2, 0.4], [0.0, 0.1], [0.1, 0.9]]
    gt = [[0.25, 0.75], [0.2, 0.4], [0.5, 1.0], [0.2, 0.8]]
    # 0.25/0.75 = 1/3; identical 1; disjoint 0; nested 0.6/0.8 = 0.75
    assert np.allclose(span_iou(pred, gt), [1 / 3, 1, 0, 0.75])
    out = temporal_metrics(pred, gt)
    assert out == pytest.approx({"R@0.3": 0.75, "R@0.5": 0.5, "R@0.7": 0.5, "mIoU": (1 / 3 + 1 + 0.75) / 4})
    metric = run(dict(type="TemporalMetric"), [dict(pred_span=p, gt_span=g) for p, g in zip(pred, gt)])
    assert metric == pytest.approx({f"temporal/{k}": v for k, v in out.items()})


# ---------------------------------------------------------------- masks


def square(size, top, left, side):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_mask_iou_hand_cases():
    a, b = square(10, 2, 2, 4), square(10, 2, 4, 4)  # 16 px each, overlap 2 columns x 4 rows = 8
    assert mask_iou(a, b) == 8 / 24
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # DAVIS: both empty
    assert mask_iou(a, np.zeros_like(a)) == 0.0


def test_boundary_is_davis_seg2bmap():
    # a 4x4 square at rows/cols 2..5: its boundary is the 5x5 ring rows/cols 1..5 (16 px)
    b = seg_to_boundary(square(10, 2, 2, 4))
    ring = square(10, 1, 1, 5) & ~square(10, 2, 2, 3)
    assert np.array_equal(b, ring) and b.sum() == 16


def test_boundary_f_hand_cases():
    a = square(10, 2, 2, 4)
    assert boundary_f(a, a) == 1.0
    assert boundary_f(np.zeros((10, 10)), np.zeros((10, 10))) == 1.0
    assert boundary_f(np.zeros((10, 10)), a) == 0.0  # precision 1, recall 0
    assert boundary_f(a, np.zeros((10, 10))) == 0.0
    # shifted 3 columns right, tolerance 1 px (a plus-shaped disk): of each 16-px ring, 9 px lie within
    # 1 px of the other ring (its near column: 5, plus 2 px of its top row and 2 of its bottom row)
    shifted = square(10, 2, 5, 4)
    assert boundary_f(shifted, a, bound_th=1) == pytest.approx(9 / 16)
    assert boundary_f(shifted, a, bound_th=3) == 1.0  # every boundary pixel within a 3 px disk
    # the default tolerance is 0.008 of the diagonal, rounded up: 1 px for a 10x10 mask
    assert boundary_f(shifted, a) == pytest.approx(9 / 16)


def test_j_and_f_and_mask_metric():
    a, shifted = square(10, 2, 2, 4), square(10, 2, 5, 4)
    gt = np.stack([a, a, np.zeros_like(a)])
    pred = np.stack([a, shifted, np.zeros_like(a)])
    j = (1 + 4 / 28 + 1) / 3  # overlap of the shifted square: 1 column x 4 rows
    f = (1 + 9 / 16 + 1) / 3
    out = j_and_f(pred, gt, bound_th=1)
    assert out == pytest.approx({"J": j, "F": f, "J&F": (j + f) / 2})
    metric = run(dict(type="MaskMetric", bound_th=1),
                 [dict(pred_masks=pred, gt_masks=gt), dict(pred_masks=torch.from_numpy(a), gt_masks=a)])
    assert metric["mask/J"] == pytest.approx((j + 1) / 2)
    assert metric["mask/F"] == pytest.approx((f + 1) / 2)
    assert metric["mask/mIoU"] == metric["mask/J"]
    assert metric["mask/cIoU"] == pytest.approx((16 + 4 + 16) / (16 + 28 + 16))


# ---------------------------------------------------------------- tracking and rewards


def test_success_auc_hand_case():
    gt = [[0, 0, 0.5, 0.5]] * 3 + [None]
    pred = [[0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], None, [0, 0, 1, 1]]
    # IoUs 1, 1/3, 0 (no prediction); the frame with no ground truth is left out.
    th, rates = success_curve(pred, gt)
    assert len(th) == 21
    # IoU > t: t = 0 .. 0.30 (7 thresholds): 2/3; t = 0.35 .. 0.95 (13): 1/3; t = 1: 0
    assert np.allclose(rates, [2 / 3] * 7 + [1 / 3] * 13 + [0])
    assert success_auc(pred, gt) == pytest.approx((7 * 2 / 3 + 13 / 3) / 21)
    perfect = [[0.1, 0.1, 0.4, 0.4]] * 2
    out = run(dict(type="TrackingSuccess"), [dict(pred_boxes=pred, gt_boxes=gt), dict(pred_boxes=perfect,
                                                                                     gt_boxes=perfect)])
    # averaged success plots; the perfect track succeeds at every threshold but 1
    assert out["tracking/success_auc"] == pytest.approx(((7 * 2 / 3 + 13 / 3) / 21 + 20 / 21) / 2)
    assert out["tracking/success@0.5"] == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="no frame with a box"):
        success_auc([None], [None])


def test_pairwise_accuracy():
    assert pairwise_accuracy([1.0, 2.0, 0.0, 3.0], [0.0, 2.5, 0.0, 1.0]) == (1 + 0 + 0.5 + 1) / 4
    out = run(dict(type="PairwiseAccuracy"), [dict(chosen_reward=torch.tensor(2.0), rejected_reward=1.0),
                                              dict(chosen_reward=0.0, rejected_reward=1.0)])
    assert out == {"rewards/accuracies": 0.5, "rewards/margins": 0.0, "rewards/chosen": 1.0,
                   "rewards/rejected": 1.0}
    with pytest.raises(ValueError, match="non-empty"):
        pairwise_accuracy([], [])
