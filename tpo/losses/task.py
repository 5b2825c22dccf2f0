"""Dense task losses of the task heads: boxes, spans, masks, saliency and
task assignment.

Two layers:

* functional: box and span geometry (``generalized_box_iou``,
  ``temporal_giou``, their pairwise forms for Hungarian matching) and the
  losses as functions (``l1_loss``, ``giou_loss``, ``temporal_iou_loss``,
  ``temporal_giou_loss``, ``dice_loss``, ``sigmoid_focal_loss``,
  ``saliency_margin_loss``, ``cross_entropy``), each with
  ``reduction='none'|'mean'|'sum'``;
* modules registered in ``tpo.registry.LOSSES`` (``L1Loss``, ``GIoULoss``,
  ``TemporalIoULoss``, ``TemporalGIoULoss``, ``DiceLoss``,
  ``SigmoidFocalLoss``, ``SaliencyMarginLoss``, ``CrossEntropyLoss``,
  ``TaskAssignmentLoss``). A module has a ``loss_weight``, a ``reduction``
  (``mean``/``sum``) and a ``name``, and returns ``{name: loss_weight * loss}``.
  ``forward(pred, target, weight=None, avg_factor=None)``: ``weight`` weighs
  the items (boxes, spans, masks, samples); ``avg_factor`` replaces the
  denominator of ``mean`` (DETR's "number of matched targets").

Conventions: boxes are ``xyxy``, spans ``(start, end)``; everything is computed
in float32 at least (half inputs are upcast).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from tpo.registry import LOSSES, current_config_key

REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------- #
# geometry
# --------------------------------------------------------------------------- #
def _upcast(x: Tensor) -> Tensor:
    if not torch.is_floating_point(x):
        return x.float()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_last_dim(x: Tensor, size: int, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{what} must have shape [..., {size}], got {tuple(x.shape)}")


def _check_same_shape(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what_a} {tuple(a.shape)} and {what_b} {tuple(b.shape)} must have the same shape")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``."""
    _check_last_dim(boxes, 4, "boxes")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``."""
    _check_last_dim(boxes, 4, "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), dim=-1)


def span_cw_to_se(spans: Tensor) -> Tensor:
    """``(centre, width)`` -> ``(start, end)``."""
    _check_last_dim(spans, 2, "spans")
    c, w = spans.unbind(-1)
    return torch.stack((c - 0.5 * w, c + 0.5 * w), dim=-1)


def span_se_to_cw(spans: Tensor) -> Tensor:
    """``(start, end)`` -> ``(centre, width)``."""
    _check_last_dim(spans, 2, "spans")
    s, e = spans.unbind(-1)
    return torch.stack((0.5 * (s + e), e - s), dim=-1)


def _box_giou_parts(b1: Tensor, b2: Tensor, eps: float) -> Tensor:
    """GIoU of broadcastable ``xyxy`` boxes ``b1`` and ``b2`` (last dim 4)."""
    x1, y1, x2, y2 = b1.unbind(-1)
    u1, v1, u2, v2 = b2.unbind(-1)
    iw = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0)
    ih = (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    inter = iw * ih
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
    iou = inter / (union + eps)
    enclosing = (torch.maximum(x2, u2) - torch.minimum(x1, u1)) * (torch.maximum(y2, v2) - torch.minimum(y1, v1))
    return iou - (enclosing - union) / (enclosing + eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise GIoU of two ``[..., 4]`` ``xyxy`` box tensors of one shape."""
    _check_last_dim(boxes1, 4, "boxes1")
    _check_same_shape(boxes1, boxes2, "boxes1", "boxes2")
    return _box_giou_parts(_upcast(boxes1), _upcast(boxes2), eps)


def generalized_box_iou_pairwise(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """``[N, M]`` GIoU between every box of ``boxes1 [N, 4]`` and ``boxes2 [M, 4]``."""
    _check_last_dim(boxes1, 4, "boxes1")
    _check_last_dim(boxes2, 4, "boxes2")
    if boxes1.dim() != 2 or boxes2.dim() != 2:
        raise ValueError(
            f"pairwise GIoU needs [N, 4] and [M, 4] boxes, got {tuple(boxes1.shape)}, {tuple(boxes2.shape)}"
        )
    return _box_giou_parts(_upcast(boxes1)[:, None, :], _upcast(boxes2)[None, :, :], eps)


def _span_iou_parts(s1: Tensor, s2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    a, b = s1.unbind(-1)
    c, d = s2.unbind(-1)
    inter = (torch.minimum(b, d) - torch.maximum(a, c)).clamp(min=0)
    union = (b - a) + (d - c) - inter
    iou = inter / (union + eps)
    enclosing = torch.maximum(b, d) - torch.minimum(a, c)
    giou = iou - (enclosing - union) / (enclosing + eps)
    return iou, giou


def temporal_iou(spans1: Tensor, spans2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise 1-D IoU of two ``[..., 2]`` ``(start, end)`` span tensors."""
    _check_last_dim(spans1, 2, "spans1")
    _check_same_shape(spans1, spans2, "spans1", "spans2")
    return _span_iou_parts(_upcast(spans1), _upcast(spans2), eps)[0]


def temporal_giou(spans1: Tensor, spans2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise 1-D generalised IoU of two ``[..., 2]`` span tensors."""
    _check_last_dim(spans1, 2, "spans1")
    _check_same_shape(spans1, spans2, "spans1", "spans2")
    return _span_iou_parts(_upcast(spans1), _upcast(spans2), eps)[1]


def _pairwise_spans(spans1: Tensor, spans2: Tensor) -> tuple[Tensor, Tensor]:
    _check_last_dim(spans1, 2, "spans1")
    _check_last_dim(spans2, 2, "spans2")
    if spans1.dim() != 2 or spans2.dim() != 2:
        raise ValueError(
            f"pairwise span IoU needs [N, 2] and [M, 2] spans, got {tuple(spans1.shape)}, {tuple(spans2.shape)}"
        )
    return _upcast(spans1)[:, None, :], _upcast(spans2)[None, :, :]


def temporal_iou_pairwise(spans1: Tensor, spans2: Tensor, eps: float = 1e-7) -> Tensor:
    """``[N, M]`` 1-D IoU between ``spans1 [N, 2]`` and ``spans2 [M, 2]``."""
    return _span_iou_parts(*_pairwise_spans(spans1, spans2), eps)[0]


def temporal_giou_pairwise(spans1: Tensor, spans2: Tensor, eps: float = 1e-7) -> Tensor:
    """``[N, M]`` 1-D GIoU between ``spans1 [N, 2]`` and ``spans2 [M, 2]``."""
    return _span_iou_parts(*_pairwise_spans(spans1, spans2), eps)[1]


# --------------------------------------------------------------------------- #
# reductions
# --------------------------------------------------------------------------- #
def _check_reduction(reduction: str, allowed: Sequence[str] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def weight_reduce(
    loss: Tensor, weight: Tensor | None = None, reduction: str = "mean", avg_factor: float | Tensor | None = None
) -> Tensor:
    """Reduce a per-item ``loss``: times ``weight`` (broadcast to ``loss``),
    then summed, or averaged over ``avg_factor`` if given, else over the
    weights' sum (the item count without weights)."""
    _check_reduction(reduction)
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
        try:
            weight = torch.broadcast_to(weight.to(loss.dtype), loss.shape)
        except RuntimeError:
            raise ValueError(
                f"weight {tuple(weight.shape)} does not broadcast to the loss items {tuple(loss.shape)}"
            ) from None
        loss = loss * weight
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is not None:
        return total / avg_factor
    if weight is not None:
        return total / weight.sum().clamp(min=torch.finfo(loss.dtype).eps)
    return total / max(loss.numel(), 1)


# --------------------------------------------------------------------------- #
# functional losses
# --------------------------------------------------------------------------- #
def l1_loss(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean absolute error over the last (coordinate) dim, one value per item
    ``[...]``; ``mean`` of it equals ``F.l1_loss``."""
    _check_same_shape(pred, target, "pred", "target")
    if pred.dim() == 0:
        raise ValueError("l1_loss needs [..., D] inputs, got a scalar")
    per_item = (_upcast(pred) - _upcast(target)).abs().mean(-1)
    return weight_reduce(per_item, reduction=reduction)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7, reduction: str = "mean") -> Tensor:
    """``1 - GIoU`` of ``xyxy`` boxes ``[..., 4]``, one value per box (the same
    as ``torchvision.ops.generalized_box_iou_loss``)."""
    return weight_reduce(1.0 - generalized_box_iou(pred, target, eps), reduction=reduction)


def temporal_iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7, reduction: str = "mean") -> Tensor:
    """``1 - IoU`` of ``(start, end)`` spans ``[..., 2]``."""
    return weight_reduce(1.0 - temporal_iou(pred, target, eps), reduction=reduction)


def temporal_giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7, reduction: str = "mean") -> Tensor:
    """``1 - GIoU`` of ``(start, end)`` spans ``[..., 2]``."""
    return weight_reduce(1.0 - temporal_giou(pred, target, eps), reduction=reduction)


def _binary_targets(logits: Tensor, targets: Tensor) -> Tensor:
    _check_same_shape(logits, targets, "logits", "targets")
    return targets.to(_upcast(logits).dtype)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, reduction: str = "mean") -> Tensor:
    """``1 - (2 |P∩T| + smooth) / (|P| + |T| + smooth)`` with ``P = sigmoid(logits)``,
    one value per item: ``logits``/``targets`` ``[N, ...]`` are flattened past
    the first dim (``[N]`` inputs: each element is an item)."""
    targets = _binary_targets(logits, targets)
    probs = torch.sigmoid(_upcast(logits))
    if probs.dim() == 0:
        raise ValueError("dice_loss needs [N, ...] inputs, got a scalar")
    probs = probs.reshape(probs.shape[0], -1)
    targets = targets.reshape(targets.shape[0], -1)
    numerator = 2.0 * (probs * targets).sum(-1) + smooth
    denominator = probs.sum(-1) + targets.sum(-1) + smooth
    return weight_reduce(1.0 - numerator / denominator, reduction=reduction)


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Focal loss (Lin et al. 2017) of logits ``inputs`` against 0/1 (or soft)
    ``targets``, element-wise for ``none``; the same as
    ``torchvision.ops.sigmoid_focal_loss``. ``alpha < 0`` disables the class
    balancing."""
    targets = _binary_targets(inputs, targets)
    x = _upcast(inputs)
    # binary cross-entropy with logits, the stable form: max(x,0) - x t + log(1 + e^-|x|)
    ce = x.clamp(min=0) - x * targets + torch.log1p(torch.exp(-x.abs()))
    p = torch.sigmoid(x)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return weight_reduce(loss, reduction=reduction)


def saliency_margin_loss(
    scores: Tensor, labels: Tensor, valid: Tensor | None = None, margin: float = 0.2, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Pairwise hinge on per-frame saliency ``scores [B, T]``: for every pair of
    valid frames ``i, j`` of a sample with ``labels[i] > labels[j]``,
    ``max(0, margin - (s_i - s_j))``, averaged over the sample's pairs.

    Returns ``(loss, has_pairs)``: the reduced loss over the samples that have
    a pair (``none``: ``[B]``, 0 where no pair) and the ``[B]`` bool mask of
    those samples (a sample whose frames are all positive has none)."""
    if scores.dim() != 2:
        raise ValueError(f"saliency scores must be [B, T], got {tuple(scores.shape)}")
    _check_same_shape(scores, labels, "saliency scores", "saliency labels")
    _check_reduction(reduction)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        _check_same_shape(scores, valid, "saliency scores", "valid")
        valid = valid.bool()
    s = _upcast(scores)
    y = labels.to(s.dtype)
    pair = (y[:, :, None] > y[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    hinge = (margin - (s[:, :, None] - s[:, None, :])).clamp(min=0)
    num_pairs = pair.sum((1, 2))
    has_pairs = num_pairs > 0
    per_sample = (hinge * pair).sum((1, 2)) / num_pairs.clamp(min=1)
    if reduction == "none":
        return per_sample, has_pairs
    return weight_reduce(per_sample, has_pairs, reduction=reduction), has_pairs


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    class_weight: Tensor | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Softmax cross-entropy of ``logits [N, K]`` and integer ``labels [N]``;
    ``mean`` divides by the summed class weights of the non-ignored labels
    (``torch.nn.functional.cross_entropy``'s convention)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    num_classes = logits.shape[1]
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[i])} of item {i} is outside [0, {num_classes}) (ignore_index={ignore_index})"
        )
    x = _upcast(logits)
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    nll = -(x.log_softmax(-1).gather(1, safe[:, None]).squeeze(1))
    if class_weight is None:
        w = keep.to(x.dtype)
    else:
        cw = torch.as_tensor(class_weight, dtype=x.dtype, device=x.device)
        if cw.shape != (num_classes,):
            raise ValueError(f"class_weight must have {num_classes} entries, got {tuple(cw.shape)}")
        w = cw[safe] * keep.to(x.dtype)
    if reduction == "none":
        return nll * w
    return weight_reduce(nll, w, reduction=reduction)


# --------------------------------------------------------------------------- #
# registered modules
# --------------------------------------------------------------------------- #
class TaskLoss(nn.Module):
    """Base of the registered task losses: ``{name: loss_weight * loss}``."""

    default_name = "loss"

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", name: str | None = None):
        super().__init__()
        if (
            isinstance(loss_weight, bool)
            or not isinstance(loss_weight, (int, float))
            or not math.isfinite(loss_weight)
            or loss_weight < 0
        ):
            raise ValueError(f"{current_config_key('loss_weight')}: must be a finite number >= 0, got {loss_weight!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{current_config_key('reduction')}: must be 'mean' or 'sum', got {reduction!r}")
        name = self.default_name if name is None else name
        if not isinstance(name, str) or not name or name == "loss":
            raise ValueError(
                f"{current_config_key('name')}: must be a non-empty string other than 'loss', got {name!r}"
            )
        self.loss_weight = float(loss_weight)
        self.reduction = reduction
        self.name = name

    def per_item(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
    ) -> dict[str, Tensor]:
        value = weight_reduce(self.per_item(pred, target), weight, self.reduction, avg_factor)
        return {self.name: self.loss_weight * value}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, loss_weight={self.loss_weight}, reduction={self.reduction!r}"


@LOSSES.register_module()
class L1Loss(TaskLoss):
    """Mean absolute error over the last dim of ``[..., D]`` boxes or spans."""

    default_name = "l1"

    def per_item(self, pred, target):
        return l1_loss(pred, target, reduction="none")


@LOSSES.register_module()
class GIoULoss(TaskLoss):
    """``1 - GIoU`` of ``xyxy`` boxes ``[..., 4]``."""

    default_name = "giou"

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", name: str | None = None, eps: float = 1e-7):
        super().__init__(loss_weight, reduction, name)
        self.eps = float(eps)

    def per_item(self, pred, target):
        return giou_loss(pred, target, self.eps, reduction="none")


@LOSSES.register_module()
class TemporalIoULoss(TaskLoss):
    """``1 - IoU`` of ``(start, end)`` spans ``[..., 2]``."""

    default_name = "tiou"

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", name: str | None = None, eps: float = 1e-7):
        super().__init__(loss_weight, reduction, name)
        self.eps = float(eps)

    def per_item(self, pred, target):
        return temporal_iou_loss(pred, target, self.eps, reduction="none")


@LOSSES.register_module()
class TemporalGIoULoss(TemporalIoULoss):
    """``1 - GIoU`` of ``(start, end)`` spans ``[..., 2]``."""

    default_name = "tgiou"

    def per_item(self, pred, target):
        return temporal_giou_loss(pred, target, self.eps, reduction="none")


@LOSSES.register_module()
class DiceLoss(TaskLoss):
    """Dice loss of mask logits ``[N, ...]`` against binary masks, one per item."""

    default_name = "dice"

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", name: str | None = None, smooth: float = 1.0):
        super().__init__(loss_weight, reduction, name)
        if smooth < 0:
            raise ValueError(f"{current_config_key('smooth')}: must be >= 0, got {smooth!r}")
        self.smooth = float(smooth)

    def per_item(self, pred, target):
        return dice_loss(pred, target, self.smooth, reduction="none")


@LOSSES.register_module()
class SigmoidFocalLoss(TaskLoss):
    """Sigmoid focal loss of logits ``[N, ...]``: averaged over each item's
    elements, then reduced over the items (``mean`` of equal-sized items is
    the element mean of ``torchvision.ops.sigmoid_focal_loss``)."""

    default_name = "focal"

    def __init__(
        self,
        loss_weight: float = 1.0,
        reduction: str = "mean",
        name: str | None = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__(loss_weight, reduction, name)
        if gamma < 0:
            raise ValueError(f"{current_config_key('gamma')}: must be >= 0, got {gamma!r}")
        if alpha > 1:
            raise ValueError(f"{current_config_key('alpha')}: must be <= 1 (negative disables it), got {alpha!r}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def per_item(self, pred, target):
        loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, reduction="none")
        return loss if loss.dim() <= 1 else loss.reshape(loss.shape[0], -1).mean(-1)


@LOSSES.register_module()
class SaliencyMarginLoss(TaskLoss):
    """Pairwise margin loss on per-frame saliency scores ``[B, T]`` against
    saliency labels ``[B, T]`` (binary "in a target span" or graded scores);
    ``weight`` is the ``[B, T]`` valid-frame mask. Samples without a pair of
    frames of different labels do not count."""

    default_name = "saliency"

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", name: str | None = None, margin: float = 0.2):
        super().__init__(loss_weight, reduction, name)
        if margin < 0:
            raise ValueError(f"{current_config_key('margin')}: must be >= 0, got {margin!r}")
        self.margin = float(margin)

    def forward(self, pred, target, weight=None, avg_factor=None):
        per_sample, has_pairs = saliency_margin_loss(pred, target, weight, self.margin, reduction="none")
        value = weight_reduce(per_sample, has_pairs, self.reduction, avg_factor)
        return {self.name: self.loss_weight * value}


@LOSSES.register_module()
class CrossEntropyLoss(TaskLoss):
    """Softmax cross-entropy of ``logits [N, K]`` and class indices ``[N]``
    (``ignore_index`` skipped, optional per-class ``class_weight``); the
    moment head's foreground/background loss is one of these."""

    default_name = "ce"

    def __init__(
        self,
        loss_weight: float = 1.0,
        reduction: str = "mean",
        name: str | None = None,
        class_weight: Sequence[float] | None = None,
        ignore_index: int = -100,
    ):
        super().__init__(loss_weight, reduction, name)
        self.class_weight: tuple[float, ...] | None = None
        if class_weight is not None:
            values = tuple(float(v) for v in class_weight)
            if any(not math.isfinite(v) or v < 0 for v in values):
                raise ValueError(
                    f"{current_config_key('class_weight')}: must be finite numbers >= 0, got {class_weight!r}"
                )
            self.class_weight = values
        self.ignore_index = int(ignore_index)

    def forward(self, pred, target, weight=None, avg_factor=None):
        # per item: class_weight[y] * -log p(y), 0 where ignored
        per_item = cross_entropy(pred, target, self.class_weight, self.ignore_index, reduction="none")
        keep = target != self.ignore_index
        denom = keep.to(per_item.dtype)
        if self.class_weight is not None:
            cw = torch.tensor(self.class_weight, dtype=per_item.dtype, device=per_item.device)
            denom = denom * cw[torch.where(keep, target, torch.zeros_like(target)).long()]
        if weight is not None:
            if weight.shape != per_item.shape:
                raise ValueError(f"weight must be [N] = {tuple(per_item.shape)}, got {tuple(weight.shape)}")
            per_item = per_item * weight.to(per_item.dtype)
            denom = denom * weight.to(per_item.dtype)
        if self.reduction == "sum":
            value = per_item.sum()
        elif avg_factor is not None:
            value = per_item.sum() / avg_factor
        else:  # F.cross_entropy's convention: divide by the summed weights of the kept items
            value = per_item.sum() / denom.sum().clamp(min=torch.finfo(per_item.dtype).eps)
        return {self.name: self.loss_weight * value}


@LOSSES.register_module()
class TaskAssignmentLoss(CrossEntropyLoss):
    """Task-assignment cross-entropy: logits ``[N, num_tasks]`` of which task
    (region, temporal, segmentation, tracking, ..., or none) a sample asks
    for, against the task indices ``[N]``."""

    default_name = "task_assignment"
