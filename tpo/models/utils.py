"""Small helpers shared by the model components."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tpo.registry import current_config_key


def resolve_pretrained(path: str | os.PathLike | None, key: str = "pretrained") -> Path | None:
    """The local file or folder ``path`` (``None`` stays ``None``), or a
    FileNotFoundError naming the path and the config key it came from."""
    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{current_config_key(key)}: pretrained path {str(path)!r} does not exist. "
            "Point it at a local checkpoint file or folder (nothing is downloaded), or set it to None "
            "for random initialisation."
        )
    return resolved


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze ``module``'s parameters and keep it in eval mode (dropout off)."""
    for param in module.parameters():
        param.requires_grad_(False)
    module.eval()
    module.train = lambda mode=True: module  # type: ignore[method-assign]  # stays in eval mode
    return module


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts of ``module``."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{current_config_key('torch_dtype')}: unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return value
