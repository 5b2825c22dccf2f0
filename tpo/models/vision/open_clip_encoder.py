"""The visual tower of any open_clip model (ViT, ModifiedResNet, timm trunk),
built by name from open_clip's configs or from a custom model config; the
text tower is dropped once the weights are in."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Mapping

import torch

from tpo.registry import VISION_ENCODERS, current_config_key

from .base import VisionEncoder, find_weights_file, resolve_weights

_OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


@VISION_ENCODERS.register_module()
class OpenCLIPVisionEncoder(VisionEncoder):
    """An open_clip model's ``.visual``.

    Args:
        model_name: an open_clip config name (``"ViT-L-14-336"``, ``"RN50"``,
            see ``open_clip.list_models()``).
        model_cfg: instead of a name, a model config dict with ``embed_dim``,
            ``vision_cfg`` and ``text_cfg`` (and optionally ``preprocess_cfg``,
            ``quick_gelu``, ``custom_text``), as in open_clip's JSON configs.
        pretrained: a local CLIP checkpoint file (``.pt``/``.bin``/
            ``.safetensors``/big_vision ``.npz``) loaded through open_clip's
            own loading code, or a folder holding one; a folder with an
            ``open_clip_config.json`` (the hub layout) carries its own config,
            so ``model_name``/``model_cfg`` may be left out. ``None``: random
            init. With ``allow_download=True`` a value that is no local path is
            an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``).
        allow_download: let open_clip fetch weights by tag.
        freeze, select_layer, with_cls: see :class:`VisionEncoder`
            (``select_layer`` indexes the transformer blocks of a ViT and the
            five stages, stem included, of a ModifiedResNet).
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_cfg: Mapping[str, Any] | None = None,
        pretrained=None,
        allow_download: bool = False,
        freeze: bool = True,
        select_layer: int = -2,
        with_cls: bool = False,
    ):
        super().__init__(freeze=freeze, select_layer=select_layer, with_cls=with_cls)
        import open_clip

        local, remote = resolve_weights(pretrained, allow_download)
        config_folder = local if local is not None and (local / "open_clip_config.json").is_file() else None
        if model_name is not None and model_cfg is not None:
            raise ValueError(
                f"{current_config_key('model_name')}: set either model_name (an open_clip config name) or "
                "model_cfg (a custom config dict), not both"
            )
        if config_folder is not None and (model_name is not None or model_cfg is not None):
            raise ValueError(
                f"{current_config_key('pretrained')}: folder {str(local)!r} has its own open_clip_config.json; "
                "leave model_name and model_cfg out (or point pretrained at the weights file)"
            )
        if config_folder is None and model_name is None and model_cfg is None:
            raise ValueError(
                f"{current_config_key('model_name')}: set model_name (one of open_clip.list_models()) or "
                "model_cfg (a dict with embed_dim, vision_cfg and text_cfg)"
            )

        checkpoint = None
        if local is not None and config_folder is None:
            checkpoint = find_weights_file(local, _OPEN_CLIP_WEIGHTS) if local.is_dir() else local

        if model_cfg is not None:
            if remote is not None:
                raise ValueError(
                    f"{current_config_key('pretrained')}: a pretrained tag needs model_name; a custom model_cfg "
                    "takes a local checkpoint file"
                )
            model, preprocess = self._from_cfg(model_cfg, checkpoint)
            self.model_name = "custom"
        else:
            if config_folder is not None:
                name, source = f"local-dir:{config_folder}", None
            else:
                if not isinstance(model_name, str):
                    raise TypeError(f"{current_config_key('model_name')}: must be a string, got {model_name!r}")
                self._check_name(model_name)
                name = model_name
                source = str(checkpoint) if checkpoint is not None else (None if remote is None else remote)
                if source is True:
                    raise ValueError(
                        f"{current_config_key('pretrained')}: open_clip needs a pretrained tag "
                        f"(one of {open_clip.list_pretrained_tags_by_model(model_name)}) or a local file, not True"
                    )
            try:
                model = open_clip.create_model(
                    name,
                    pretrained=source,
                    pretrained_text=False,  # the text tower is dropped; never fetch its weights
                    force_patch_dropout=0.0,  # an MLLM needs every token
                    require_pretrained=source is not None or config_folder is not None,
                )
            except RuntimeError as err:
                if source is None and config_folder is None:
                    raise
                raise ValueError(
                    f"{current_config_key('pretrained')}: could not load {str(local or source)!r} into open_clip "
                    f"model {model_name or str(config_folder)!r}: {err}"
                ) from err
            preprocess = open_clip.get_model_preprocess_cfg(model)
            self.model_name = model_name or str(config_folder)

        self.model = model.visual  # the text tower goes with `model`
        del model
        if hasattr(self.model, "output_tokens"):
            self.model.output_tokens = False
        size = preprocess.get("size") or self.model.image_size
        mean = preprocess.get("mean") or getattr(self.model, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = preprocess.get("std") or getattr(self.model, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self._finish_init(
            image_size=size, image_mean=mean, image_std=std, interpolation=preprocess.get("interpolation")
        )

    @staticmethod
    def _check_name(model_name: str) -> None:
        import open_clip

        names = open_clip.list_models()
        if model_name.replace("/", "-") not in names and not model_name.startswith(("hf-hub:", "local-dir:")):
            close = difflib.get_close_matches(model_name, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{current_config_key('model_name')}: {model_name!r} is not an open_clip model config{hint} "
                "(see open_clip.list_models(), or give model_cfg)"
            )

    @staticmethod
    def _from_cfg(model_cfg: Mapping[str, Any], checkpoint: Path | None):
        """Build a CLIP/CustomTextCLIP/CoCa from a config dict the way
        ``open_clip.create_model`` picks the class, then load ``checkpoint``
        with ``open_clip.load_checkpoint``."""
        import open_clip
        from open_clip.coca_model import CoCa
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        key = current_config_key("model_cfg")
        if not isinstance(model_cfg, Mapping):
            raise TypeError(
                f"{key}: must be a dict with embed_dim, vision_cfg and text_cfg, got {type(model_cfg).__name__}"
            )
        cfg = copy.deepcopy(dict(model_cfg))
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"{key}: missing {', '.join(missing)}; an open_clip model config needs embed_dim, "
                             "vision_cfg and text_cfg")
        preprocess_overlay = cfg.pop("preprocess_cfg", None) or {}
        vision_cfg = dict(cfg["vision_cfg"])
        vision_cfg["patch_dropout"] = 0.0  # an MLLM needs every token
        vision_cfg.setdefault("timm_model_pretrained", False)  # never fetch a timm trunk's weights
        cfg["vision_cfg"] = vision_cfg
        custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
        model_class = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP if custom_text else CLIP
        try:
            model = model_class(**cfg)
        except TypeError as err:
            raise ValueError(f"{key}: not a valid open_clip config for {model_class.__name__}: {err}") from err
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, str(checkpoint))
            except (RuntimeError, KeyError) as err:
                raise ValueError(
                    f"{current_config_key('pretrained')}: {str(checkpoint)!r} does not fit the model of {key}: {err}"
                ) from err
        preprocess = merge_preprocess_dict(PreprocessCfg(), preprocess_overlay)
        preprocess["size"] = model.visual.image_size
        open_clip.set_model_preprocess_cfg(model, preprocess)
        return model, preprocess

    def _num_layers(self) -> int | None:
        transformer = getattr(self.model, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            return len(transformer.resblocks)
        trunk = getattr(self.model, "trunk", None)  # open_clip's timm tower
        if trunk is not None and hasattr(trunk, "num_prefix_tokens") and hasattr(trunk, "blocks"):
            return len(trunk.blocks)
        if type(self.model).__name__ == "ModifiedResNet":
            return 5  # stem, layer1..layer4
        return None

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self.select_layer],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NCHW",
            output_extra_tokens=self.with_cls,
        )
        features = out["image_intermediates"][0]
        prefix = out.get("image_intermediates_prefix")
        prefix = prefix[0] if prefix else None
        if prefix is not None and prefix.shape[1] == 0:
            prefix = None
        return features, prefix
