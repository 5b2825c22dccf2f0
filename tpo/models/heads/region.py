"""Region (box) grounding: one normalised box from the task query."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from tpo.losses.task import box_cxcywh_to_xyxy
from tpo.registry import TASK_HEADS

from .base import (
    MLP,
    TaskHead,
    as_target_tensor,
    batch_size_check,
    build_loss_module,
    check_positive_int,
    require_target,
    small_init_,
    target_ids,
    validate_boxes,
)


@TASK_HEADS.register_module()
class RegionHead(TaskHead):
    """An MLP from the task query ``[B, in_dim]`` to a sigmoid ``(cx, cy, w, h)``,
    returned as normalised ``xyxy``.

    ``forward(query) -> {'boxes': [B, 4] xyxy, 'boxes_cxcywh': [B, 4]}``
    (``visual`` and other inputs are ignored);
    ``loss(predictions, {'boxes': [B, 4], 'ids'?}) -> {'l1', 'giou', 'loss'}``;
    ``postprocess -> {'boxes': [B, 4]}`` clipped to [0, 1]."""

    task = "region"
    target_keys = ("boxes",)

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 3,
        dropout: float = 0.0,
        loss_l1: Mapping | None = dict(type="L1Loss", loss_weight=5.0),
        loss_giou: Mapping | None = dict(type="GIoULoss", loss_weight=2.0),
    ):
        super().__init__(in_dim)
        check_positive_int(hidden_dim, "hidden_dim")
        self.mlp = MLP(in_dim, hidden_dim, 4, num_layers, dropout)
        small_init_(self.mlp.last)  # starts near the centred half-size box
        self.loss_l1 = build_loss_module(loss_l1, "loss_l1")
        self.loss_giou = build_loss_module(loss_giou, "loss_giou")

    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        cxcywh = self.mlp(self.check_query(query)).sigmoid()
        return {"boxes": box_cxcywh_to_xyxy(cxcywh), "boxes_cxcywh": cxcywh}

    def loss(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Tensor]:
        pred = predictions["boxes"]
        boxes = as_target_tensor(require_target(targets, "boxes", self.name), "boxes", self.name).to(pred.device)
        if boxes.dim() != 2:
            raise ValueError(f"{self.name}.loss: targets['boxes'] must be [B, 4], got {tuple(boxes.shape)}")
        batch_size_check(boxes.shape[0], pred.shape[0], "boxes", self.name)
        validate_boxes(boxes, "boxes", target_ids(targets), self.name)
        boxes = boxes.to(pred.dtype)
        parts = [loss(pred, boxes) for loss in (self.loss_l1, self.loss_giou) if loss is not None]
        return self.total(*parts)

    def postprocess(self, predictions: Mapping[str, Any], **inputs: Any) -> dict[str, Tensor]:
        return {"boxes": predictions["boxes"].float().clamp(0.0, 1.0)}
