"""The task losses against independent references: torchvision for GIoU and
focal, torch's own l1/cross-entropy, and direct float64 Python for the rest."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvops
from tpo.registry import build_loss

from tpo.losses import task as T


def random_boxes(n, generator=None, dtype=torch.float64):
    xy = torch.rand(n, 2, 2, generator=generator, dtype=dtype)
    lo, hi = xy.min(1).values, xy.max(1).values
    return torch.cat((lo, hi), dim=-1)  # x1, y1, x2, y2 with x2 >= x1, y2 >= y1


def random_spans(n, dtype=torch.float64):
    s = torch.rand(n, 2, dtype=dtype)
    return torch.stack((s.min(1).values, s.max(1).values), dim=-1)


# ----------------------------------------------------------------------------- geometry
def test_box_and_span_conversions_round_trip():
    boxes = random_boxes(17)
    assert torch.allclose(T.box_cxcywh_to_xyxy(T.box_xyxy_to_cxcywh(boxes)), boxes)
    assert torch.allclose(T.box_xyxy_to_cxcywh(boxes)[:, 2], boxes[:, 2] - boxes[:, 0])
    spans = random_spans(9)
    assert torch.allclose(T.span_cw_to_se(T.span_se_to_cw(spans)), spans)


def test_pairwise_giou_matches_torchvision():
    a, b = random_boxes(7), random_boxes(5)
    ours = T.generalized_box_iou_pairwise(a, b, eps=0.0)
    ref = tvops.generalized_box_iou(a, b)
    assert ours.shape == (7, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- GIoU
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_giou_loss_matches_torchvision(reduction):
    pred, target = random_boxes(64), random_boxes(64)
    pred[0] = target[0]  # identical
    pred[1] = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)  # disjoint
    target[1] = torch.tensor([0.8, 0.8, 0.9, 1.0], dtype=torch.float64)
    ours = T.giou_loss(pred, target, reduction=reduction)
    ref = tvops.generalized_box_iou_loss(pred, target, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_giou_loss_gradient_matches_torchvision():
    pred = random_boxes(32).requires_grad_()
    target = random_boxes(32)
    T.giou_loss(pred, target).backward()
    ours = pred.grad.clone()
    pred.grad = None
    tvops.generalized_box_iou_loss(pred, target, reduction="mean").backward()
    torch.testing.assert_close(ours, pred.grad, rtol=1e-10, atol=1e-12)


def test_giou_module_weight_and_name_float32():
    pred, target = random_boxes(10).float(), random_boxes(10).float()
    loss = build_loss(dict(type="GIoULoss", loss_weight=2.5))
    out = loss(pred, target)
    assert list(out) == ["giou"]
    ref = tvops.generalized_box_iou_loss(pred.double(), target.double(), reduction="mean")
    torch.testing.assert_close(out["giou"].double(), 2.5 * ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- L1
def test_l1_module_matches_torch_and_weighting():
    pred, target = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    l1 = build_loss(dict(type="L1Loss", loss_weight=3.0))
    torch.testing.assert_close(l1(pred, target)["l1"], 3.0 * F.l1_loss(pred, target))
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    per_box = [sum(abs(float(p) - float(t)) for p, t in zip(pred[i], target[i])) / 4 for i in range(6)]
    expect = sum(per_box[i] * float(w[i]) for i in range(6)) / float(w.sum())
    assert math.isclose(float(l1(pred, target, weight=w)["l1"]), 3.0 * expect, rel_tol=1e-12)
    expect_avg = sum(per_box[i] * float(w[i]) for i in range(6)) / 7.0
    assert math.isclose(float(l1(pred, target, weight=w, avg_factor=7.0)["l1"]), 3.0 * expect_avg, rel_tol=1e-12)
    s = build_loss(dict(type="L1Loss", reduction="sum"))(pred, target)["l1"]
    assert math.isclose(float(s), sum(per_box), rel_tol=1e-12)


# ----------------------------------------------------------------------------- temporal IoU / GIoU
def ref_tiou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union


def ref_tgiou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union - (hull - union) / hull


def test_temporal_iou_and_giou_against_float64_reference():
    p, t = random_spans(50), random_spans(50)
    p[0] = torch.tensor([0.1, 0.2], dtype=torch.float64)
    t[0] = torch.tensor([0.5, 0.9], dtype=torch.float64)  # disjoint: negative GIoU
    iou = T.temporal_iou(p, t, eps=0.0)
    giou = T.temporal_giou(p, t, eps=0.0)
    for i in range(50):
        a, b = p[i].tolist(), t[i].tolist()
        assert math.isclose(float(iou[i]), ref_tiou(a, b), rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(float(giou[i]), ref_tgiou(a, b), rel_tol=1e-12, abs_tol=1e-12)
    assert giou[0] < 0
    mean_ref = sum(1 - ref_tgiou(p[i].tolist(), t[i].tolist()) for i in range(50)) / 50
    out = build_loss(dict(type="TemporalGIoULoss", loss_weight=2.0, eps=0.0))(p, t)
    assert math.isclose(float(out["tgiou"]), 2.0 * mean_ref, rel_tol=1e-12)
    out = build_loss(dict(type="TemporalIoULoss", eps=0.0))(p, t)
    assert math.isclose(
        float(out["tiou"]), sum(1 - ref_tiou(p[i].tolist(), t[i].tolist()) for i in range(50)) / 50, rel_tol=1e-12
    )


def test_temporal_pairwise():
    p, t = random_spans(4), random_spans(3)
    pw = T.temporal_giou_pairwise(p, t, eps=0.0)
    pwi = T.temporal_iou_pairwise(p, t, eps=0.0)
    for i in range(4):
        for j in range(3):
            assert math.isclose(float(pw[i, j]), ref_tgiou(p[i].tolist(), t[j].tolist()), rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(float(pwi[i, j]), ref_tiou(p[i].tolist(), t[j].tolist()), rel_tol=1e-12, abs_tol=1e-12)


# ----------------------------------------------------------------------------- dice
def test_dice_against_float64_reference():
    logits = torch.randn(3, 5, 6, dtype=torch.float64)
    masks = torch.rand(3, 5, 6) > 0.6
    ours = T.dice_loss(logits, masks, smooth=1.0, reduction="none")
    for i in range(3):
        p = [1 / (1 + math.exp(-v)) for v in logits[i].flatten().tolist()]
        m = [float(v) for v in masks[i].flatten().tolist()]
        inter = sum(a * b for a, b in zip(p, m))
        ref = 1 - (2 * inter + 1.0) / (sum(p) + sum(m) + 1.0)
        assert math.isclose(float(ours[i]), ref, rel_tol=1e-12)
    out = build_loss(dict(type="DiceLoss", loss_weight=0.5))(logits, masks)
    assert math.isclose(float(out["dice"]), 0.5 * float(ours.mean()), rel_tol=1e-12)
    perfect = T.dice_loss(torch.where(masks, 30.0, -30.0).double(), masks, smooth=0.0, reduction="none")
    assert torch.allclose(perfect, torch.zeros(3, dtype=torch.float64), atol=1e-10)


# ----------------------------------------------------------------------------- focal
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 1.5)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_matches_torchvision(alpha, gamma, reduction):
    logits = torch.randn(4, 7, 9, dtype=torch.float64) * 4
    targets = (torch.rand(4, 7, 9) > 0.7).double()
    ours = T.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    ref = tvops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


def test_sigmoid_focal_soft_targets_extreme_logits_and_gradient():
    logits = (torch.randn(200, dtype=torch.float64) * 40).requires_grad_()
    targets = torch.rand(200, dtype=torch.float64)
    ours = T.sigmoid_focal_loss(logits, targets, reduction="mean")
    ref = tvops.sigmoid_focal_loss(logits, targets, reduction="mean")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_focal_module_mean_equals_torchvision_mean():
    logits = torch.randn(5, 8, 8)
    masks = torch.rand(5, 8, 8) > 0.5
    out = build_loss(dict(type="SigmoidFocalLoss", loss_weight=20.0))(logits, masks)
    ref = tvops.sigmoid_focal_loss(logits, masks.float(), reduction="mean")
    torch.testing.assert_close(out["focal"], 20.0 * ref, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- saliency
def ref_saliency(scores, labels, valid, margin):
    losses = []
    for s, y, v in zip(scores.tolist(), labels.tolist(), valid.tolist()):
        terms = [
            max(0.0, margin - (s[i] - s[j]))
            for i in range(len(s))
            for j in range(len(s))
            if v[i] and v[j] and y[i] > y[j]
        ]
        if terms:
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_saliency_margin_against_reference():
    scores = torch.randn(4, 9, dtype=torch.float64) * 0.3
    labels = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0, 0, 0],
            [0.1, 0.5, 0.9, 0.2, 0.0, 0.3, 0.3, 0.7, 0.4],
            [1] * 9,
            [0, 1, 0, 0, 0, 0, 0, 1, 0],
        ],
        dtype=torch.float64,
    )
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[3, 7:] = False  # padded frames: frame 7's positive label must not count
    out = build_loss(dict(type="SaliencyMarginLoss", margin=0.2, loss_weight=1.5))(scores, labels, weight=valid)
    expect = ref_saliency(scores, labels, valid, 0.2)  # sample 2 (all positive) has no pair
    assert math.isclose(float(out["saliency"]), 1.5 * expect, rel_tol=1e-12)
    separated = torch.where(labels > 0.5, 5.0, -5.0)[:2]
    assert float(T.saliency_margin_loss(separated, (labels[:2] > 0.5).double())[0]) == 0.0


# ----------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_matches_torch_with_weights_and_ignore():
    logits = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (12,))
    labels[3] = -100
    w = torch.tensor([1.0, 0.5, 2.0, 0.1, 1.0], dtype=torch.float64)
    ours = build_loss(dict(type="CrossEntropyLoss", class_weight=w.tolist()))(logits, labels)["ce"]
    ref = F.cross_entropy(logits, labels, weight=w, ignore_index=-100)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # direct float64 reference without class weights
    lp = [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in logits.tolist()]
    kept = [i for i in range(12) if labels[i] != -100]
    expect = -sum(lp[i][int(labels[i])] for i in kept) / len(kept)
    assert math.isclose(float(T.cross_entropy(logits, labels)), expect, rel_tol=1e-12)


def test_task_assignment_loss_from_config():
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 2, 1, 1, 0])
    out = build_loss(dict(type="TaskAssignmentLoss", loss_weight=0.5))(logits, labels)
    assert list(out) == ["task_assignment"]
    torch.testing.assert_close(out["task_assignment"], 0.5 * F.cross_entropy(logits, labels))
    out["task_assignment"].backward()
    assert logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_and_configs_raise():
    with pytest.raises(ValueError, match="same shape"):
        T.giou_loss(torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        T.generalized_box_iou(torch.rand(3, 2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="outside"):
        T.cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        T.cross_entropy(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        T.dice_loss(torch.randn(2, 3), torch.ones(2, 3), reduction="avg")
    with pytest.raises(ValueError, match=r"loss\.reduction"):
        build_loss(dict(type="L1Loss", reduction="none"))
    with pytest.raises(ValueError, match=r"loss\.loss_weight"):
        build_loss(dict(type="GIoULoss", loss_weight=-1))
    with pytest.raises(ValueError, match=r"loss\.name"):
        build_loss(dict(type="DiceLoss", name="loss"))
    with pytest.raises(ValueError, match="class_weight"):
        build_loss(dict(type="CrossEntropyLoss", class_weight=[1.0, 0.5]))(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="broadcast"):
        build_loss(dict(type="L1Loss"))(torch.rand(3, 4), torch.rand(3, 4), weight=torch.ones(5))
