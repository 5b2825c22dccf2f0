"""Hungarian matching of set predictions to targets (DETR-style heads).

``hungarian_match`` solves one cost matrix with
``scipy.optimize.linear_sum_assignment``; ``SpanMatcher`` builds the cost of a
moment head's predicted spans against a sample's target spans (span L1,
temporal GIoU, foreground probability) and matches every sample of a batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tpo.losses.task import temporal_giou_pairwise


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The minimum-cost one-to-one assignment of the rows (predictions) of
    ``cost [Q, G]`` to its columns (targets): ``(rows, cols)`` long tensors of
    ``min(Q, G)`` pairs, rows ascending, on ``cost``'s device."""
    if not isinstance(cost, Tensor):
        raise TypeError(f"cost must be a tensor, got {type(cost).__name__}")
    if cost.dim() != 2:
        raise ValueError(f"cost must be a [num_predictions, num_targets] matrix, got shape {tuple(cost.shape)}")
    if cost.numel() and not torch.isfinite(cost).all():
        raise ValueError("cost has NaN or infinite entries; check the predictions and targets it was built from")
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cost.device)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=cost.device)  # noqa: E731
    return as_tensor(rows), as_tensor(cols)


def batched_hungarian_match(costs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``hungarian_match`` of every sample's ``[Q, G_i]`` cost matrix."""
    return [hungarian_match(c) for c in costs]


class SpanMatcher:
    """Match predicted spans ``[B, Q, 2]`` (``(start, end)``) with foreground
    logits ``[B, Q, 2]`` (index 0 = foreground) to each sample's target spans
    ``[G_i, 2]``. The cost is ``cost_span * L1 - cost_giou * tGIoU -
    cost_class * p(foreground)``."""

    def __init__(self, cost_span: float = 10.0, cost_giou: float = 1.0, cost_class: float = 4.0):
        for name, value in (("cost_span", cost_span), ("cost_giou", cost_giou), ("cost_class", cost_class)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if cost_span == cost_giou == cost_class == 0:
            raise ValueError("at least one of cost_span, cost_giou, cost_class must be > 0")
        self.cost_span = float(cost_span)
        self.cost_giou = float(cost_giou)
        self.cost_class = float(cost_class)

    def cost(self, pred_spans: Tensor, pred_logits: Tensor | None, target_spans: Tensor) -> Tensor:
        """The ``[Q, G]`` cost of one sample."""
        pred = pred_spans.float()
        target = target_spans.to(pred.device).float()
        cost = self.cost_span * torch.cdist(pred, target, p=1)
        if self.cost_giou:
            cost = cost - self.cost_giou * temporal_giou_pairwise(pred, target)
        if self.cost_class and pred_logits is not None:
            cost = cost - self.cost_class * pred_logits.float().softmax(-1)[:, 0:1]
        return cost

    @torch.no_grad()
    def __call__(
        self, pred_spans: Tensor, pred_logits: Tensor | None, target_spans: Sequence[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        if pred_spans.dim() != 3 or pred_spans.shape[-1] != 2:
            raise ValueError(f"pred_spans must be [B, Q, 2], got {tuple(pred_spans.shape)}")
        if len(target_spans) != pred_spans.shape[0]:
            raise ValueError(f"{len(target_spans)} target span sets for a batch of {pred_spans.shape[0]} predictions")
        return [
            hungarian_match(self.cost(pred_spans[b], None if pred_logits is None else pred_logits[b], target_spans[b]))
            for b in range(pred_spans.shape[0])
        ]
