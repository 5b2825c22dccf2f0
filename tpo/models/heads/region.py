"""Region (box) grounding: one normalised box from the task query.

``RegionHead`` is the paper's: an MLP on the query, so the LLM must put where
the object is into its hidden state. ``RegionDecoderHead`` reads the image
too: the query attends to the patch features and points at the object."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tpo.losses.task import box_cxcywh_to_xyxy
from tpo.registry import TASK_HEADS

from .base import (
    MLP,
    TaskHead,
    as_target_tensor,
    batch_size_check,
    build_loss_module,
    check_attention_width,
    check_nonneg_float,
    check_positive_int,
    frame_times,
    grid_centres,
    grid_sine_embedding,
    require_target,
    sine_embedding,
    small_init_,
    target_ids,
    validate_boxes,
)


class _BoxLossMixin:
    """L1 + GIoU on ``predictions['boxes'] [B, 4]`` xyxy; postprocess clips to [0, 1]."""

    target_keys = ("boxes",)

    def _build_losses(self, loss_l1: Mapping | None, loss_giou: Mapping | None) -> None:
        self.loss_l1 = build_loss_module(loss_l1, "loss_l1")
        self.loss_giou = build_loss_module(loss_giou, "loss_giou")

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


@TASK_HEADS.register_module()
class RegionHead(_BoxLossMixin, TaskHead):
    """An MLP from the task query ``[B, in_dim]`` to a sigmoid ``(cx, cy, w, h)``,
    returned as normalised ``xyxy``.

    ``forward(query) -> {'boxes': [B, 4] xyxy, 'boxes_cxcywh': [B, 4]}``
    (``visual`` and other inputs are ignored);
    ``loss(predictions, {'boxes': [B, 4], 'ids'?}) -> {'l1', 'giou', 'loss'}``;
    ``postprocess -> {'boxes': [B, 4]}`` clipped to [0, 1]."""

    task = "region"

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
        self._build_losses(loss_l1, loss_giou)

    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        cxcywh = self.mlp(self.check_query(query)).sigmoid()
        return {"boxes": box_cxcywh_to_xyxy(cxcywh), "boxes_cxcywh": cxcywh}


@TASK_HEADS.register_module()
class RegionDecoderHead(_BoxLossMixin, TaskHead):
    """A box from the task query and the image (or video) features.

    The patch features ``[B, T, N, C]`` are projected to ``hidden_dim`` plus a
    2-D sine embedding of their place and one of their frame's time; the
    projected query is one token that runs ``num_layers`` blocks of
    (cross-attention to every patch of every real frame, MLP), pre-norm, the
    values carrying the positions too. The token then points: a softmax over
    the patches scored by ``loc_q(token) . loc_k(patch)``, whose expectation
    over the patch centres is the box centre, moved by at most half a cell
    (``tanh``) and sized by a box MLP on the token and what it points at
    (sigmoid width and height; the box starts at the expected centre, half
    the frame wide). A video's box is the object's on the frame the
    annotation gives (its first visible sampled frame in ``tpo data synth``),
    which the token learns to pick from the frame times.

    Why it exists: at small sizes the paper's ``RegionHead`` never gets the
    object's place into the LLM's hidden state. On held-out synthetic scenes
    (``tpo data synth`` images at 32 px, 2-4 shapes, through the tiny
    configs' frozen random ViT with its 4x4 patches; hidden 64, one layer;
    the query a learnt embedding of the named shape's colour and kind;
    1,500 steps of 64; 904 test boxes) the MLP head reached Acc@0.5 0.01 and
    0.00 where this head reached 0.26 from 111 training boxes and 0.73 from
    5,937 (``benchmarks/bench_localisation.py``; ``tests/models/test_heads.py``
    checks the same on lit cells: mean IoU 0.89 against the MLP's 0.03).

    ``forward(query, visual) -> {'boxes': [B, 4] xyxy, 'boxes_cxcywh': [B, 4],
    'point_logits': [B, T * N]}``; ``loss`` and ``postprocess`` as ``RegionHead``'s."""

    task = "region"
    requires_visual = True

    def __init__(
        self,
        in_dim: int,
        visual_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        dropout: float = 0.0,
        loss_l1: Mapping | None = dict(type="L1Loss", loss_weight=5.0),
        loss_giou: Mapping | None = dict(type="GIoULoss", loss_weight=2.0),
    ):
        super().__init__(in_dim)
        self.visual_dim = check_positive_int(visual_dim, "visual_dim")
        self.hidden_dim = check_attention_width(hidden_dim, num_heads)
        dropout = check_nonneg_float(dropout, "dropout")
        self.query_proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.feature_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden_dim))
        layers = check_positive_int(num_layers, "num_layers")
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.cross_attn = nn.ModuleList(
            nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True) for _ in range(layers)
        )
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.mlps = nn.ModuleList(MLP(hidden_dim, 4 * hidden_dim, hidden_dim, 2, dropout) for _ in range(layers))
        self.loc_q = nn.Linear(hidden_dim, hidden_dim)
        self.loc_k = nn.Linear(hidden_dim, hidden_dim)
        self.box_head = MLP(2 * hidden_dim, hidden_dim, 4, 3)
        small_init_(self.box_head.last)  # the expected centre, half the frame wide
        self._build_losses(loss_l1, loss_giou)

    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        query = self.check_query(query)
        v = self.check_visual(visual, self.visual_dim, query.shape[0])
        feats, frame_mask = v["features"], v["frame_mask"]
        b, t, n, _ = feats.shape
        h, w = v["grid_size"]
        d = self.hidden_dim
        place = grid_sine_embedding((h, w), d, device=feats.device).to(feats.dtype)  # [N, D]
        when = sine_embedding(frame_times(frame_mask), d, max_frequency=8.0).to(feats.dtype)  # [B, T, D]
        keys = (self.feature_proj(feats) + place + when[:, :, None]).reshape(b, t * n, d)
        padding = (~frame_mask)[:, :, None].expand(b, t, n).reshape(b, t * n)
        tok = self.query_proj(query)[:, None]
        for norm, attn, mlp_norm, mlp in zip(self.attn_norms, self.cross_attn, self.mlp_norms, self.mlps):
            tok = tok + attn(norm(tok), keys, keys, key_padding_mask=padding, need_weights=False)[0]
            tok = tok + mlp(mlp_norm(tok))
        tok = tok[:, 0]
        logits = torch.einsum("bd,bnd->bn", self.loc_q(tok), self.loc_k(keys)) / d**0.5
        logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min)
        weights = logits.softmax(-1)
        centres = grid_centres((h, w), device=feats.device).to(weights.dtype).repeat(t, 1)  # [T * N, 2]
        out = self.box_head(torch.cat((tok, torch.einsum("bn,bnd->bd", weights, keys)), dim=-1))
        cell = torch.tensor([0.5 / w, 0.5 / h], device=out.device, dtype=out.dtype)
        centre = (weights @ centres + cell * torch.tanh(out[:, :2])).clamp(0.0, 1.0)
        cxcywh = torch.cat((centre, out[:, 2:].sigmoid()), dim=-1)
        return {"boxes": box_cxcywh_to_xyxy(cxcywh), "boxes_cxcywh": cxcywh, "point_logits": logits}
