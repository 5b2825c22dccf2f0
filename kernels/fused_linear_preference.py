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

from .fused_linear_logprob import (
    PrecomputedGradFunction,
    _check_inputs,
    _check_label_range,
    _resolve_backend,
    fused_linear_logprob,
    torch_logprob_grad_pass,
)

__all__ = ["FusedLinearPreferenceLoss", "fused_linear_preference_loss", "build_preference_loss", "STRATEGIES"]

STRATEGIES = ("auto", "pairwise", "recompute")
# The pairwise strategy holds the logits of one pair's completion tokens: at most this many fp32.
_PAIR_MAX_ELEMENTS = 1 << 28


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


def _pairwise_policy(h_c, y_c, h_r, y_r, concatenated, weight, bias, loss_fn, ref_c, ref_r, ignore_index,
                     temperature, loss_kwargs, force):
    """The policy's side in one pass per pair (strategy ``pairwise``): the logits of one pair's
    completion tokens at a time, its two log-prob sums, the pair's share of the loss and its
    gradient (the loss is pair-separable: the mean over pairs of a function of each pair), and
    at once the gradients of hidden, weight and bias. Returns None when a pair's logits would
    exceed the memory cap (the caller then recomputes instead), else ``(loss, out, counts)``."""
    h_size = weight.shape[1]
    if concatenated:
        pairs = h_c.shape[0] // 2
        t_c = t_r = h_c.shape[1]
        flat, labels = h_c.reshape(-1, h_size), y_c.reshape(-1).long()
    else:
        pairs, t_c, t_r = h_c.shape[0], h_c.shape[1], h_r.shape[1]
        flat = torch.cat([h_c.reshape(-1, h_size), h_r.reshape(-1, h_size)])
        labels = torch.cat([y_c.reshape(-1), y_r.reshape(-1)]).long()
    offset = pairs * t_c
    valid = labels != ignore_index
    counts_c = valid[:offset].view(pairs, t_c).sum(1)
    counts_r = valid[offset:offset + pairs * t_r].view(pairs, t_r).sum(1)
    sizes = (counts_c + counts_r).tolist()
    if not force and max(sizes, default=0) * weight.shape[0] > _PAIR_MAX_ELEMENTS:
        return None
    rows = valid.nonzero().squeeze(1)
    is_rejected = rows >= offset
    pair_of_row = torch.where(is_rejected, (rows - offset) // t_r, rows // t_c)
    perm = rows[torch.argsort(pair_of_row * 2 + is_rejected.long(), stable=True)]
    rows_hidden = flat.index_select(0, perm)
    rows_labels = labels.index_select(0, perm).contiguous()
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    bounds = list(zip(starts[:-1], starts[1:]))

    needs = (rows_hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    needs = needs if torch.is_grad_enabled() else (False, False, False)
    n_c, n_r = counts_c.tolist(), counts_r.tolist()
    acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
    chosen = torch.zeros(pairs, dtype=acc, device=flat.device)
    rejected = torch.zeros(pairs, dtype=acc, device=flat.device)
    lengths_c, lengths_r = counts_c.to(acc), counts_r.to(acc)
    pair_losses = []

    def row_grad(k, token):
        chosen[k] = token[: n_c[k]].sum()
        rejected[k] = token[n_c[k]:].sum()
        if not any(needs):
            return torch.zeros_like(token)
        with torch.enable_grad():
            c = chosen[k:k + 1].clone().requires_grad_(True)
            r = rejected[k:k + 1].clone().requires_grad_(True)
            one = loss_fn(c, r, None if ref_c is None else ref_c[k:k + 1], None if ref_r is None else ref_r[k:k + 1],
                          chosen_lengths=lengths_c[k:k + 1], rejected_lengths=lengths_r[k:k + 1],
                          **loss_kwargs)["loss"] / pairs
            grad_c, grad_r = torch.autograd.grad(one, (c, r))
        pair_losses.append(one.detach())
        return torch.cat([grad_c.expand(n_c[k]), grad_r.expand(n_r[k])])

    with torch.no_grad():
        _, grad_h, grad_w, grad_b = torch_logprob_grad_pass(
            rows_hidden.detach(), weight.detach(), None if bias is None else bias.detach(), rows_labels,
            1.0 / float(temperature), bounds, row_grad, needs,
        )
        out = loss_fn(chosen, rejected, ref_c, ref_r, chosen_lengths=lengths_c, rejected_lengths=lengths_r, **loss_kwargs)
    value = out["loss"]
    if pair_losses:
        summed = torch.stack(pair_losses).sum()
        if not torch.allclose(summed.to(value.dtype), value, rtol=1e-4, atol=1e-6):
            raise RuntimeError(
                f"fused_linear_preference_loss: {type(loss_fn).__name__} says it is pair-separable but the mean of its "
                f"per-pair values ({summed.item():.6g}) differs from its batch value ({value.item():.6g}); "
                "use strategy='recompute'"
            )
    if any(needs):
        value = PrecomputedGradFunction.apply(value, rows_hidden, weight, bias, grad_h, grad_w, grad_b)
    return value, out, (counts_c, counts_r)


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
    strategy: str = "auto",
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
        strategy: ``"recompute"``: log-probs through :func:`fused_linear_logprob` (O(N) memory,
            its backward recomputes the logits); ``"pairwise"``: for pair-separable losses
            (``loss.pair_separable``: sigmoid DPO and most of the family, SimPO), one pass per pair
            that holds that pair's ``[tokens, V]`` logits and computes the gradients in the
            forward (3 matmuls per token instead of 4, as Liger does); ``"auto"``: pairwise where it
            applies on the torch backend (and a pair's logits stay under 1 GiB), else recompute.

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of detached scalars (TRL names).
    """
    loss_fn = build_preference_loss(loss)
    h_c, y_c, h_r, y_r, concatenated = _split_layout(hidden, labels, rejected_hidden, rejected_labels)
    kw = dict(ignore_index=ignore_index, temperature=temperature, backend=backend, chunk_size=chunk_size)
    if strategy not in STRATEGIES:
        raise ValueError(f"fused_linear_preference_loss: strategy must be one of {STRATEGIES}, got {strategy!r}")
    for h, y in ((h_c, y_c), (h_r, y_r)):
        if h is not None:
            _check_inputs(h, weight, y, bias, ignore_index, temperature, "sum", backend, chunk_size)
            _check_label_range(y.long(), y != ignore_index, weight.shape[0], ignore_index)
    paired = concatenated or h_c.shape[0] == h_r.shape[0]
    separable = bool(getattr(loss_fn, "pair_separable", False))
    if strategy == "pairwise" and not (separable and paired):
        raise ValueError(
            f"fused_linear_preference_loss: strategy='pairwise' needs a pair-separable loss on paired batches; "
            f"{type(loss_fn).__name__} is {'' if separable else 'not '}separable and the batch is "
            f"{'' if paired else 'not '}paired; use strategy='recompute' or 'auto'"
        )
    use_pairwise = strategy == "pairwise" or (
        strategy == "auto" and separable and paired and _resolve_backend(backend, h_c) == "torch"
        and torch.is_grad_enabled()
    )

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

    result = None
    if use_pairwise:
        result = _pairwise_policy(h_c, y_c, h_r, y_r, concatenated, weight, bias, loss_fn, ref_c, ref_r,
                                  ignore_index, temperature, dict(loss_kwargs or {}), force=strategy == "pairwise")
    if result is not None:
        value, out, _ = result
    else:
        chosen, rejected, chosen_n, rejected_n = _logps(h_c, weight, y_c, bias, h_r, y_r, concatenated, kw)
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
