"""Reward-model training: Bradley-Terry on preference pairs (VLM-RLAIF stage 2).

The model is a :class:`~tpo.models.reward.RewardModel` (an MLLM with a scalar
value head); the batches are :class:`~tpo.data.collate.PreferenceCollator`'s
(the ``B`` chosen rows, then the ``B`` rejected rows, one shared prompt and
media per pair). One forward pass over the ``2B`` rows gives each row's reward
at its last answer token (the end-of-turn token); the loss is any reward loss
of ``tpo.registry.LOSSES``, by default :class:`~tpo.losses.reward.BradleyTerryLoss`
with the paper's centring term (``center_coef=1e-3``).

Metrics (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``loss/bt``, ``loss/center``.
Evaluation returns one data sample per pair (``chosen_reward``,
``rejected_reward``) for ``PairwiseAccuracy``: the held-out pairwise accuracy.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tpo.models import reward as _reward  # noqa: F401  (registers RewardModel in MODELS)
from tpo.registry import ALGORITHMS, LOSSES, build_child

from .base import Algorithm, _where, check_component
from .dpo import num_pairs

DEFAULT_LOSS = dict(type="BradleyTerryLoss", center_coef=1e-3)


def _needs_reward_model(model: nn.Module, who: str) -> None:
    if not hasattr(model, "value_head"):
        raise TypeError(
            f"{who}: the model must be a reward model with a value head (model = dict(type='RewardModel', ...)), "
            f"got {type(model).__name__}"
        )


@ALGORITHMS.register_module()
class RewardModeling(Algorithm):
    """Train a scalar reward model on preference pairs.

    Args:
        model: a :class:`~tpo.models.reward.RewardModel`.
        loss: a reward loss config of ``tpo.registry.LOSSES`` called as
            ``loss(chosen_rewards, rejected_rewards)`` (default
            ``BradleyTerryLoss(center_coef=1e-3)``).
    """

    collator = "PreferenceCollator"

    def __init__(self, model: nn.Module, loss: Mapping[str, Any] | None = None):
        super().__init__(model)
        _needs_reward_model(model, "algorithm.model")
        self.loss_fn = build_child(dict(loss or DEFAULT_LOSS), LOSSES, "loss")

    def num_items(self, batch: dict[str, Any]) -> int:
        return num_pairs(batch)

    def rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and rejected rewards ``[B]`` of a preference batch."""
        n = num_pairs(batch)
        rewards = self.model(batch)["rewards"]
        return rewards[:n], rewards[n:]

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = self.rewards(batch)
        out = self.loss_fn(chosen, rejected)
        return {"loss": out["loss"], **{k: v.detach() for k, v in out.items() if k != "loss"}}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], predict: bool = False) -> dict[str, Any]:
        chosen, rejected = self.rewards(batch)
        out = self.loss_fn(chosen, rejected)
        metrics = {k: v.detach().float() for k, v in out.items()}
        ids = batch.get("ids")
        samples = [{"id": None if ids is None else list(ids)[k], "chosen_reward": float(c),
                    "rejected_reward": float(r)} for k, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))]
        return {"metrics": metrics, "num_items": len(samples), "samples": samples}

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], key: str = "algorithm", source=None) -> None:
        super().check_config(cfg, key, source)
        loss = cfg.get("loss")
        if loss is not None:
            if not isinstance(loss, Mapping) or "type" not in loss:
                raise TypeError(f"{key}.loss: must be a loss config dict with a 'type', got {loss!r}{_where(source)}")
            check_component(LOSSES, loss, f"{key}.loss", source)
