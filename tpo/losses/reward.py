"""Reward-model losses, registered in ``tpo.registry.LOSSES``.

:class:`BradleyTerryLoss` is the pairwise loss of a scalar reward model as
VLM-RLAIF (Ahn et al., 2024) trains it: with ``r_c`` and ``r_r`` the rewards of
the chosen and the rejected answer of each pair,

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * |mean(r_c + r_r)|

The second term is the paper's small centring term (``center_coef=1e-3``): the
Bradley-Terry likelihood only sees reward *differences*, so it leaves the
rewards free to drift as a whole; the term keeps their mean near zero, which
PPO (whose advantages are built from the raw score) needs. ``center="square"``
uses ``mean((r_c + r_r)^2)`` instead (Eisenstein et al.'s auxiliary loss).
``label_smoothing`` (cBT) treats each label as right with probability
``1 - label_smoothing``.

Called as ``loss_fn(chosen_rewards [B], rejected_rewards [B], margin=None)``;
returns ``loss`` and detached metrics with TRL's names: ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (a tie counts
half), plus ``loss/bt`` and ``loss/center``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpo.registry import LOSSES, current_config_key

__all__ = ["BradleyTerryLoss"]

CENTER_MODES = ("abs", "square")


@LOSSES.register_module()
class BradleyTerryLoss(nn.Module):
    """Bradley-Terry pairwise loss with VLM-RLAIF's centring term.

    Args:
        center_coef: weight of the centring term (the paper: ``1e-3``; ``0``
            turns it off).
        center: ``"abs"`` (the paper: ``|mean(r_c + r_r)|``) or ``"square"``
            (``mean((r_c + r_r)^2)``).
        label_smoothing: in ``[0, 0.5)``.
    """

    def __init__(self, center_coef: float = 1e-3, center: str = "abs", label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(center_coef, (int, float)) or isinstance(center_coef, bool) or center_coef < 0:
            raise ValueError(f"{current_config_key('center_coef')}: must be a number >= 0, got {center_coef!r}")
        if center not in CENTER_MODES:
            raise ValueError(f"{current_config_key('center')}: use one of {CENTER_MODES}, got {center!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
            raise ValueError(f"{current_config_key('label_smoothing')}: must be in [0, 0.5), got {label_smoothing!r}")
        self.center_coef = float(center_coef)
        self.center = center
        self.label_smoothing = float(label_smoothing)

    def forward(self, chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> dict:
        if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1 or chosen_rewards.numel() == 0:
            raise ValueError(
                f"BradleyTerryLoss: chosen {list(chosen_rewards.shape)} and rejected {list(rejected_rewards.shape)} "
                "rewards must be equal, non-empty [B] tensors"
            )
        logits = (chosen_rewards - rejected_rewards).float()
        if margin is not None:
            margin = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
            if margin.dim() and margin.shape != logits.shape:
                raise ValueError(f"BradleyTerryLoss: margin {list(margin.shape)} does not match {list(logits.shape)}")
            logits = logits - margin
        ls = self.label_smoothing
        bt = (-(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)).mean()
        total = (chosen_rewards + rejected_rewards).float()
        center = total.mean().abs() if self.center == "abs" else total.pow(2).mean()
        loss = bt + self.center_coef * center
        diff = (chosen_rewards - rejected_rewards).detach().float()
        return {
            "loss": loss,
            "loss/bt": bt.detach(),
            "loss/center": center.detach(),
            "rewards/chosen": chosen_rewards.detach().float().mean(),
            "rewards/rejected": rejected_rewards.detach().float().mean(),
            "rewards/margins": diff.mean(),
            "rewards/accuracies": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(),
        }
