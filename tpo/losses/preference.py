"""Preference losses on per-sequence log-probabilities: the DPO family with
TRL's ``loss_type`` names and meanings, SimPO, CPO, ORPO, KTO, and a weighted
combination of any of them. All are registered in ``tpo.registry.LOSSES``.

Every loss is called the same way::

    loss_fn(chosen_logps, rejected_logps,              # [B] summed log-probs of the policy
            ref_chosen_logps=None, ref_rejected_logps=None,   # [B] the reference's (if it needs one)
            chosen_lengths=None, rejected_lengths=None,       # [B] completion token counts
            kl_logps=None, ref_kl_logps=None)                 # KTO's mismatched pairs only

and returns a dict of named scalars: ``loss`` (differentiable) and detached
metrics named as TRL logs them (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``nll_loss``, ...). Log-probs are per-sequence *sums*
(what :func:`tpo.kernels.fused_linear_logprob` returns with
``reduction="sum"``, together with the token counts); the losses that TRL
computes on per-token means (``ipo``, ``sigmoid_norm``, SimPO, ORPO, the NLL
terms) divide by the lengths themselves and say so when lengths are missing.

With ``beta`` the DPO temperature, ``l_c = logp_c - ref_logp_c`` and
``l_r = logp_r - ref_logp_r`` the chosen and rejected log-ratios, and
``d = l_c - l_r``, ``DPOLoss(loss_type=...)`` computes per pair (then the mean):

==============  ===============================================================
sigmoid         -(1-ls) logsig(beta d) - ls logsig(-beta d)   (DPO; cDPO with ls)
hinge           relu(1 - beta d)                                (SLiC)
ipo             (l_c/n_c - l_r/n_r - 1/(2 beta))^2              (IPO, per-token means)
exo_pair        KL(sigma(beta d) || [1-eps, eps]), eps = ls or 1e-3   (EXO)
nca_pair        -logsig(beta l_c) - logsig(-beta l_c)/2 - logsig(-beta l_r)/2
robust          (-(1-ls) logsig(beta d) + ls logsig(-beta d)) / (1 - 2 ls)
bco_pair        -logsig(beta l_c - delta) - logsig(-(beta l_r - delta)), delta the
                running mean of the batch-mean rewards (updated in training mode)
sppo_hard       (l_c - 1/(2 beta))^2 + (l_r + 1/(2 beta))^2
aot             smoothed sigmoid of beta (sort(logp_c - logp_r) - sort(ref_c - ref_r))
aot_unpaired    smoothed sigmoid of beta (sort(l_c) - sort(l_r))   (alias aot_pair)
apo_zero        1 - sigma(beta l_c) + sigma(beta l_r)
apo_down        sigma(beta l_c) + 1 - sigma(beta d)
discopop        x = beta d: -logsig(x) (1 - sigma(x/tau)) + exp(-x) sigma(x/tau)
sigmoid_norm    -logsig(beta (l_c/n_c - l_r/n_r))
sft             -sum(logp_c) / sum(n_c)   (NLL of the chosen tokens)
==============  ===============================================================

Rewards are ``beta * l_c`` and ``beta * l_r``. ``reference_free=True`` takes the
reference log-probs as 0. ``rpo_alpha`` adds ``rpo_alpha * nll_loss`` (RPO).
Several loss types at once (TRL's MPO): ``loss_type=["sigmoid", "bco_pair",
"sft"], loss_weights=[0.8, 0.2, 1.0]``; for different loss classes use
:class:`CombinedPreferenceLoss`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpo.registry import LOSSES, build_child, current_config_key

__all__ = [
    "PreferenceLoss",
    "DPOLoss",
    "SimPOLoss",
    "CPOLoss",
    "ORPOLoss",
    "KTOLoss",
    "CombinedPreferenceLoss",
    "DPO_LOSS_TYPES",
]

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
_DPO_ALIASES = {"aot_pair": "aot_unpaired"}
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "sft"}
# Loss types whose batch loss is the mean over pairs of a function of each pair alone.
_PAIR_SEPARABLE = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "apo_zero", "apo_down",
                   "discopop", "sigmoid_norm"}


# --------------------------------------------------------------------------- #
# argument checking
# --------------------------------------------------------------------------- #
def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{current_config_key(what)}: must be a finite number > 0, got {value!r}")
    return float(value)


def _in_range(value, what: str, low: float, high: float, high_open: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (value >= high if high_open else value > high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{current_config_key(what)}: must be in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def _vector(x, what: str, owner: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {what} must be a tensor of per-sequence log-probs, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{owner}: {what} must be 1-D [batch], got shape {tuple(x.shape)}; reduce per sequence first")
    if not torch.is_floating_point(x):
        raise TypeError(f"{owner}: {what} must be a float tensor, got {x.dtype}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _same_shape(a: Tensor, b: Tensor, what_a: str, what_b: str, owner: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{owner}: {what_a} {tuple(a.shape)} and {what_b} {tuple(b.shape)} must have the same shape")


def _lengths(x, like: Tensor, what: str, owner: str, why: str) -> Tensor:
    if x is None:
        raise ValueError(
            f"{owner}: {why} needs {what} (the number of completion tokens of each sequence); pass the counts "
            "that fused_linear_logprob returns with the log-probs"
        )
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x, device=like.device)
    if x.shape != like.shape:
        raise ValueError(f"{owner}: {what} {tuple(x.shape)} must have the shape of the log-probs {tuple(like.shape)}")
    x = x.to(like.dtype)
    if bool((x < 0).any()):
        raise ValueError(f"{owner}: {what} must be >= 0, got {x.tolist()}")
    return x


def _nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Mean negative log-likelihood per chosen token over the batch (TRL's ``nll_loss``)."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def _smoothed_sigmoid(x: Tensor, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2. ``x`` is capped at -1e-7
    (a mean log-prob of 0, as of an empty completion, would give log 0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceLoss(nn.Module):
    """Base of the preference losses: the common call and the shared metrics."""

    #: whether the loss reads the reference log-probs (the fused kernel computes them only then)
    needs_reference: bool = True
    #: whether the batch loss is the mean over pairs of a function of each pair alone (no
    #: sorting, running statistics or batch-wide normalisers): the fused kernel can then
    #: compute each pair's gradient as soon as that pair's log-probs are known
    pair_separable: bool = False

    def _owner(self) -> str:
        return type(self).__name__

    def _inputs(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, paired=True):
        owner = self._owner()
        pc = _vector(chosen_logps, "chosen_logps", owner)
        pr = _vector(rejected_logps, "rejected_logps", owner)
        if paired:
            _same_shape(pc, pr, "chosen_logps", "rejected_logps", owner)
        if not self.needs_reference:
            return pc, pr, None, None
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                f"{owner}: needs the reference log-probs ref_chosen_logps and ref_rejected_logps "
                "(per-sequence sums under the frozen reference model); pass them, or set reference_free=True"
            )
        rc = _vector(ref_chosen_logps, "ref_chosen_logps", owner).detach()
        rr = _vector(ref_rejected_logps, "ref_rejected_logps", owner).detach()
        _same_shape(pc, rc, "chosen_logps", "ref_chosen_logps", owner)
        _same_shape(pr, rr, "rejected_logps", "ref_rejected_logps", owner)
        return pc, pr, rc, rr

    @staticmethod
    def _metrics(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, pc: Tensor, pr: Tensor) -> dict:
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        return {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }


# --------------------------------------------------------------------------- #
# DPO family
# --------------------------------------------------------------------------- #
@LOSSES.register_module()
class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization and the TRL ``loss_type`` variants (see the module docstring).

    Args:
        loss_type: one name of ``DPO_LOSS_TYPES`` or a list of them (summed with ``loss_weights``).
        beta: the temperature of the implicit reward (> 0).
        label_smoothing: the assumed fraction of flipped labels (sigmoid, robust, exo_pair, aot*).
        reference_free: take the reference log-probs as 0 (no reference model).
        rpo_alpha: weight of the NLL of the chosen tokens added to the loss (RPO), or None.
        loss_weights: one weight per loss type (default 1 each).
        discopop_tau: temperature of the DiscoPOP modulation.
    """

    def __init__(
        self,
        loss_type: str | Sequence[str] = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        rpo_alpha: float | None = None,
        loss_weights: Sequence[float] | None = None,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if not types:
            raise ValueError(f"{current_config_key('loss_type')}: give at least one loss type of {DPO_LOSS_TYPES}")
        resolved = []
        for name in types:
            if not isinstance(name, str) or _DPO_ALIASES.get(name, name) not in DPO_LOSS_TYPES:
                raise ValueError(
                    f"{current_config_key('loss_type')}: unknown DPO loss type {name!r}; "
                    f"choose from {', '.join(DPO_LOSS_TYPES)}"
                )
            resolved.append(_DPO_ALIASES.get(name, name))
        self.loss_types = resolved
        if loss_weights is None:
            self.loss_weights = [1.0] * len(resolved)
        else:
            weights = list(loss_weights)
            if len(weights) != len(resolved):
                raise ValueError(
                    f"{current_config_key('loss_weights')}: {len(weights)} weights for {len(resolved)} loss types "
                    f"{resolved}; give one weight per loss type"
                )
            self.loss_weights = [float(w) for w in weights]
        self.beta = _positive(beta, "beta")
        self.label_smoothing = _in_range(label_smoothing, "label_smoothing", 0.0, 0.5)
        if "robust" in resolved and self.label_smoothing >= 0.5:
            raise ValueError(f"{current_config_key('label_smoothing')}: loss_type='robust' needs label_smoothing < 0.5")
        self.reference_free = bool(reference_free)
        self.rpo_alpha = None if rpo_alpha is None else _in_range(rpo_alpha, "rpo_alpha", 0.0, float("inf"))
        self.discopop_tau = _positive(discopop_tau, "discopop_tau")
        self.needs_reference = not self.reference_free
        # bco_pair's running mean of the batch-mean rewards (TRL's RunningMoments mean).
        self.register_buffer("bco_running_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_running_count", torch.zeros((), dtype=torch.float64))

    @property
    def pair_separable(self) -> bool:
        return all(t in _PAIR_SEPARABLE for t in self.loss_types) and not self.rpo_alpha

    def extra_repr(self) -> str:
        types = self.loss_types[0] if len(self.loss_types) == 1 else self.loss_types
        return f"loss_type={types!r}, beta={self.beta}, label_smoothing={self.label_smoothing}"

    def _owner(self) -> str:
        return f"DPOLoss(loss_type={'+'.join(self.loss_types)})"

    def _bco_delta(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
        batch_mean = torch.cat((chosen_rewards, rejected_rewards)).detach().mean().double()
        if self.training:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(batch_mean)
                batch_mean = batch_mean / torch.distributed.get_world_size()
            self.bco_running_count += 1
            self.bco_running_mean += (batch_mean - self.bco_running_mean) / self.bco_running_count
        delta = self.bco_running_mean if self.bco_running_count > 0 else batch_mean
        return delta.to(chosen_rewards.dtype)

    def _per_pair(self, kind: str, pc, pr, rc, rr, cl, rl) -> Tensor:
        beta, ls = self.beta, self.label_smoothing
        lc, lr = pc - rc, pr - rr
        d = lc - lr
        if kind == "sigmoid":
            return _smoothed_sigmoid(beta * d, ls)
        if kind == "hinge":
            return torch.relu(1 - beta * d)
        if kind == "ipo":
            return (lc / cl.clamp(min=1) - lr / rl.clamp(min=1) - 1 / (2 * beta)) ** 2
        if kind == "exo_pair":
            eps = ls if ls > 0 else 1e-3
            x = beta * d
            return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
                F.logsigmoid(-x) - math.log(eps)
            )
        if kind == "nca_pair":
            return -F.logsigmoid(beta * lc) - 0.5 * F.logsigmoid(-beta * lc) - 0.5 * F.logsigmoid(-beta * lr)
        if kind == "robust":
            return (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
        if kind == "bco_pair":
            delta = self._bco_delta(beta * lc, beta * lr)
            return -F.logsigmoid(beta * lc - delta) - F.logsigmoid(-(beta * lr - delta))
        if kind == "sppo_hard":
            return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
        if kind == "aot":
            delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
            return _smoothed_sigmoid(beta * delta, ls)
        if kind == "aot_unpaired":
            delta = torch.sort(lc, dim=0).values - torch.sort(lr, dim=0).values
            return _smoothed_sigmoid(beta * delta, ls)
        if kind == "apo_zero":
            return 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
        if kind == "apo_down":
            return torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * d)
        if kind == "discopop":
            x = beta * d
            modulation = torch.sigmoid(x / self.discopop_tau)
            return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation
        if kind == "sigmoid_norm":
            return -F.logsigmoid(beta * (lc / cl.clamp(min=1) - lr / rl.clamp(min=1)))
        if kind == "sft":
            return _nll(pc, cl).expand(pc.shape[0])
        raise AssertionError(kind)  # unreachable: names are checked in __init__

    def forward(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
        kl_logps: Tensor | None = None,
        ref_kl_logps: Tensor | None = None,
    ) -> dict[str, Tensor]:
        owner = self._owner()
        pc, pr, rc, rr = self._inputs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if self.reference_free:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        needs_lengths = [t for t in self.loss_types if t in _NEEDS_LENGTHS] + (["rpo_alpha"] if self.rpo_alpha else [])
        cl = rl = None
        if needs_lengths:
            why = f"{'/'.join(needs_lengths)} (per-token means)"
            cl = _lengths(chosen_lengths, pc, "chosen_lengths", owner, why)
            rl = _lengths(rejected_lengths, pr, "rejected_lengths", owner, why)
        loss = pc.new_zeros(())
        parts = {}
        for kind, weight in zip(self.loss_types, self.loss_weights):
            part = self._per_pair(kind, pc, pr, rc, rr, cl, rl).mean()
            parts[kind] = part
            loss = loss + weight * part
        nll = _nll(pc, cl) if (self.rpo_alpha or "sft" in self.loss_types) else None
        if self.rpo_alpha:
            loss = loss + self.rpo_alpha * nll
        metrics = self._metrics(loss, self.beta * (pc - rc), self.beta * (pr - rr), pc, pr)
        if nll is not None:
            metrics["nll_loss"] = nll.detach()
        if len(parts) > 1:
            for kind, part in parts.items():
                metrics[f"loss/{kind}"] = part.detach()
        return metrics


# --------------------------------------------------------------------------- #
# reference-free losses on per-token means: SimPO, CPO, ORPO
# --------------------------------------------------------------------------- #
@LOSSES.register_module()
class SimPOLoss(PreferenceLoss):
    """SimPO: ``-(1-ls) logsig(beta (a_c - a_r) - gamma) - ls logsig(-(...))`` with
    ``a = logp / n`` the per-token mean log-probs (no reference). ``sft_weight``
    adds the NLL of the chosen tokens (CPO-SimPO). Rewards are ``beta * a``; the
    logged ``logps/*`` are the per-token means, as TRL's CPOTrainer logs them."""

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__()
        self.beta = _positive(beta, "beta")
        self.gamma = _in_range(gamma, "gamma", 0.0, float("inf"))
        self.label_smoothing = _in_range(label_smoothing, "label_smoothing", 0.0, 0.5)
        self.sft_weight = _in_range(sft_weight, "sft_weight", 0.0, float("inf"))

    @property
    def pair_separable(self) -> bool:
        return not self.sft_weight  # the NLL term is normalised by the batch's chosen tokens

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None, kl_logps=None, ref_kl_logps=None):
        owner = self._owner()
        pc, pr, _, _ = self._inputs(chosen_logps, rejected_logps, None, None)
        cl = _lengths(chosen_lengths, pc, "chosen_lengths", owner, "SimPO (per-token means)")
        rl = _lengths(rejected_lengths, pr, "rejected_lengths", owner, "SimPO (per-token means)")
        ac, ar = pc / cl.clamp(min=1), pr / rl.clamp(min=1)
        logits = self.beta * (ac - ar) - self.gamma
        loss = _smoothed_sigmoid(logits, self.label_smoothing).mean()
        nll = _nll(pc, cl)
        if self.sft_weight:
            loss = loss + self.sft_weight * nll
        metrics = self._metrics(loss, self.beta * ac, self.beta * ar, ac, ar)
        metrics["nll_loss"] = nll.detach()
        return metrics


@LOSSES.register_module()
class CPOLoss(PreferenceLoss):
    """Contrastive Preference Optimization (TRL's CPOTrainer): a reference-free
    preference term on ``logits = logp_c - logp_r`` plus ``cpo_alpha`` times the NLL
    of the chosen tokens. ``loss_type``: ``sigmoid`` (smoothed), ``hinge``, ``ipo``
    or ``simpo`` (the last two on per-token means, simpo with margin ``simpo_gamma``).
    Rewards are ``beta * logp`` (per-token means for ipo/simpo)."""

    needs_reference = False
    LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 cpo_alpha: float = 1.0, simpo_gamma: float = 0.5):
        super().__init__()
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f"{current_config_key('loss_type')}: CPOLoss loss_type must be one of {self.LOSS_TYPES}, got {loss_type!r}")
        self.loss_type = loss_type
        self.beta = _positive(beta, "beta")
        self.label_smoothing = _in_range(label_smoothing, "label_smoothing", 0.0, 0.5)
        self.cpo_alpha = _in_range(cpo_alpha, "cpo_alpha", 0.0, float("inf"))
        self.simpo_gamma = _in_range(simpo_gamma, "simpo_gamma", 0.0, float("inf"))

    @property
    def pair_separable(self) -> bool:
        return not self.cpo_alpha  # the NLL term is normalised by the batch's chosen tokens

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None, kl_logps=None, ref_kl_logps=None):
        owner = f"CPOLoss(loss_type={self.loss_type})"
        pc, pr, _, _ = self._inputs(chosen_logps, rejected_logps, None, None)
        averaged = self.loss_type in ("ipo", "simpo")
        cl = rl = None
        if averaged or self.cpo_alpha:
            why = f"loss_type={self.loss_type!r}" if averaged else "the NLL term (cpo_alpha > 0)"
            cl = _lengths(chosen_lengths, pc, "chosen_lengths", owner, why)
            rl = _lengths(rejected_lengths, pr, "rejected_lengths", owner, why)
        c, r = (pc / cl.clamp(min=1), pr / rl.clamp(min=1)) if averaged else (pc, pr)
        logits = c - r
        if self.loss_type == "sigmoid":
            losses = _smoothed_sigmoid(self.beta * logits, self.label_smoothing)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * logits)
        elif self.loss_type == "ipo":
            losses = (logits - 1 / (2 * self.beta)) ** 2
        else:  # simpo
            losses = _smoothed_sigmoid(self.beta * (logits - self.simpo_gamma / self.beta), self.label_smoothing)
        loss = losses.mean()
        metrics_nll = None
        if cl is not None:
            metrics_nll = _nll(pc, cl)
            if self.cpo_alpha:
                loss = loss + self.cpo_alpha * metrics_nll
        metrics = self._metrics(loss, self.beta * c, self.beta * r, c, r)
        if metrics_nll is not None:
            metrics["nll_loss"] = metrics_nll.detach()
        return metrics


@LOSSES.register_module()
class ORPOLoss(PreferenceLoss):
    """ORPO: ``nll_loss - beta * mean(logsig(log_odds))`` with ``log_odds = (a_c - a_r)
    - (log(1 - e^{a_c}) - log(1 - e^{a_r}))`` on per-token mean log-probs ``a``.
    Logs TRL's ``log_odds_ratio`` (mean logsig(log_odds)) and ``log_odds_chosen``."""

    needs_reference = False

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = _positive(beta, "beta")

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None, kl_logps=None, ref_kl_logps=None):
        owner = self._owner()
        pc, pr, _, _ = self._inputs(chosen_logps, rejected_logps, None, None)
        cl = _lengths(chosen_lengths, pc, "chosen_lengths", owner, "ORPO (per-token means and NLL)")
        rl = _lengths(rejected_lengths, pr, "rejected_lengths", owner, "ORPO (per-token means and NLL)")
        ac, ar = pc / cl.clamp(min=1), pr / rl.clamp(min=1)
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        nll = _nll(pc, cl)
        loss = nll - self.beta * ratio.mean()
        metrics = self._metrics(loss, self.beta * ac, self.beta * ar, ac, ar)
        metrics["nll_loss"] = nll.detach()
        metrics["log_odds_ratio"] = ratio.detach().mean()
        metrics["log_odds_chosen"] = log_odds.detach().mean()
        return metrics


# --------------------------------------------------------------------------- #
# KTO: unpaired desirable / undesirable examples
# --------------------------------------------------------------------------- #
@LOSSES.register_module()
class KTOLoss(PreferenceLoss):
    """KTO (TRL's KTOTrainer) on unpaired examples: ``chosen_*`` are the desirable
    completions, ``rejected_*`` the undesirable ones (any sizes, either may be empty).

    ``kto``: ``1 - sigma(beta (l_c - z))`` for desirable and ``1 - sigma(beta (z - l_r))``
    for undesirable examples, with ``z = max(0, mean(kl_logps - ref_kl_logps))`` the
    detached KL estimate from mismatched completions (0 when none are given).
    ``apo_zero_unpaired``: ``1 - sigma(beta l_c)`` and ``sigma(beta l_r)``.
    The loss is the mean over all examples of the weighted losses. Metrics:
    ``rewards/chosen``, ``logps/chosen``, ``count/chosen`` (and rejected, when present),
    ``rewards/margins`` (when both are), ``kl``.
    """

    LOSS_TYPES = ("kto", "apo_zero_unpaired")

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto"):
        super().__init__()
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f"{current_config_key('loss_type')}: KTOLoss loss_type must be one of {self.LOSS_TYPES}, got {loss_type!r}")
        self.loss_type = loss_type
        self.beta = _positive(beta, "beta")
        self.desirable_weight = _in_range(desirable_weight, "desirable_weight", 0.0, float("inf"))
        self.undesirable_weight = _in_range(undesirable_weight, "undesirable_weight", 0.0, float("inf"))

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None, kl_logps=None, ref_kl_logps=None):
        owner = f"KTOLoss(loss_type={self.loss_type})"
        pc, pr, rc, rr = self._inputs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, paired=False)
        if pc.numel() + pr.numel() == 0:
            raise ValueError(f"{owner}: got no examples (chosen_logps and rejected_logps are both empty)")
        if (kl_logps is None) != (ref_kl_logps is None):
            raise ValueError(f"{owner}: pass both kl_logps and ref_kl_logps (mismatched completions) or neither")
        if kl_logps is not None and self.loss_type == "kto":
            kp = _vector(kl_logps, "kl_logps", owner)
            kr = _vector(ref_kl_logps, "ref_kl_logps", owner)
            _same_shape(kp, kr, "kl_logps", "ref_kl_logps", owner)
            kl = (kp - kr).detach().mean().clamp(min=0) if kp.numel() else pc.new_zeros(())
        else:
            kl = pc.new_zeros(())
        lc, lr = pc - rc, pr - rr
        if self.loss_type == "kto":
            chosen_losses = 1 - torch.sigmoid(self.beta * (lc - kl))
            rejected_losses = 1 - torch.sigmoid(self.beta * (kl - lr))
        else:
            chosen_losses = 1 - torch.sigmoid(self.beta * lc)
            rejected_losses = torch.sigmoid(self.beta * lr)
        losses = torch.cat((self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses))
        loss = losses.mean()
        chosen_rewards, rejected_rewards = (self.beta * lc).detach(), (self.beta * lr).detach()
        metrics = {"loss": loss, "kl": kl.detach()}
        if pc.numel():
            metrics["rewards/chosen"] = chosen_rewards.mean()
            metrics["logps/chosen"] = pc.detach().mean()
        if pr.numel():
            metrics["rewards/rejected"] = rejected_rewards.mean()
            metrics["logps/rejected"] = pr.detach().mean()
        if pc.numel() and pr.numel():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["count/chosen"] = torch.tensor(float(pc.numel()), device=pc.device)
        metrics["count/rejected"] = torch.tensor(float(pr.numel()), device=pc.device)
        return metrics


# --------------------------------------------------------------------------- #
# weighted combination
# --------------------------------------------------------------------------- #
@LOSSES.register_module()
class CombinedPreferenceLoss(PreferenceLoss):
    """A weighted sum of preference losses, each built from its config::

        dict(type="CombinedPreferenceLoss",
             losses=[dict(type="DPOLoss", loss_type="sigmoid"), dict(type="SimPOLoss")],
             weights=[1.0, 0.5], names=["dpo", "simpo"])

    ``loss`` is ``sum(w_i * loss_i)``. The metrics of each part come prefixed
    with its name (``dpo/rewards/chosen``, and ``loss/dpo`` for its unweighted
    loss); the first part's metrics also appear unprefixed, so TRL's names stay
    on the dashboard. Names default to the class names, lower-cased, without
"loss" (``dpo``, ``simpo``; numbered when repeated: ``dpo0``, ``dpo1``).
    """

    def __init__(self, losses: Sequence, weights: Sequence[float] | None = None, names: Sequence[str] | None = None):
        super().__init__()
        if isinstance(losses, (Mapping, nn.Module)) or not isinstance(losses, Sequence) or len(losses) == 0:
            raise ValueError(f"{current_config_key('losses')}: must be a non-empty list of loss configs (dicts with a 'type')")
        modules = []
        for i, cfg in enumerate(losses):
            module = cfg if isinstance(cfg, nn.Module) else build_child(cfg, LOSSES, f"losses[{i}]")
            if not isinstance(module, PreferenceLoss):
                raise TypeError(
                    f"{current_config_key(f'losses[{i}]')}: {type(module).__name__} is not a preference loss; "
                    "combine DPOLoss, SimPOLoss, CPOLoss, ORPOLoss, KTOLoss"
                )
            modules.append(module)
        self.parts = nn.ModuleList(modules)
        if weights is None:
            self.weights = [1.0] * len(modules)
        else:
            if len(weights) != len(modules):
                raise ValueError(
                    f"{current_config_key('weights')}: {len(weights)} weights for {len(modules)} losses; give one per loss"
                )
            self.weights = [float(w) for w in weights]
        if names is None:
            names = [type(m).__name__.lower().removesuffix("loss") or "loss" for m in modules]
            names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        elif len(names) != len(modules) or len(set(names)) != len(names):
            raise ValueError(f"{current_config_key('names')}: give {len(modules)} distinct names, got {list(names)}")
        self.names = list(names)
        self.needs_reference = any(m.needs_reference for m in modules)

    @property
    def pair_separable(self) -> bool:
        return all(part.pair_separable for part in self.parts)

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None, kl_logps=None, ref_kl_logps=None):
        total = None
        metrics: dict[str, Tensor] = {}
        for i, (name, weight, part) in enumerate(zip(self.names, self.weights, self.parts)):
            out = part(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       chosen_lengths, rejected_lengths, kl_logps, ref_kl_logps)
            total = weight * out["loss"] if total is None else total + weight * out["loss"]
            for key, value in out.items():
                if key == "loss":
                    metrics[f"loss/{name}"] = value.detach()
                else:
                    metrics[f"{name}/{key}"] = value
                    if i == 0:
                        metrics[key] = value
        metrics["loss"] = total
        return metrics
