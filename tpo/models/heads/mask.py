"""Segmentation heads: mask logits for images and videos from the task query.

* ``MaskDecoderHead``: a light built-in decoder. The task query cross-attends
  each frame's patch features; its mask embedding is dotted with upsampled
  per-pixel features, and the logits are resized to the image size.
* ``Sam2MaskHead``: an adapter turning the task query into sparse prompt
  embeddings of a frozen SAM2 (transformers' ``Sam2Model`` for images,
  ``Sam2VideoModel`` for videos); only the adapter trains. For videos,
  ``predict`` can propagate the first frame's mask through SAM2's memory.

Both predict ``mask_logits [B, T, H, W]`` (``T = 1`` for images) and train
with dice + sigmoid focal losses against ``targets['masks']`` (``[B, H, W]``
or ``[B, T, H, W]``, bool or 0/1; logits are resized to the targets' size).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpo.models.utils import as_dtype, freeze_module, resolve_pretrained
from tpo.registry import TASK_HEADS, current_config_key

from .base import (
    MLP,
    TaskHead,
    as_target_tensor,
    batch_size_check,
    build_loss_module,
    check_attention_width,
    check_nonneg_float,
    check_positive_int,
    grid_sine_embedding,
    require_target,
    small_init_,
    target_ids,
    validate_masks,
)


class MaskLossMixin:
    """Dice + focal losses and thresholding shared by the mask heads."""

    loss_dice: nn.Module | None
    loss_focal: nn.Module | None
    mask_threshold: float

    def loss(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Tensor]:
        logits = predictions["mask_logits"]  # [B, T, h, w]
        raw = as_target_tensor(require_target(targets, "masks", self.name), "masks", self.name).to(logits.device)
        batch_size_check(raw.shape[0], logits.shape[0], "masks", self.name)
        masks = validate_masks(raw, "masks", target_ids(targets), self.name)  # [B, T', H, W] float
        b, t = logits.shape[:2]
        if masks.shape[1] != t:
            raise ValueError(
                f"{self.name}.loss: targets['masks'] has {masks.shape[1]} frames but the predictions have {t} "
                "(image masks are [B, H, W], video masks [B, T, H, W])"
            )
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        flat_logits = logits.reshape(b * t, -1)
        flat_masks = masks.reshape(b * t, -1).to(flat_logits.dtype)
        valid = targets.get("frame_valid")
        weight = None
        if valid is not None:
            valid = as_target_tensor(valid, "frame_valid", self.name).to(logits.device)
            if tuple(valid.shape) != (b, t):
                raise ValueError(
                    f"{self.name}.loss: targets['frame_valid'] must be [B, T] = [{b}, {t}], got {tuple(valid.shape)}"
                )
            weight = valid.reshape(-1).float()
        parts = [
            loss(flat_logits, flat_masks, weight=weight)
            for loss in (self.loss_dice, self.loss_focal)
            if loss is not None
        ]
        return self.total(*parts)

    def postprocess(
        self, predictions: Mapping[str, Any], output_size: Sequence[int] | None = None, **inputs: Any
    ) -> dict[str, Tensor]:
        logits = predictions["mask_logits"].float()
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(
                logits, size=tuple(int(s) for s in output_size), mode="bilinear", align_corners=False
            )
        probs = logits.sigmoid()
        return {"masks": probs > self.mask_threshold, "scores": probs}


def _loss_defaults():
    return dict(type="DiceLoss", loss_weight=1.0), dict(type="SigmoidFocalLoss", loss_weight=20.0)


class _LayerNorm2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


@TASK_HEADS.register_module()
class MaskDecoderHead(MaskLossMixin, TaskHead):
    """Light mask decoder.

    Each frame's patch features ``[N, C]`` are projected to ``hidden_dim``
    with a 2-D sine position embedding; the projected task query is one token
    that runs ``num_layers`` blocks of (cross-attention to the frame's
    patches, MLP). The patch grid is upsampled ``2 ** num_upsample`` times by
    transposed convolutions (modulated by the query token), dotted with the
    token's mask embedding, and resized (bilinear) to ``visual['image_size']``
    (or ``output_size`` given to ``forward``).

    ``forward(query, visual) -> {'mask_logits': [B, T, H, W]}``;
    ``loss(predictions, {'masks': [B, H, W] or [B, T, H, W], 'frame_valid'?
    [B, T], 'ids'?}) -> {'dice', 'focal', 'loss'}``;
    ``postprocess(predictions, output_size=None) -> {'masks': [B, T, H, W]
    bool, 'scores': probabilities}``."""

    task = "segmentation"
    requires_visual = True
    input_keys = ("output_size",)
    target_keys = ("masks", "frame_valid")

    def __init__(
        self,
        in_dim: int,
        visual_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        num_upsample: int = 2,
        dropout: float = 0.0,
        mask_threshold: float = 0.5,
        loss_dice: Mapping | None = _loss_defaults()[0],
        loss_focal: Mapping | None = _loss_defaults()[1],
    ):
        super().__init__(in_dim)
        self.visual_dim = check_positive_int(visual_dim, "visual_dim")
        self.hidden_dim = check_attention_width(hidden_dim, num_heads)
        if isinstance(num_upsample, bool) or not isinstance(num_upsample, int) or not 0 <= num_upsample <= 4:
            raise ValueError(
                f"{current_config_key('num_upsample')}: must be an integer in [0, 4], got {num_upsample!r}"
            )
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"{current_config_key('mask_threshold')}: a probability in (0, 1), got {mask_threshold!r}")
        dropout = check_nonneg_float(dropout, "dropout")
        self.mask_threshold = float(mask_threshold)

        self.query_proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.feature_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, hidden_dim))
        self.cross_attn = nn.ModuleList()
        self.attn_norms = nn.ModuleList()
        self.mlps = nn.ModuleList()
        self.mlp_norms = nn.ModuleList()
        for _ in range(check_positive_int(num_layers, "num_layers")):
            self.cross_attn.append(nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True))
            self.attn_norms.append(nn.LayerNorm(hidden_dim))
            self.mlps.append(MLP(hidden_dim, 4 * hidden_dim, hidden_dim, 2, dropout))
            self.mlp_norms.append(nn.LayerNorm(hidden_dim))
        self.out_norm = nn.LayerNorm(hidden_dim)
        # query-conditioned modulation of the pixel features (FiLM)
        self.film = nn.Linear(hidden_dim, 2 * hidden_dim)
        small_init_(self.film)
        ups: list[nn.Module] = []
        channels = hidden_dim
        for _ in range(num_upsample):
            out = max(channels // 2, 8)
            ups += [nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2), _LayerNorm2d(out), nn.GELU()]
            channels = out
        self.upsample = nn.Sequential(*ups)
        self.pixel_channels = channels
        self.mask_embed = MLP(hidden_dim, hidden_dim, channels, 3)
        self.loss_dice = build_loss_module(loss_dice, "loss_dice")
        self.loss_focal = build_loss_module(loss_focal, "loss_focal")

    def forward(
        self,
        query: Tensor,
        visual: Mapping[str, Any] | None = None,
        output_size: Sequence[int] | None = None,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        query = self.check_query(query)
        v = self.check_visual(visual, self.visual_dim, query.shape[0])
        feats = v["features"]
        b, t, n, _ = feats.shape
        h, w = v["grid_size"]
        pix = self.feature_proj(feats).reshape(b * t, n, self.hidden_dim)
        pos = grid_sine_embedding((h, w), self.hidden_dim, device=pix.device).to(pix.dtype)
        keys = pix + pos
        tok = self.query_proj(query)[:, None].expand(b, t, self.hidden_dim).reshape(b * t, 1, self.hidden_dim)
        for attn, norm1, mlp, norm2 in zip(self.cross_attn, self.attn_norms, self.mlps, self.mlp_norms):
            attended, _ = attn(norm1(tok), keys, pix, need_weights=False)
            tok = tok + attended
            tok = tok + mlp(norm2(tok))
        tok = self.out_norm(tok[:, 0])  # [B*T, D]
        scale, shift = self.film(tok).chunk(2, dim=-1)
        pix = pix * (1 + scale[:, None]) + shift[:, None]
        pix = self.upsample(pix.transpose(1, 2).reshape(b * t, self.hidden_dim, h, w))  # [B*T, c, h', w']
        logits = torch.einsum("bc,bchw->bhw", self.mask_embed(tok), pix) / self.pixel_channels**0.5
        size = tuple(int(s) for s in (output_size if output_size is not None else v["image_size"]))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return {"mask_logits": logits.reshape(b, t, *size)}


# --------------------------------------------------------------------------- #
# SAM2 adapter
# --------------------------------------------------------------------------- #
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)


@TASK_HEADS.register_module()
class Sam2MaskHead(MaskLossMixin, TaskHead):
    """Task query -> sparse prompt embeddings of a frozen SAM2.

    The adapter (an MLP, ``in_dim -> adapter_hidden_dim -> num_prompt_tokens *
    sam_hidden``) produces ``num_prompt_tokens`` sparse prompt embeddings; the
    frozen SAM2 encodes the image (or every frame) and its mask decoder, with
    these prompts and the "no mask" dense prompt, predicts a single mask per
    frame. SAM2 is frozen (``freeze_module``): no gradients, eval mode; the
    adapter is the only trainable part.

    SAM2 comes from ``pretrained`` (a local folder saved by transformers:
    ``Sam2Model``, or ``Sam2VideoModel`` when ``video=True``) or from
    ``sam2_config`` (a ``Sam2Config`` / ``Sam2VideoConfig`` dict, random
    weights: tests and experiments). Nothing is downloaded.

    Inputs: ``images [B, 3, H, W]`` or ``videos [B, T, 3, H, W]`` keyword
    arguments of ``forward`` (``visual`` is not used): pixels normalised with
    ``input_mean``/``input_std`` (default: plain [0, 1] pixels; in a
    ``TPOModel``, the vision encoder's ``image_mean``/``image_std``); the head
    un-normalises, resizes them to SAM2's square ``image_size`` and normalises
    with SAM2's ``sam_mean``/``sam_std``. The logits come back at the input's
    ``H x W`` (or ``output_size``).

    ``forward -> {'mask_logits': [B, T, H, W]}`` (T = 1 for images);
    ``loss`` as ``MaskDecoderHead``; ``postprocess`` thresholds, and
    ``predict(query, videos=..., propagate=True)`` on a ``video=True`` head
    decodes the first frame from the prompts, then lets SAM2's memory
    propagate that mask to the other frames (``propagate=False``: every frame
    from the prompts, as in training).
    """

    task = "segmentation"
    input_keys = ("images", "videos", "output_size", "propagate")
    target_keys = ("masks", "frame_valid")

    def __init__(
        self,
        in_dim: int,
        pretrained: str | None = None,
        sam2_config: Mapping | None = None,
        video: bool = False,
        num_prompt_tokens: int = 2,
        adapter_hidden_dim: int = 512,
        input_mean: Sequence[float] = (0.0, 0.0, 0.0),
        input_std: Sequence[float] = (1.0, 1.0, 1.0),
        sam_mean: Sequence[float] = SAM2_MEAN,
        sam_std: Sequence[float] = SAM2_STD,
        mask_threshold: float = 0.5,
        torch_dtype: str | None = None,
        loss_dice: Mapping | None = _loss_defaults()[0],
        loss_focal: Mapping | None = _loss_defaults()[1],
    ):
        super().__init__(in_dim)
        if (pretrained is None) == (sam2_config is None):
            raise ValueError(
                f"{current_config_key('pretrained')}: give exactly one of `pretrained` (a local SAM2 folder) "
                "or `sam2_config` (a Sam2Config/Sam2VideoConfig dict for random weights)"
            )
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"{current_config_key('mask_threshold')}: a probability in (0, 1), got {mask_threshold!r}")
        self.video = bool(video)
        self.mask_threshold = float(mask_threshold)
        self.sam = freeze_module(self._load_sam(pretrained, sam2_config, as_dtype(torch_dtype)))
        # one mask from the single-mask token, without eval-time switching to the multimask outputs
        self.sam.mask_decoder.dynamic_multimask_via_stability = False
        self.sam_hidden = int(self.sam.config.prompt_encoder_config.hidden_size)
        self.sam_size = int(self.sam.config.prompt_encoder_config.image_size)
        self.num_prompt_tokens = check_positive_int(num_prompt_tokens, "num_prompt_tokens")
        check_positive_int(adapter_hidden_dim, "adapter_hidden_dim")
        self.adapter = nn.Sequential(
            nn.Linear(in_dim, adapter_hidden_dim),
            nn.GELU(),
            nn.Linear(adapter_hidden_dim, num_prompt_tokens * self.sam_hidden),
        )
        for key, values in (
            ("input_mean", input_mean),
            ("input_std", input_std),
            ("sam_mean", sam_mean),
            ("sam_std", sam_std),
        ):
            if len(values) != 3 or (key.endswith("std") and min(values) <= 0):
                raise ValueError(f"{current_config_key(key)}: must be 3 numbers (std > 0), got {values!r}")
            self.register_buffer(key, torch.tensor([float(x) for x in values]).view(3, 1, 1), persistent=False)
        self.loss_dice = build_loss_module(loss_dice, "loss_dice")
        self.loss_focal = build_loss_module(loss_focal, "loss_focal")

    def _load_sam(self, pretrained, sam2_config, dtype) -> nn.Module:
        from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel

        model_cls, config_cls = (Sam2VideoModel, Sam2VideoConfig) if self.video else (Sam2Model, Sam2Config)
        if pretrained is not None:
            path = resolve_pretrained(pretrained)
            try:
                model = (
                    model_cls.from_pretrained(str(path), dtype=dtype) if dtype else model_cls.from_pretrained(str(path))
                )
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"{current_config_key('pretrained')}: cannot load a {model_cls.__name__} from {str(path)!r}: {err}"
                ) from err
            return model
        if not isinstance(sam2_config, Mapping):
            raise TypeError(f"{current_config_key('sam2_config')}: must be a dict, got {type(sam2_config).__name__}")
        try:
            config = config_cls(**dict(sam2_config))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{current_config_key('sam2_config')}: not a valid {config_cls.__name__}: {err}") from err
        model = model_cls(config)
        return model.to(dtype) if dtype else model

    # ------------------------------------------------------------------ #
    def _pixels(self, images: Tensor | None, videos: Tensor | None) -> tuple[Tensor, int, int, tuple[int, int]]:
        """SAM2-ready frames ``[B*T, 3, S, S]``, B, T and the input size."""
        if (images is None) == (videos is None):
            raise ValueError(f"{self.name} needs exactly one of images=[B, 3, H, W] or videos=[B, T, 3, H, W]")
        if images is not None:
            if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"{self.name}: images must be [B, 3, H, W], got {getattr(images, 'shape', type(images).__name__)}"
                )
            frames, b, t = images, images.shape[0], 1
        else:
            if not isinstance(videos, Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
                raise ValueError(
                    f"{self.name}: videos must be [B, T, 3, H, W], "
                    f"got {getattr(videos, 'shape', type(videos).__name__)}"
                )
            b, t = videos.shape[:2]
            frames = videos.flatten(0, 1)
        size = (int(frames.shape[-2]), int(frames.shape[-1]))
        x = frames.float() * self.input_std + self.input_mean  # back to [0, 1] pixels
        if size != (self.sam_size, self.sam_size):
            x = F.interpolate(
                x, size=(self.sam_size, self.sam_size), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x - self.sam_mean) / self.sam_std
        return x.to(self._sam_dtype), b, t, size

    @property
    def _sam_dtype(self) -> torch.dtype:
        return self.sam.shared_image_embedding.positional_embedding.dtype

    @torch.no_grad()
    def _image_embeddings(self, pixels: Tensor) -> list[Tensor]:
        return self.sam.get_image_embeddings(pixels)

    def prompts(self, query: Tensor) -> Tensor:
        """The sparse prompt embeddings ``[B, num_prompt_tokens, sam_hidden]``."""
        query = self.check_query(query).to(self.adapter[0].weight.dtype)
        return self.adapter(query).reshape(query.shape[0], self.num_prompt_tokens, self.sam_hidden)

    def _decode(self, embeddings: list[Tensor], sparse: Tensor) -> Tensor:
        """Low-res mask logits ``[N, h, w]`` from image embeddings and sparse prompts ``[N, K, D]``."""
        sam = self.sam
        n = sparse.shape[0]
        last = embeddings[-1]
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *last.shape[-2:])
        positional = sam.get_image_wide_positional_embeddings().repeat(n, 1, 1, 1)
        masks, _, _, _ = sam.mask_decoder(
            image_embeddings=last,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse[:, None].to(self._sam_dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
            high_resolution_features=embeddings[:-1],
        )
        return masks[:, 0, 0]

    def forward(
        self,
        query: Tensor,
        visual: Mapping[str, Any] | None = None,
        images: Tensor | None = None,
        videos: Tensor | None = None,
        output_size: Sequence[int] | None = None,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        sparse = self.prompts(query)
        pixels, b, t, size = self._pixels(images, videos)
        if b != query.shape[0]:
            raise ValueError(f"{self.name}: {b} images/videos for a query batch of {query.shape[0]}")
        embeddings = self._image_embeddings(pixels)
        low_res = self._decode(embeddings, sparse.repeat_interleave(t, dim=0))
        size = tuple(int(s) for s in output_size) if output_size is not None else size
        logits = F.interpolate(low_res[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        return {"mask_logits": logits.reshape(b, t, *size)}

    # ------------------------------------------------------------------ #
    @torch.no_grad()
    def predict(
        self,
        query: Tensor,
        visual: Mapping[str, Any] | None = None,
        images: Tensor | None = None,
        videos: Tensor | None = None,
        output_size: Sequence[int] | None = None,
        propagate: bool = True,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        if not (self.video and propagate and videos is not None):
            predictions = self(query, visual, images=images, videos=videos, output_size=output_size)
            return self.postprocess(predictions)
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        sparse = self.prompts(query)
        pixels, b, t, size = self._pixels(None, videos)
        if b != query.shape[0]:
            raise ValueError(f"{self.name}: {b} videos for a query batch of {query.shape[0]}")
        size = tuple(int(s) for s in output_size) if output_size is not None else size
        pixels = pixels.reshape(b, t, *pixels.shape[1:])
        logits = []
        for i in range(b):
            first = self._decode(self._image_embeddings(pixels[i, :1]), sparse[i : i + 1])  # [1, h, w]
            first_mask = F.interpolate(
                first[:, None].float(), size=(self.sam_size, self.sam_size), mode="bilinear", align_corners=False
            )
            first_mask = (first_mask.sigmoid() > self.mask_threshold).to(self._sam_dtype)
            session = Sam2VideoInferenceSession(
                video=pixels[i],
                video_height=size[0],
                video_width=size[1],
                inference_device=pixels.device,
                inference_state_device=pixels.device,
                video_storage_device=pixels.device,
                dtype=self._sam_dtype,
            )
            obj_idx = session.obj_id_to_idx(1)
            session.add_mask_inputs(obj_idx, 0, first_mask)
            session.obj_with_new_inputs = [1]
            per_frame = [None] * t
            for out in self.sam.propagate_in_video_iterator(session, start_frame_idx=0):
                per_frame[out.frame_idx] = out.pred_masks[0, 0].float()
            per_frame[0] = first[0].float()  # the prompted frame: the decoder's own logits, as without propagation
            low_res = torch.stack(per_frame)  # [T, h, w]
            logits.append(F.interpolate(low_res[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
        return self.postprocess({"mask_logits": torch.stack(logits)})
