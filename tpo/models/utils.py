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


def hf_config_for(model_type: str, fields: dict, key: str):
    """``transformers.AutoConfig.for_model(model_type, **fields)``; an unknown model type or a
    config transformers rejects (its fields' own checks, such as heads dividing the hidden
    size) is a ``ValueError`` naming ``key`` and transformers' reason."""
    import difflib

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{key}.model_type: {model_type!r} is not a transformers model type{hint}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001 - TypeError, ValueError, huggingface_hub's StrictDataclassError
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(f"{key}: not a valid {model_type!r} config: {cause}") from err


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze ``module``'s parameters and put it in eval mode (dropout off).

    It is marked frozen, so that a :class:`FreezeAwareModule` above it keeps it
    in eval mode when the model is switched back to training.
    """
    module.requires_grad_(False)
    module.eval()
    module._tpo_frozen = True
    return module


class FreezeAwareModule(nn.Module):
    """``train()`` leaves the sub-modules frozen by :func:`freeze_module` in
    eval mode (a frozen encoder's dropout and norm statistics stay fixed)."""

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for sub in self.modules():
                if getattr(sub, "_tpo_frozen", False):
                    sub.eval()
        return self


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


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load ``model.safetensors`` from a checkpoint folder (or that file) into
    ``model``; every key must match both ways, every shape too. A mismatch is an
    error naming the tensors and, for a checkpoint of ``tpo train``, the model its
    run was configured with (``<work_dir>/config.json``)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} has no model.safetensors; give a checkpoint folder written by "
            "`tpo train` (work_dir/checkpoints/<step>) or a .safetensors file"
        )
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    wrong = [f"{n}: {list(stored[n])} in the checkpoint, {list(own[n])} in the model"
             for n in sorted(set(own) & set(stored)) if own[n] != stored[n]]
    if wrong:
        differ = "tensors differ" if len(wrong) > 1 else "tensor differs"
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit this model: {len(wrong)} {differ} in shape "
            f"({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}); {_trained_with(path, model)}"
        )
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {str(path)!r} does not fit this model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}; {_trained_with(path, model)}"
        )


def _trained_with(weights: Path, model: nn.Module) -> str:
    """A hint: the model type the checkpoint's run was configured with, where ``tpo train`` left its config."""
    import json

    config = weights.parent.parent.parent / "config.json"  # <work_dir>/checkpoints/<step>/model.safetensors
    try:
        trained = json.loads(config.read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return "was it written for the same config?"
    return (f"it was trained as model.type={trained!r} (its run's config: {str(config)!r}), this model is a "
            f"{type(model).__name__}; build the model from the config it was trained with")
