"""transformers vision models (CLIPVisionModel, SiglipVisionModel and anything
``AutoModel`` builds from a vision config) as vision encoders; features come
from ``output_hidden_states``."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from tpo.registry import VISION_ENCODERS, current_config_key

from .base import VisionEncoder, resolve_weights

logger = logging.getLogger(__name__)

# PIL resample codes in image processor configs -> torch interpolation modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _family(model_type: str) -> str:
    """``clip_vision_model`` -> ``clip`` (the name image processors are keyed by)."""
    for suffix in ("_vision_model", "_vision"):
        if model_type.endswith(suffix):
            return model_type[: -len(suffix)]
    return model_type


def _processor_defaults(model_type: str) -> dict:
    """Mean/std/resample of the family's own image processor class, built
    with its documented defaults (``CLIPImageProcessor()`` -> the OpenAI CLIP
    constants, ``SiglipImageProcessor()`` -> 0.5)."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    for family in (model_type, _family(model_type)):
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(family)
        if names is None:
            continue
        if isinstance(names, Mapping):
            candidates = [names.get("torchvision"), names.get("pil"), *names.values()]
        elif isinstance(names, (list, tuple)):
            candidates = list(names)
        else:
            candidates = [names]
        for name in candidates:
            cls = getattr(transformers, name, None) if name else None
            if cls is None:
                continue
            try:
                processor = cls()
            except Exception:  # noqa: BLE001 - a processor that needs arguments or extras; try the next
                continue
            return {
                "image_mean": getattr(processor, "image_mean", None),
                "image_std": getattr(processor, "image_std", None),
                "resample": getattr(processor, "resample", None),
            }
    logger.warning("no image processor known for model type %r; normalising with ImageNet mean/std", model_type)
    return {"image_mean": _IMAGENET_DEFAULT[0], "image_std": _IMAGENET_DEFAULT[1], "resample": 3}


def _size_of(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Mapping):
        if value.get("height") and value.get("width"):
            return (int(value["height"]), int(value["width"]))
        if value.get("shortest_edge"):
            return (int(value["shortest_edge"]),) * 2
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


@VISION_ENCODERS.register_module()
class HFVisionEncoder(VisionEncoder):
    """A transformers vision model.

    Args:
        config: a vision config dict with ``model_type`` (``"clip_vision_model"``,
            ``"siglip_vision_model"``, ``"dinov2"``, ...) and that config's
            fields, for random init; given with ``pretrained``, its fields
            (``model_type`` aside) override the saved config.
        pretrained: a local ``save_pretrained`` folder: of a vision model, or
            of a dual-encoder (``CLIPModel``, ``SiglipModel``: its vision tower
            is loaded, as LLaVA does). Its ``preprocessor_config.json``, when
            present, gives the mean/std; else the family's image processor
            defaults do. With ``allow_download=True`` a value that is no local
            path is a Hugging Face Hub id.
        allow_download: let transformers fetch ``pretrained`` from the Hub.
        freeze, select_layer, with_cls: see :class:`VisionEncoder`
            (``select_layer`` indexes ``hidden_states[1:]``, the block
            outputs: ``-2`` is LLaVA's ``hidden_states[-2]``).
    """

    #: set by the aliases to fix the model family
    model_type: str | None = None

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        pretrained=None,
        allow_download: bool = False,
        freeze: bool = True,
        select_layer: int = -2,
        with_cls: bool = False,
    ):
        super().__init__(freeze=freeze, select_layer=select_layer, with_cls=with_cls)
        local, remote = resolve_weights(pretrained, allow_download)
        if remote is True:
            raise ValueError(f"{current_config_key('pretrained')}: give a Hub id or a local folder, not True")
        source = local if local is not None else remote
        overrides, model_type = self._split_config(config, need_type=source is None)

        processor_cfg: dict = {}
        if source is None:
            hf_config, family = self._config_from_dict(model_type, overrides)
            from transformers import AutoModel

            self.model = AutoModel.from_config(hf_config)
        else:
            if local is not None and not local.is_dir():
                raise ValueError(
                    f"{current_config_key('pretrained')}: {str(local)!r} is a file; transformers models load from "
                    "a save_pretrained folder (config.json + weights)"
                )
            self.model, family = self._load(source, overrides, model_type, local_only=not allow_download)
            processor_cfg = self._read_processor_config(local) if local is not None else {}
            if remote is not None and not processor_cfg:
                processor_cfg = self._fetch_processor_config(remote)

        config_ = self.model.config
        defaults = None
        if not processor_cfg.get("image_mean") or not processor_cfg.get("image_std"):
            defaults = _processor_defaults(family)
        mean = processor_cfg.get("image_mean") or defaults["image_mean"]
        std = processor_cfg.get("image_std") or defaults["image_std"]
        resample = processor_cfg.get("resample", defaults["resample"] if defaults else 3)
        image_size = (
            _size_of(getattr(config_, "image_size", None))
            or _size_of(processor_cfg.get("crop_size"))
            or _size_of(processor_cfg.get("size"))
        )
        if image_size is None:
            raise ValueError(
                f"{current_config_key('config')}: cannot tell the input size of {type(self.model).__name__}; "
                "set image_size in the config"
            )
        patch = getattr(config_, "patch_size", None)
        self._patch = _size_of(patch) if patch is not None else None
        self._image_size_for_grid = image_size
        self.model_type = config_.model_type
        self._finish_init(
            image_size=image_size,
            image_mean=mean,
            image_std=std,
            interpolation=_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else resample,
        )

    # ------------------------------------------------------------------ building
    def _split_config(self, config, need_type: bool) -> tuple[dict, str | None]:
        key = current_config_key("config")
        if config is None:
            if need_type and self.model_type is None:
                raise ValueError(
                    f"{key}: give a vision config dict with model_type (e.g. 'clip_vision_model', "
                    f"'siglip_vision_model') for random init, or {current_config_key('pretrained')}: a local "
                    "save_pretrained folder"
                )
            return {}, self.model_type
        if hasattr(config, "to_dict") and not isinstance(config, Mapping):  # a PretrainedConfig
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(f"{key}: must be a dict with model_type and config fields, got {type(config).__name__}")
        overrides = dict(config)
        model_type = overrides.pop("model_type", None) or self.model_type
        for drop in ("transformers_version", "architectures", "_name_or_path"):
            overrides.pop(drop, None)
        if self.model_type is not None and model_type != self.model_type:
            raise ValueError(
                f"{key}.model_type: {type(self).__name__} builds {self.model_type!r} models, got {model_type!r}; "
                "use HFVisionEncoder for other families"
            )
        if need_type and model_type is None:
            raise ValueError(
                f"{key}: missing model_type; set it to a transformers vision model type such as "
                "'clip_vision_model' or 'siglip_vision_model'"
            )
        return overrides, model_type

    def _config_from_dict(self, model_type: str, fields: dict):
        from tpo.models.utils import hf_config_for

        key = current_config_key("config")
        hf_config = hf_config_for(model_type, fields, key)
        vision = getattr(hf_config, "vision_config", None)
        if vision is not None:  # a dual encoder's config: build its vision tower only
            hf_config = vision
        self._check_family(hf_config.model_type, key)
        return hf_config, model_type

    def _load(self, source, overrides: dict, model_type: str | None, local_only: bool):
        from transformers import AutoConfig, AutoModel
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        key = current_config_key("pretrained")
        try:
            saved = AutoConfig.from_pretrained(str(source), local_files_only=local_only)
        except (OSError, ValueError) as err:
            raise ValueError(f"{key}: {str(source)!r} is not a transformers model folder: {err}") from err
        vision = getattr(saved, "vision_config", None)
        loaded_type = vision.model_type if vision is not None else saved.model_type
        self._check_family(loaded_type, key)
        if model_type is not None and model_type not in (saved.model_type, loaded_type):
            raise ValueError(
                f"{current_config_key('config')}.model_type: {model_type!r} does not match the {saved.model_type!r} "
                f"model saved in {str(source)!r}"
            )
        model_class = MODEL_MAPPING[type(vision)] if vision is not None else AutoModel
        try:
            model, info = model_class.from_pretrained(
                str(source), local_files_only=local_only, output_loading_info=True, **overrides
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{key}: could not load {str(source)!r}: {err}") from err
        # transformers fills what the checkpoint lacks with random weights and only logs it
        unset = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
        if unset:
            raise ValueError(
                f"{key}: the weights in {str(source)!r} leave {len(unset)} tensors of {type(model).__name__} unset or "
                f"of the wrong shape ({', '.join(unset[:8])}{', ...' if len(unset) > 8 else ''}); is the checkpoint "
                "complete and of this config?"
            )
        return model, saved.model_type

    def _check_family(self, loaded_type: str, key: str) -> None:
        if self.model_type is not None and loaded_type != self.model_type:
            raise ValueError(
                f"{key}: {type(self).__name__} builds {self.model_type!r} models, this is {loaded_type!r}; "
                "use HFVisionEncoder (or the matching alias)"
            )

    @staticmethod
    def _read_processor_config(folder: Path) -> dict:
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{current_config_key('pretrained')}: {str(path)!r} is not valid JSON: {err}") from err

    @staticmethod
    def _fetch_processor_config(repo_id: str) -> dict:
        from transformers.image_processing_base import ImageProcessingMixin

        try:
            config, _ = ImageProcessingMixin.get_image_processor_dict(repo_id)
        except OSError:
            return {}
        return config

    # ------------------------------------------------------------------ forward
    def _num_layers(self) -> int | None:
        value = getattr(self.model.config, "num_hidden_layers", None)
        return int(value) if isinstance(value, int) else None

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        blocks = hidden[1:] if len(hidden) > 1 else hidden  # hidden_states[0] is the embedding output
        features = blocks[self.select_layer]
        if features.ndim == 4:  # conv models: NCHW stage maps
            return features, None
        if self._patch is None:
            return features, None  # no known grid: every token is kept
        grid = (self._image_size_for_grid[0] // self._patch[0], self._image_size_for_grid[1] // self._patch[1])
        num_prefix = features.shape[1] - grid[0] * grid[1]
        if num_prefix < 0:
            return features, None
        prefix, patches = features[:, :num_prefix], features[:, num_prefix:]
        patches = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        return patches, (prefix if self.with_cls and num_prefix else None)


@VISION_ENCODERS.register_module()
class CLIPVisionEncoder(HFVisionEncoder):
    """:class:`HFVisionEncoder` fixed to transformers' ``CLIPVisionModel``
    (``config`` needs no ``model_type``; a full ``CLIPModel`` folder loads its
    vision tower)."""

    model_type = "clip_vision_model"


@VISION_ENCODERS.register_module()
class SiglipVisionEncoder(HFVisionEncoder):
    """:class:`HFVisionEncoder` fixed to transformers' ``SiglipVisionModel``
    (no CLS token: its tokens are always the patch grid)."""

    model_type = "siglip_vision_model"
