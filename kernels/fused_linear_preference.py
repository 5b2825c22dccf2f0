"""Fused LM head + preference loss: the DPO family (and SimPO, CPO, ORPO, KTO)
straight from the policy's last hidden states, without the ``[N, V]`` logits.

The per-sequence log-probs of chosen and rejected completions come from
:func:`tpo.kernels.fused_linear_logprob` (``reduction="sum"``, plus the token
counts); the reference's come either precomputed (``ref_chosen_logps``,
``ref_rejected_logps``) or from the reference's hidden states and head
(``ref_hidden`` with ``ref_weight``/``ref_bias``, run under ``no_grad``, and only
when the loss reads a reference). The loss is any preference loss of
``tpo.registry.LOSSES``, given as a config dict, a registered name or a module.

Layouts: ``hidden`` ``[2B, T, H]`` with the B chosen sequences first and the B
rejected after (TRL's concatenated forward; ``labels`` ``[2B, T]``), or
``hidden`` ``[B, T, H]`` for the chosen and ``rejected_hidden`` ``[B', T', H]``
with ``rejected_labels`` (then ``ref_hidden``/``ref_rejected_hidden`` alike).
Labels are aligned with the hidden states (already shifted) and
``ignore_index`` marks prompt and padding positions.

Returns ``(loss, metrics)``: the differentiable scalar and a dict of detached
scalars with TRL's names (``loss``, ``rewards/chosen``, ``rewards/margins``,
``logps/chosen``, ..., and ``logits/chosen``/``logits/rejected``: the mean raw
logit over the completion tokens and the vocabulary, computed from the mean
row of the head without the logits).

>>> loss_fn = FusedLinearPreferenceLoss(loss=dict(type="DPOLoss", beta=0.1))
>>> loss, metrics = loss_fn(hidden, lm_head.weight, labels, ref_hidden=ref_hidden)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .fused_linear_logprob import fused_linear_logprob

__all__ = ["FusedLinearPreferenceLoss", "fused_linear_preference_loss", "build_preference_loss"]


def build_preference_loss(loss: Any = None) -> nn.Module:
    """A preference loss module from ``None`` (``DPOLoss()``), a registered name,
    a config dict with a ``type``, or a module (returned as is)."""
    from tpo.losses.preference import PreferenceLoss
    from tpo.registry import build_loss

    if loss is None:
        loss = dict(type="DPOLoss")
    if isinstance(loss, str):
        loss = dict(type=loss)
    if isinstance(loss, Mapping):
        loss = build_loss(dict(loss))
    if not isinstance(loss, PreferenceLoss):
        raise TypeError(
            f"fused_linear_preference_loss: loss must be a preference loss (a config dict such as "
            f"dict(type='DPOLoss', beta=0.1), a registered name or a PreferenceLoss module), got {type(loss).__name__}"
        )
    return loss


def _three_d(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"fused_linear_preference_loss: {what} must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"fused_linear_preference_loss: {what} must be [batch, T, H], got shape {tuple(x.shape)}")
    return x


def _split_layout(hidden, labels, rejected_hidden, rejected_labels):
    """(chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, concatenated)."""
    _three_d(hidden, "hidden")
    if rejected_hidden is None:
        if rejected_labels is not None:
            raise ValueError(
                "fused_linear_preference_loss: rejected_labels given without rejected_hidden; pass both, or neither "
                "with hidden = cat(chosen, rejected) [2B, T, H] and labels [2B, T]"
            )
        if hidden.shape[0] % 2:
            raise ValueError(
                f"fused_linear_preference_loss: hidden has an odd batch {hidden.shape[0]}; the concatenated layout is "
                "[2B, T, H] (B chosen then B rejected), or pass rejected_hidden/rejected_labels separately"
            )
        return hidden, labels, None, None, True
    _three_d(rejected_hidden, "rejected_hidden")
    if rejected_labels is None:
        raise ValueError("fused_linear_preference_loss: rejected_hidden needs rejected_labels")
    return hidden, labels, rejected_hidden, rejected_labels, False


def _logps(hidden, weight, labels, bias, rejected_hidden, rejected_labels, concatenated, kw):
    if concatenated:
        out = fused_linear_logprob(hidden, weight, labels, bias, reduction="sum", **kw)
        half = hidden.shape[0] // 2
        return out.logps[:half], out.logps[half:], out.counts[:half], out.counts[half:]
    chosen = fused_linear_logprob(hidden, weight, labels, bias, reduction="sum", **kw)
    rejected = fused_linear_logprob(rejected_hidden, weight, rejected_labels, bias, reduction="sum", **kw)
    return chosen.logps, rejected.logps, chosen.counts, rejected.counts


@torch.no_grad()
def _mean_logit(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, ignore_index: int) -> Tensor:
    """Mean of the raw logits over the non-ignored tokens and the whole vocabulary:
    ``mean_n (h_n . mean_v W_v + mean_v b_v)``, without the logits."""
    mask = labels != ignore_index
    if not bool(mask.any()):
        return torch.zeros((), device=hidden.device)
    mean_row = weight.mean(0, dtype=torch.float32)
    per_token = hidden[mask].float() @ mean_row
    if bias is not None:
        per_token = per_token + bias.mean(dtype=torch.float32)
    return per_token.mean()


def fused_linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    loss: Any = None,
    rejected_hidden: Tensor | None = None,
    rejected_labels: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_rejected_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    logit_metrics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference loss of the policy's LM head on chosen/rejected hidden states.

    Args:
        hidden, labels: ``[2B, T, H]``/``[2B, T]`` chosen-then-rejected, or the chosen
            ``[B, T, H]``/``[B, T]`` with ``rejected_hidden``/``rejected_labels``.
        weight, bias: the policy's LM head ``[V, H]`` (and ``[V]``).
        loss: a preference loss: config dict, registered name or module (default ``DPOLoss()``).
            Stateful losses (``bco_pair``'s running mean) keep their state only in a module
            passed in (or in :class:`FusedLinearPreferenceLoss`).
        ref_chosen_logps, ref_rejected_logps: precomputed ``[B]`` reference log-prob sums, or
        ref_hidden (``ref_rejected_hidden``), ref_weight, ref_bias: the reference's hidden states in
            the policy's layout and its head (default: the policy's head, detached).
        loss_kwargs: extra inputs of the loss (KTO's ``kl_logps``, ``ref_kl_logps``).
        ignore_index, temperature, backend, chunk_size: as in :func:`fused_linear_logprob`.
        logit_metrics: add TRL's ``logits/chosen``/``logits/rejected`` (cheap: one matvec).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached scalars (TRL names).
    """
    loss_fn = build_preference_loss(loss)
    h_c, y_c, h_r, y_r, concatenated = _split_layout(hidden, labels, rejected_hidden, rejected_labels)
    kw = dict(ignore_index=ignore_index, temperature=temperature, backend=backend, chunk_size=chunk_size)
    chosen, rejected, chosen_n, rejected_n = _logps(h_c, weight, y_c, bias, h_r, y_r, concatenated, kw)

    ref_c = ref_r = None
    if loss_fn.needs_reference:
        precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
        if precomputed and ref_hidden is not None:
            raise ValueError(
                "fused_linear_preference_loss: give the reference either as ref_chosen_logps/ref_rejected_logps "
                "or as ref_hidden, not both"
            )
        if precomputed:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("fused_linear_preference_loss: pass both ref_chosen_logps and ref_rejected_logps")
            ref_c, ref_r = ref_chosen_logps.detach(), ref_rejected_logps.detach()
        elif ref_hidden is not None:
            _three_d(ref_hidden, "ref_hidden")
            if concatenated and ref_rejected_hidden is not None:
                raise ValueError(
                    "fused_linear_preference_loss: hidden is concatenated [2B, T, H], so ref_hidden must be too; "
                    "drop ref_rejected_hidden"
                )
            if not concatenated and ref_rejected_hidden is None:
                raise ValueError(
                    "fused_linear_preference_loss: with rejected_hidden given separately, pass the reference alike: "
                    "ref_hidden for the chosen and ref_rejected_hidden for the rejected"
                )
            rh_c = ref_hidden
            rh_r = None if concatenated else _three_d(ref_rejected_hidden, "ref_rejected_hidden")
            for what, ref, pol in (("ref_hidden", rh_c, h_c), ("ref_rejected_hidden", rh_r, h_r)):
                if ref is not None and ref.shape[:2] != pol.shape[:2]:
                    raise ValueError(
                        f"fused_linear_preference_loss: {what} shape {tuple(ref.shape)} must match the policy's "
                        f"[batch, T] = {tuple(pol.shape[:2])} (the labels are shared)"
                    )
            if ref_weight is None:
                if ref_bias is not None:
                    raise ValueError("fused_linear_preference_loss: ref_bias given without ref_weight")
                ref_weight, ref_bias = weight, bias
            with torch.no_grad():
                ref_c, ref_r, _, _ = _logps(
                    rh_c.detach(), ref_weight.detach(), y_c, None if ref_bias is None else ref_bias.detach(),
                    None if rh_r is None else rh_r.detach(), y_r, concatenated, kw,
                )
        else:
            raise ValueError(
                f"fused_linear_preference_loss: {type(loss_fn).__name__} needs a reference: pass "
                "ref_chosen_logps/ref_rejected_logps (per-sequence sums) or ref_hidden (and ref_weight), "
                "or use a reference-free loss (reference_free=True, SimPO, CPO, ORPO)"
            )

    out = loss_fn(
        chosen, rejected, ref_c, ref_r,
        chosen_lengths=chosen_n.to(chosen.dtype), rejected_lengths=rejected_n.to(rejected.dtype),
        **dict(loss_kwargs or {}),
    )
    value = out["loss"]
    metrics = {key: val.detach() for key, val in out.items()}
    if logit_metrics:
        if concatenated:
            half = h_c.shape[0] // 2
            metrics["logits/chosen"] = _mean_logit(h_c[:half], y_c[:half], weight, bias, ignore_index)
            metrics["logits/rejected"] = _mean_logit(h_c[half:], y_c[half:], weight, bias, ignore_index)
        else:
            metrics["logits/chosen"] = _mean_logit(h_c, y_c, weight, bias, ignore_index)
            metrics["logits/rejected"] = _mean_logit(h_r, y_r, weight, bias, ignore_index)
    return value, metrics


class FusedLinearPreferenceLoss(nn.Module):
    """Module form of :func:`fused_linear_preference_loss`: holds the loss (built once
    from its config, so stateful losses keep their state) and the kernel options.

    >>> loss_fn = FusedLinearPreferenceLoss(loss=dict(type="DPOLoss", loss_type="sigmoid", beta=0.1))
    >>> loss, metrics = loss_fn(hidden, lm_head.weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
    """

    def __init__(self, loss: Any = None, ignore_index: int = -100, temperature: float = 1.0,
                 backend: str = "auto", chunk_size: int | None = None, logit_metrics: bool = True):
        super().__init__()
        self.loss = build_preference_loss(loss)
        self.ignore_index, self.temperature = ignore_index, temperature
        self.backend, self.chunk_size, self.logit_metrics = backend, chunk_size, logit_metrics

    @property
    def needs_reference(self) -> bool:
        return self.loss.needs_reference

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, **kwargs):
        return fused_linear_preference_loss(
            hidden, weight, labels, bias, loss=self.loss, ignore_index=self.ignore_index,
            temperature=self.temperature, backend=self.backend, chunk_size=self.chunk_size,
            logit_metrics=self.logit_metrics, **kwargs,
        )
