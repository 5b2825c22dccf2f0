"""Any timm model as a vision encoder: ViTs through ``forward_intermediates``
(patch grid + optional prefix tokens of the chosen block), conv nets through
the same call (their NCHW stage maps flattened to tokens)."""
from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
from typing import Any, Iterator, Mapping

import torch

from tpo.registry import VISION_ENCODERS, current_config_key

from .base import VisionEncoder, find_weights_file, resolve_weights

# Arguments the encoder sets itself; a model_kwargs entry for them is a mistake.
_RESERVED = {
    "pretrained": "set the encoder's `pretrained` to a local weights file instead",
    "pretrained_cfg_overlay": "set the encoder's `pretrained` to a local weights file instead",
    "checkpoint_path": "set the encoder's `pretrained` to a local weights file instead",
    "num_classes": "the encoder always drops the classifier (num_classes=0)",
}


class _LoadReport(logging.Handler):
    """Collects what timm's pretrained loader reports. timm loads with
    ``strict=False`` whenever the classifier is dropped (``num_classes=0``)
    and only logs the keys it could not fill, so a checkpoint of another
    model would silently leave a random backbone."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys ("):
            self.missing.append(message[len("Missing keys (") : message.find(") discovered")])


@contextlib.contextmanager
def _timm_load_report() -> Iterator[_LoadReport]:
    logger = logging.getLogger("timm.models._builder")
    report, level = _LoadReport(), logger.level
    logger.addHandler(report)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)


@VISION_ENCODERS.register_module()
class TimmVisionEncoder(VisionEncoder):
    """A timm model, built with ``timm.create_model(model_name, num_classes=0,
    **model_kwargs)``.

    Args:
        model_name: a timm model name, optionally with a pretrained tag
            (``"vit_base_patch16_clip_224.openai"``): the tag picks the
            preprocessing constants (mean/std/interpolation) of those weights.
        model_kwargs: more ``create_model`` arguments (``img_size``,
            ``depth``, ``embed_dim``, ``drop_path_rate``, ...).
        pretrained: a local weights file (or a folder holding one), loaded
            through timm's own pretrained loading (``pretrained_cfg_overlay=
            dict(file=...)``, so timm's checkpoint filters apply). ``None``:
            random init. Nothing is downloaded unless ``allow_download=True``;
            then ``True`` (or a name that is no local path, appended to
            ``model_name`` as its tag) fetches timm's weights.
        allow_download: let timm fetch weights by name.
        freeze, select_layer, with_cls: see :class:`VisionEncoder`.
            ``select_layer`` indexes the blocks of a ViT and the feature
            stages of a conv net (``-2``: the stage before the last).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: Mapping[str, Any] | None = None,
        pretrained=None,
        allow_download: bool = False,
        freeze: bool = True,
        select_layer: int = -2,
        with_cls: bool = False,
    ):
        super().__init__(freeze=freeze, select_layer=select_layer, with_cls=with_cls)
        import timm

        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"{current_config_key('model_name')}: must be a timm model name, got {model_name!r}")
        kwargs = self._check_model_kwargs(model_kwargs)
        local, remote = resolve_weights(pretrained, allow_download)
        if remote is not None and remote is not True:
            base = model_name.split(".", 1)[0]
            model_name = f"{base}.{remote}"
        if not timm.is_model(model_name):
            names = timm.list_models()
            close = difflib.get_close_matches(model_name.split(".", 1)[0], names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{current_config_key('model_name')}: {model_name!r} is not a timm model{hint} "
                "(see timm.list_models())"
            )

        create_kwargs: dict[str, Any] = dict(kwargs)
        if local is not None:
            weights = find_weights_file(local, ("model.safetensors", "pytorch_model.bin")) if local.is_dir() else local
            create_kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        try:
            with _timm_load_report() as report:
                self.model = timm.create_model(model_name, pretrained=local is not None or remote is not None,
                                               num_classes=0, **create_kwargs)
        except (RuntimeError, KeyError) as err:
            if local is None:
                raise
            raise ValueError(
                f"{current_config_key('pretrained')}: {str(local)!r} does not fit timm model {model_name!r} "
                f"built with {dict(kwargs)}: {err}"
            ) from err
        if report.missing:
            shown = ", ".join(report.missing)
            raise ValueError(
                f"{current_config_key('pretrained')}: {str(local or remote)!r} leaves weights of timm model "
                f"{model_name!r} (built with {dict(kwargs)}) unset: {shown[:500]}{'...' if len(shown) > 500 else ''}; "
                "is it a checkpoint of this model and size?"
            )
        self.model_name = model_name

        self._use_intermediates = hasattr(self.model, "forward_intermediates")
        if not self._use_intermediates and select_layer != -1:
            raise ValueError(
                f"{current_config_key('select_layer')}: timm model {model_name!r} has no forward_intermediates, "
                "so only its final features are available; set select_layer=-1"
            )
        self._num_prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        if self._use_intermediates:
            params = inspect.signature(self.model.forward_intermediates).parameters
            self._fi_kwargs = {
                key: value
                for key, value in dict(intermediates_only=True, stop_early=True, output_fmt="NCHW", norm=False).items()
                if key in params
            }
            if with_cls and self._num_prefix and "return_prefix_tokens" in params:
                self._fi_kwargs["return_prefix_tokens"] = True

        data_cfg = timm.data.resolve_model_data_config(self.model)
        image_size = data_cfg["input_size"][1:]
        patch_embed = getattr(self.model, "patch_embed", None)
        if getattr(patch_embed, "img_size", None) is not None:
            image_size = patch_embed.img_size  # the size the model was built for (model_kwargs img_size)
        self._finish_init(
            image_size=tuple(image_size),
            image_mean=data_cfg["mean"],
            image_std=data_cfg["std"],
            interpolation=data_cfg.get("interpolation"),
        )

    @staticmethod
    def _check_model_kwargs(model_kwargs) -> dict:
        if model_kwargs is None:
            return {}
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(
                f"{current_config_key('model_kwargs')}: must be a dict of timm.create_model arguments, "
                f"got {type(model_kwargs).__name__}"
            )
        for key, why in _RESERVED.items():
            if key in model_kwargs:
                raise ValueError(f"{current_config_key('model_kwargs')}: remove {key!r}: {why}")
        return dict(model_kwargs)

    def _num_layers(self) -> int | None:
        blocks = getattr(self.model, "blocks", None)
        if self._use_intermediates and hasattr(self.model, "num_prefix_tokens") and blocks is not None:
            return len(blocks)  # ViT family: forward_intermediates indexes the blocks
        return None  # conv nets etc.: timm checks the index itself (probe)

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._use_intermediates:
            out = self.model.forward_intermediates(pixel_values, indices=[self.select_layer], **self._fi_kwargs)
            features = out[0]
            if isinstance(features, tuple):
                features, prefix = features
                return features, (prefix if self.with_cls and prefix.shape[1] else None)
            return features, None
        features = self.model.forward_features(pixel_values)
        if features.ndim == 4:
            if features.shape[1] != self.model.num_features and features.shape[-1] == self.model.num_features:
                features = features.permute(0, 3, 1, 2)  # NHWC -> NCHW
            return features, None
        prefix, patches = features[:, : self._num_prefix], features[:, self._num_prefix :]
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == patches.shape[1]:
            patches = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        return patches, (prefix if self.with_cls and self._num_prefix else None)
