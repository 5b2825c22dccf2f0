"""Temporal grounding: spans ``(start, end)`` normalised to the video length.

* ``SpanHead``: an MLP from the task query to one span.
* ``MomentDETRHead``: a query-based (DETR-style) moment head. The task query
  conditions a small transformer over per-frame features (patch features
  mean-pooled per frame); a set of moment queries predicts ``(centre, width)``
  spans with foreground scores, and every frame a saliency score. Trained with
  Hungarian matching on span L1 + temporal GIoU + foreground probability, and
  losses span L1, temporal GIoU, foreground cross-entropy and a saliency
  margin loss.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from tpo.losses.task import span_cw_to_se
from tpo.models.matching import SpanMatcher
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
    require_target,
    sample_name,
    sine_embedding,
    small_init_,
    target_ids,
    validate_spans,
)


def order_spans(spans: Tensor) -> Tensor:
    """Spans clipped to [0, 1] with ``start <= end``."""
    spans = spans.float().clamp(0.0, 1.0)
    return torch.stack((spans.min(-1).values, spans.max(-1).values), dim=-1)


@TASK_HEADS.register_module()
class SpanHead(TaskHead):
    """An MLP from the task query ``[B, in_dim]`` to a sigmoid ``(centre, width)``
    span, returned as ``(start, end)``.

    ``forward(query) -> {'spans': [B, 2], 'spans_cw': [B, 2]}`` (``visual``
    ignored); ``loss(predictions, {'spans': [B, 2], 'ids'?}) -> {'l1', 'tgiou',
    'loss'}``; ``postprocess -> {'spans': [B, 2]}`` clipped and ordered."""

    task = "temporal"
    target_keys = ("spans",)

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 3,
        dropout: float = 0.0,
        loss_l1: Mapping | None = dict(type="L1Loss", loss_weight=10.0),
        loss_giou: Mapping | None = dict(type="TemporalGIoULoss", loss_weight=1.0),
    ):
        super().__init__(in_dim)
        check_positive_int(hidden_dim, "hidden_dim")
        self.mlp = MLP(in_dim, hidden_dim, 2, num_layers, dropout)
        small_init_(self.mlp.last)  # starts near the centred half-length span
        self.loss_l1 = build_loss_module(loss_l1, "loss_l1")
        self.loss_giou = build_loss_module(loss_giou, "loss_giou")

    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        cw = self.mlp(self.check_query(query)).sigmoid()
        return {"spans": span_cw_to_se(cw), "spans_cw": cw}

    def loss(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Tensor]:
        pred = predictions["spans"]
        spans = as_target_tensor(require_target(targets, "spans", self.name), "spans", self.name).to(pred.device)
        if spans.dim() == 3 and spans.shape[1] == 1:
            spans = spans[:, 0]
        if spans.dim() != 2 or spans.shape[1] != 2:
            raise ValueError(
                f"{self.name}.loss: targets['spans'] must be [B, 2] (one span per sample), got {tuple(spans.shape)}"
            )
        batch_size_check(spans.shape[0], pred.shape[0], "spans", self.name)
        ids = target_ids(targets)
        for i in range(spans.shape[0]):
            validate_spans(spans[i], "spans", i, ids, self.name)
        spans = spans.to(pred.dtype)
        return self.total(*[loss(pred, spans) for loss in (self.loss_l1, self.loss_giou) if loss is not None])

    def postprocess(self, predictions: Mapping[str, Any], **inputs: Any) -> dict[str, Tensor]:
        return {"spans": order_spans(predictions["spans"])}


@TASK_HEADS.register_module()
class MomentDETRHead(TaskHead):
    """Query-based moment head.

    Per-frame features: ``visual['features'] [B, T, N, C]`` mean-pooled over
    the ``N`` patches, projected to ``hidden_dim`` plus a sine embedding of
    the frame's normalised time. The projected task query is prepended as a
    token and a ``num_encoder_layers`` transformer encoder runs over
    ``[query; frames]`` (padded frames masked by ``visual['frame_mask']``).
    ``num_queries`` learned moment queries, plus the projected task query,
    attend the encoded frames in a ``num_decoder_layers`` transformer decoder;
    each predicts a sigmoid ``(centre, width)`` span and foreground/background
    logits. Saliency ``[B, T]`` is the scaled dot product of the encoded
    frames with the encoded task token.

    ``forward -> {'pred_spans': [B, Q, 2] (start, end), 'pred_logits': [B, Q, 2]
    (index 0 = foreground), 'saliency': [B, T], 'frame_mask': [B, T]}``

    ``loss(predictions, targets)``: ``targets['spans']``: ``[B, 2]``,
    ``[B, G, 2]`` or a list of ``B`` ``[G_i, 2]`` tensors; optional
    ``targets['saliency'] [B, T]`` (graded saliency labels; by default a frame
    is positive when its centre time lies in a target span). Returns
    ``{'span_l1', 'span_giou', 'foreground_ce', 'saliency', 'loss'}`` (names
    from the loss configs).

    ``postprocess -> {'spans': [B, 2] best span, 'all_spans': [B, Q, 2] by
    descending score, 'scores': [B, Q] foreground probabilities, 'saliency':
    [B, T]}``."""

    task = "temporal"
    requires_visual = True
    target_keys = ("spans", "saliency")

    def __init__(
        self,
        in_dim: int,
        visual_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 10,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        cost_span: float = 10.0,
        cost_giou: float = 1.0,
        cost_class: float = 4.0,
        loss_span: Mapping | None = dict(type="L1Loss", loss_weight=10.0, name="span_l1"),
        loss_giou: Mapping | None = dict(type="TemporalGIoULoss", loss_weight=1.0, name="span_giou"),
        loss_class: Mapping | None = dict(
            type="CrossEntropyLoss", loss_weight=4.0, class_weight=[1.0, 0.1], name="foreground_ce"
        ),
        loss_saliency: Mapping | None = dict(type="SaliencyMarginLoss", loss_weight=1.0, margin=0.2),
    ):
        super().__init__(in_dim)
        self.visual_dim = check_positive_int(visual_dim, "visual_dim")
        self.hidden_dim = check_attention_width(hidden_dim, num_heads, multiple=2)
        self.num_queries = check_positive_int(num_queries, "num_queries")
        ffn_dim = check_positive_int(ffn_dim if ffn_dim is not None else 4 * hidden_dim, "ffn_dim")
        dropout = check_nonneg_float(dropout, "dropout")

        self.query_proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.frame_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden_dim))
        self.token_type = nn.Embedding(2, hidden_dim)  # 0: task query token, 1: frame token
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(hidden_dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True),
            check_positive_int(num_encoder_layers, "num_encoder_layers"),
            enable_nested_tensor=False,
        )
        self.encoder_norm = nn.LayerNorm(hidden_dim)
        self.moment_queries = nn.Embedding(num_queries, hidden_dim)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True),
            check_positive_int(num_decoder_layers, "num_decoder_layers"),
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.span_head = MLP(hidden_dim, hidden_dim, 2, 3)
        self.class_head = nn.Linear(hidden_dim, 2)
        self.saliency_frame = nn.Linear(hidden_dim, hidden_dim, bias=False)  # a bias would shift all frames alike
        self.saliency_query = nn.Linear(hidden_dim, hidden_dim)
        # the moment queries start spread over the video (a learned per-query centre prior), widths ~0.27
        small_init_(self.span_head.last, bias=(0.0, -1.0))
        self.query_centres = nn.Parameter(
            torch.logit((torch.arange(num_queries, dtype=torch.float32) + 0.5) / num_queries)
        )

        self.matcher = SpanMatcher(cost_span=cost_span, cost_giou=cost_giou, cost_class=cost_class)
        self.loss_span = build_loss_module(loss_span, "loss_span")
        self.loss_giou = build_loss_module(loss_giou, "loss_giou")
        self.loss_class = build_loss_module(loss_class, "loss_class")
        self.loss_saliency = build_loss_module(loss_saliency, "loss_saliency")

    # ------------------------------------------------------------------ #
    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        query = self.check_query(query)
        v = self.check_visual(visual, self.visual_dim, query.shape[0])
        frame_mask = v["frame_mask"]
        frames = self.frame_proj(v["features"].mean(2))  # [B, T, D]
        time_pos = sine_embedding(frame_times(frame_mask), self.hidden_dim).to(frames.dtype)
        frames = frames + time_pos + self.token_type.weight[1]
        q = self.query_proj(query)  # [B, D]
        tokens = torch.cat((q[:, None] + self.token_type.weight[0], frames), dim=1)
        padding = torch.cat((torch.zeros_like(frame_mask[:, :1]), ~frame_mask), dim=1)  # True = ignore
        encoded = self.encoder_norm(self.encoder(tokens, src_key_padding_mask=padding))
        task_token, memory = encoded[:, 0], encoded[:, 1:]

        saliency = (self.saliency_frame(memory) * self.saliency_query(task_token)[:, None]).sum(-1)
        saliency = saliency / self.hidden_dim**0.5

        moments = self.moment_queries.weight[None] + q[:, None]  # [B, Q, D]
        decoded = self.decoder_norm(self.decoder(moments, memory + time_pos, memory_key_padding_mask=~frame_mask))
        raw = self.span_head(decoded)  # [B, Q, 2]
        centre = (raw[..., 0] + self.query_centres).sigmoid()
        width = raw[..., 1].sigmoid()
        spans = span_cw_to_se(torch.stack((centre, width), dim=-1))
        return {
            "pred_spans": spans,
            "pred_logits": self.class_head(decoded),
            "saliency": saliency,
            "frame_mask": frame_mask,
        }

    # ------------------------------------------------------------------ #
    def _target_spans(self, targets: Mapping[str, Any], batch_size: int, device) -> list[Tensor]:
        raw = require_target(targets, "spans", self.name)
        ids = target_ids(targets)
        if isinstance(raw, Tensor) or not isinstance(raw, Sequence):
            spans = as_target_tensor(raw, "spans", self.name)
            if spans.dim() == 2:
                spans = spans[:, None]
            if spans.dim() != 3 or spans.shape[-1] != 2:
                raise ValueError(
                    f"{self.name}.loss: targets['spans'] must be [B, 2], [B, G, 2] or a list of [G_i, 2], "
                    f"got {tuple(spans.shape)}"
                )
            per_sample = list(spans.unbind(0))
        else:
            per_sample = [as_target_tensor(s, "spans", self.name) for s in raw]
        batch_size_check(len(per_sample), batch_size, "spans", self.name)
        out = []
        for i, s in enumerate(per_sample):
            s = s.reshape(-1, 2) if s.dim() == 1 else s
            if s.dim() != 2 or s.shape[-1] != 2:
                raise ValueError(
                    f"{self.name}.loss: targets['spans'] of {sample_name(i, ids)} must be [G, 2], got {tuple(s.shape)}"
                )
            if s.shape[0] == 0:
                raise ValueError(
                    f"{self.name}.loss: targets['spans'] of {sample_name(i, ids)} is empty (no target moment)"
                )
            if s.shape[0] > self.num_queries:
                raise ValueError(
                    f"{self.name}.loss: {sample_name(i, ids)} has {s.shape[0]} target spans, more than "
                    f"num_queries={self.num_queries}; raise num_queries"
                )
            validate_spans(s, "spans", i, ids, self.name)
            out.append(s.to(device=device, dtype=torch.float32))
        return out

    def _saliency_labels(self, targets: Mapping[str, Any], spans: list[Tensor], frame_mask: Tensor) -> Tensor:
        given = targets.get("saliency")
        if given is not None:
            labels = as_target_tensor(given, "saliency", self.name).to(frame_mask.device).float()
            if tuple(labels.shape) != tuple(frame_mask.shape):
                raise ValueError(
                    f"{self.name}.loss: targets['saliency'] must be [B, T] = {tuple(frame_mask.shape)}, "
                    f"got {tuple(labels.shape)}"
                )
            if not torch.isfinite(labels).all():
                raise ValueError(f"{self.name}.loss: targets['saliency'] has NaN or infinite values")
            return labels
        times = frame_times(frame_mask)  # [B, T]
        labels = torch.zeros_like(times)
        for i, s in enumerate(spans):
            inside = (times[i][:, None] >= s[:, 0]) & (times[i][:, None] <= s[:, 1])
            labels[i] = inside.any(1).float()
        return labels

    def loss(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Tensor]:
        pred_spans, pred_logits = predictions["pred_spans"], predictions["pred_logits"]
        saliency, frame_mask = predictions["saliency"], predictions["frame_mask"]
        b, q = pred_spans.shape[:2]
        spans = self._target_spans(targets, b, pred_spans.device)
        matches = self.matcher(pred_spans.detach(), pred_logits.detach(), spans)

        batch_idx = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)])
        pred_idx = torch.cat([rows for rows, _ in matches])
        matched_pred = pred_spans[batch_idx, pred_idx]
        matched_target = torch.cat([spans[i][cols] for i, (_, cols) in enumerate(matches)]).to(matched_pred.dtype)
        num_matched = max(matched_pred.shape[0], 1)

        parts = []
        if self.loss_span is not None:
            parts.append(self.loss_span(matched_pred, matched_target, avg_factor=num_matched))
        if self.loss_giou is not None:
            parts.append(self.loss_giou(matched_pred, matched_target, avg_factor=num_matched))
        if self.loss_class is not None:
            labels = torch.ones(b, q, dtype=torch.long, device=pred_logits.device)  # 1 = background
            labels[batch_idx, pred_idx] = 0
            parts.append(self.loss_class(pred_logits.reshape(b * q, -1), labels.reshape(-1)))
        if self.loss_saliency is not None:
            labels = self._saliency_labels(targets, spans, frame_mask)
            parts.append(self.loss_saliency(saliency, labels, weight=frame_mask))
        return self.total(*parts)

    def postprocess(self, predictions: Mapping[str, Any], **inputs: Any) -> dict[str, Tensor]:
        scores = predictions["pred_logits"].float().softmax(-1)[..., 0]
        order = scores.argsort(dim=1, descending=True)
        spans = order_spans(predictions["pred_spans"]).gather(1, order[..., None].expand(-1, -1, 2))
        saliency = predictions["saliency"].float().masked_fill(~predictions["frame_mask"], float("-inf"))
        return {"spans": spans[:, 0], "all_spans": spans, "scores": scores.gather(1, order), "saliency": saliency}
