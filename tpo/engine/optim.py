"""The optimiser and the learning-rate schedule.

Parameter groups come from the algorithm (``Algorithm.param_groups``): named
groups, each with its learning rate and weight decay. The schedule is a
warm-up (linear from ``lr / warmup_steps`` to ``lr``) followed by a cosine or
linear decay to ``min_lr_ratio * lr``, or a constant rate; the same factor
scales every group's own rate.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(groups: Sequence[dict[str, Any]], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (dicts with ``name``, ``params``, ``lr``,
    ``weight_decay``); ``cfg`` is the config's ``optim`` section."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("optim: the model has no trainable parameters (everything is frozen); nothing to train")
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    if cfg.get("fused") is not None:
        kwargs["fused"] = cfg["fused"]
    return torch.optim.AdamW(groups, **kwargs)


def schedule_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rates for optimiser step ``step``
    (0-based: the rate the ``step``-th update uses)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"schedule.type: {kind!r} is not one of {', '.join(SCHEDULES)}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def warmup_steps_of(cfg: dict[str, Any], total_steps: int) -> int:
    """``schedule.warmup_steps``, or ``warmup_ratio`` of the total steps."""
    if cfg.get("warmup_steps"):
        return cfg["warmup_steps"]
    return math.ceil(float(cfg.get("warmup_ratio") or 0.0) * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimiser step; ``cfg`` is the config's
    ``schedule`` section."""
    warmup = warmup_steps_of(cfg, total_steps)
    kind, floor = cfg["type"], float(cfg["min_lr_ratio"])
    return LambdaLR(optimizer, lambda step: schedule_factor(step, total_steps, warmup, kind, floor))


#: What a resumed run takes from its config, not from the checkpoint (which restores the saving run's).
_GROUP_SETTINGS = ("weight_decay", "betas", "eps")


def optim_settings(optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> list[dict[str, Any]]:
    """Each parameter group's settings as this run configured them: its base learning rate (the
    schedule's) and its weight decay, betas and eps."""
    return [{"lr": base, **{k: group[k] for k in _GROUP_SETTINGS}}
            for base, group in zip(scheduler.base_lrs, optimizer.param_groups)]


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                         settings: Sequence[dict[str, Any]]) -> list[str]:
    """Put each group's ``settings`` (:func:`optim_settings`, taken before a checkpoint's optimiser
    and scheduler states were loaded) back in place of the checkpoint's, and set each group's rate
    for the scheduler's current step; returns what differed from the checkpoint, e.g.
    ``"default: lr 0.01 -> 1e-05"``."""
    changed = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, settings)):
        saved = {"lr": scheduler.base_lrs[i], **{k: group[k] for k in _GROUP_SETTINGS}}
        changed += [f"{group.get('name', i)}: {k} {saved[k]} -> {v}" for k, v in want.items() if saved[k] != v]
        group.update({k: want[k] for k in _GROUP_SETTINGS})
        scheduler.base_lrs[i] = group["initial_lr"] = want["lr"]
        group["lr"] = want["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    return changed


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr/<group name>": current lr}``, one entry per named group."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        name = str(group.get("name", "default")).split("/")[0]
        out.setdefault(f"lr/{name}", float(group["lr"]))
    return out
