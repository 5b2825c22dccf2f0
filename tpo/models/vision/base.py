"""The contract every vision encoder of tpo keeps.

A :class:`VisionEncoder` turns images ``[B, 3, H, W]`` into ``[B, 1, N, C]``
and videos ``[B, T, 3, H, W]`` into ``[B, T, N, C]`` (the frames of a batch go
through the backbone in one call). After construction it knows

* ``out_dim``: the feature channels ``C``;
* ``image_size``: the ``(H, W)`` it expects;
* ``image_mean``/``image_std``: the normalisation of its pretrained config;
* ``num_tokens``: ``N``, the tokens per frame;
* ``grid_size``: the patch grid ``(h, w)`` when the ``N`` tokens are exactly
  that grid in row-major order (no CLS/prefix tokens), else ``None``.

A backend subclass builds its model, then calls :meth:`_finish_init` with the
preprocessing constants of the model's own pretrained config; it implements
:meth:`_encode` (one batch of frames -> patch features and prefix tokens) and
may implement :meth:`_num_layers` (for a clear ``select_layer`` range error).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tpo.models.utils import FreezeAwareModule, freeze_module, resolve_pretrained
from tpo.registry import current_config_key

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _pair(value, what: str) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(224, 224)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")


def _triple(value, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{what} must have 3 values (one per RGB channel), got {value!r}")
    return values


def resolve_weights(pretrained, allow_download: bool) -> tuple[Path | None, Any]:
    """Where ``pretrained`` points: ``(local_path, None)`` for an existing
    local file or folder, ``(None, name)`` for something a library fetches
    by name (only with ``allow_download=True``), ``(None, None)`` for none.

    A value that is not a local path, without ``allow_download``, raises a
    FileNotFoundError naming the path and the ``pretrained`` config key."""
    if not isinstance(allow_download, bool):
        raise TypeError(f"{current_config_key('allow_download')}: must be True or False, got {allow_download!r}")
    if pretrained is None or pretrained is False:
        return None, None
    if pretrained is True:
        if not allow_download:
            raise ValueError(
                f"{current_config_key('pretrained')}: True asks the library to download its default weights; "
                f"give a local checkpoint path instead, or set {current_config_key('allow_download')}=True"
            )
        return None, True
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"{current_config_key('pretrained')}: must be a local file or folder path (or None), "
            f"got {type(pretrained).__name__}"
        )
    local = Path(pretrained).expanduser()
    if local.exists():
        return local, None
    if allow_download:
        return None, str(pretrained)
    return resolve_pretrained(pretrained, "pretrained"), None  # raises FileNotFoundError


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def find_weights_file(folder: Path, preferred: Sequence[str] = ()) -> Path:
    """The one checkpoint file in ``folder``: the first of ``preferred`` that
    exists, else the only ``*.safetensors``/``*.bin``/``*.pth``/``*.pt``/``*.ckpt``."""
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    what = "no checkpoint file" if not found else f"several checkpoint files ({', '.join(p.name for p in found)})"
    raise FileNotFoundError(
        f"{current_config_key('pretrained')}: folder {str(folder)!r} holds {what}; point pretrained at the "
        f"weights file itself" + (f" (looked for {', '.join(preferred)})" if preferred else "")
    )


def _is_pil_image(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


class VisionEncoder(FreezeAwareModule):
    """Base class of the image/video encoders (see the module docstring).

    Args:
        freeze: freeze every parameter and keep the encoder in eval mode
            (``train()`` leaves a frozen encoder in eval mode).
        select_layer: which block's output to return; negative counts from the
            end (``-2``, the default, is the penultimate block, as in LLaVA).
        with_cls: keep the CLS/prefix tokens (they come first, and
            ``grid_size`` becomes ``None``); models without any keep only
            their patch tokens either way.
    """

    out_dim: int
    image_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_tokens: int
    grid_size: tuple[int, int] | None
    interpolation: str = "bicubic"

    def __init__(self, *, freeze: bool = True, select_layer: int = -2, with_cls: bool = False):
        super().__init__()
        for name, value in (("freeze", freeze), ("with_cls", with_cls)):
            if not isinstance(value, bool):
                raise TypeError(f"{current_config_key(name)}: must be True or False, got {value!r}")
        if not isinstance(select_layer, int) or isinstance(select_layer, bool):
            raise TypeError(
                f"{current_config_key('select_layer')}: must be an int (a block index; -1 the last block, "
                f"-2 the penultimate), got {select_layer!r}"
            )
        self.freeze = freeze
        self.select_layer = select_layer
        self.with_cls = with_cls

    # ------------------------------------------------------------------ backend hooks
    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, 3, H, W]`` -> ``(features, prefix)``: ``features`` is either a
        patch map ``[N, C, h, w]`` or tokens ``[N, L, C]`` with no known grid;
        ``prefix`` the CLS/prefix tokens ``[N, P, C]`` when ``with_cls`` and
        the model has any, else ``None``."""
        raise NotImplementedError

    def _num_layers(self) -> int | None:
        """How many block outputs ``select_layer`` indexes into, if known."""
        return None

    # ------------------------------------------------------------------ set-up
    def _finish_init(self, *, image_size, image_mean, image_std, interpolation: str | None = None) -> None:
        """Record the preprocessing constants, check ``select_layer``, find
        ``out_dim``/``num_tokens``/``grid_size`` with one probe frame, then
        freeze (or leave in train mode)."""
        self.image_size = _pair(image_size, f"{type(self).__name__} image size")
        self.image_mean = _triple(image_mean, f"{type(self).__name__} image mean")
        self.image_std = _triple(image_std, f"{type(self).__name__} image std")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"{type(self).__name__}: image std must be positive, got {self.image_std}")
        interpolation = (interpolation or "bicubic").lower()
        self.interpolation = interpolation if interpolation in _INTERPOLATIONS else "bicubic"
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(3, 1, 1), persistent=False)

        num_layers = self._num_layers()
        if num_layers is not None and not -num_layers <= self.select_layer < num_layers:
            raise ValueError(
                f"{current_config_key('select_layer')}: {self.select_layer} is out of range for a backbone with "
                f"{num_layers} blocks; use a value in [{-num_layers}, {num_layers - 1}] (-1 the last, -2 the "
                "penultimate)"
            )
        self._probe()
        if self.freeze:
            freeze_module(self)
        else:
            self.train()

    @torch.no_grad()
    def _probe(self) -> None:
        modes = {m: m.training for m in self.modules()}
        self.eval()  # batch-norm statistics must not move, dropout must not drop tokens
        try:
            probe = torch.zeros(1, 3, *self.image_size, dtype=self.dtype, device=self.device)
            try:
                features, prefix = self._encode(probe)
            except (AssertionError, IndexError) as err:
                raise ValueError(
                    f"{current_config_key('select_layer')}: {self.select_layer} does not pick a block of "
                    f"{type(self).__name__}: {err}"
                ) from err
        finally:
            for module, mode in modes.items():
                module.training = mode
        self.grid_size = None
        if features.ndim == 4:
            self.out_dim = int(features.shape[1])
            grid = (int(features.shape[2]), int(features.shape[3]))
            patches = grid[0] * grid[1]
        elif features.ndim == 3:
            self.out_dim = int(features.shape[2])
            grid, patches = None, int(features.shape[1])
        else:  # pragma: no cover - a backend bug
            raise RuntimeError(f"{type(self).__name__}._encode gave features of shape {tuple(features.shape)}")
        num_prefix = int(prefix.shape[1]) if prefix is not None else 0
        self.num_tokens = patches + num_prefix
        self.grid_size = grid if num_prefix == 0 else None

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        for param in self.parameters():
            return param.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward
    def _check_pixels(self, pixel_values) -> tuple[torch.Tensor, int, int]:
        name = type(self).__name__
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"{name}.forward takes a tensor [B, 3, H, W] or [B, T, 3, H, W], got {type(pixel_values).__name__}; "
                f"turn images into one with {name}.preprocess(...)"
            )
        if pixel_values.ndim == 4:
            batch, frames = pixel_values.shape[0], 1
        elif pixel_values.ndim == 5:
            batch, frames = pixel_values.shape[0], pixel_values.shape[1]
        else:
            raise ValueError(
                f"{name}: pixel values must be images [B, 3, H, W] or videos [B, T, 3, H, W], got shape "
                f"{tuple(pixel_values.shape)}"
            )
        channels, height, width = pixel_values.shape[-3:]
        if channels != 3:
            raise ValueError(
                f"{name}: expected 3 (RGB) channels in dimension {pixel_values.ndim - 3}, got shape "
                f"{tuple(pixel_values.shape)}; channels come before height and width"
            )
        if (height, width) != self.image_size:
            raise ValueError(
                f"{name}: frames are {height}x{width} but the encoder expects {self.image_size[0]}x"
                f"{self.image_size[1]}; resize and normalise them with {name}.preprocess(...)"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"{name}: pixel values must be normalised floats, got dtype {pixel_values.dtype}; "
                f"pass raw images through {name}.preprocess(...) first"
            )
        return pixel_values.reshape(batch * frames, 3, height, width), batch, frames

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> ``[B, 1, N, C]``; videos ``[B, T, 3, H, W]``
        -> ``[B, T, N, C]``."""
        frames_flat, batch, frames = self._check_pixels(pixel_values)
        features, prefix = self._encode(frames_flat.to(self.dtype))
        if features.ndim == 4:
            features = features.flatten(2).transpose(1, 2)
        if prefix is not None and prefix.shape[1] > 0:
            features = torch.cat([prefix, features], dim=1)
        if features.shape[1] != self.num_tokens:
            raise RuntimeError(
                f"{type(self).__name__}: the backbone gave {features.shape[1]} tokens per frame, expected "
                f"{self.num_tokens}; token dropping (patch dropout) must be off for an MLLM encoder"
            )
        return features.reshape(batch, frames, self.num_tokens, features.shape[-1])

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images) -> torch.Tensor:
        """Raw images -> normalised float32 pixel values of ``image_size``.

        ``images``: a uint8 tensor (0..255) or a float tensor in [0, 1] of
        shape ``[..., 3, h, w]`` (any ``h``, ``w``), a PIL image (-> ``[3, H,
        W]``) or a list of PIL images/tensors ``[3, h, w]`` (-> ``[N, 3, H,
        W]``). Resized with this encoder's interpolation (bicubic unless its
        pretrained config says otherwise, antialiased), then normalised with
        ``image_mean``/``image_std``.
        """
        name = type(self).__name__
        if _is_pil_image(images):
            return self._preprocess_tensor(_pil_to_tensor(images))
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError(f"{name}.preprocess: got an empty list of images")
            items = []
            for i, image in enumerate(images):
                tensor = _pil_to_tensor(image) if _is_pil_image(image) else image
                if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                    raise TypeError(
                        f"{name}.preprocess: list item {i} must be a PIL image or a tensor [3, h, w], got "
                        f"{type(image).__name__}{'' if not isinstance(image, torch.Tensor) else tuple(image.shape)}"
                    )
                items.append(self._preprocess_tensor(tensor))
            return torch.stack(items)
        if isinstance(images, torch.Tensor):
            return self._preprocess_tensor(images)
        raise TypeError(
            f"{name}.preprocess takes a uint8 tensor (0..255) or float tensor in [0, 1] of shape [..., 3, h, w], "
            f"a PIL image, or a list of them; got {type(images).__name__}"
        )

    def _preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if images.ndim < 3 or images.shape[-3] != 3:
            raise ValueError(
                f"{name}.preprocess: images must have shape [..., 3, h, w] (channels first, RGB), got "
                f"{tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            pixels = images.float() / 255.0
        elif images.is_floating_point():
            pixels = images.float()
            if pixels.numel():
                low, high = float(pixels.min()), float(pixels.max())
                if low < -1e-3 or high > 1 + 1e-3 or math.isnan(low) or math.isnan(high):
                    raise ValueError(
                        f"{name}.preprocess: float images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                        "pass uint8 images (0..255), divide by 255, or skip preprocess if they are already normalised"
                    )
        else:
            raise TypeError(
                f"{name}.preprocess: images must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}"
            )
        lead, (height, width) = pixels.shape[:-3], pixels.shape[-2:]
        pixels = pixels.reshape(-1, 3, height, width)
        if (height, width) != self.image_size:
            pixels = F.interpolate(
                pixels,
                size=self.image_size,
                mode=self.interpolation,
                antialias=self.interpolation != "nearest",
                **({} if self.interpolation == "nearest" else {"align_corners": False}),
            )
            pixels = pixels.clamp_(0.0, 1.0)  # bicubic overshoots; the pixel range stays [0, 1]
        mean = self._mean.to(device=pixels.device, dtype=torch.float32)
        std = self._std.to(device=pixels.device, dtype=torch.float32)
        pixels = (pixels - mean) / std
        return pixels.reshape(*lead, 3, *self.image_size).contiguous()

    def extra_repr(self) -> str:
        return (
            f"image_size={getattr(self, 'image_size', None)}, out_dim={getattr(self, 'out_dim', None)}, "
            f"num_tokens={getattr(self, 'num_tokens', None)}, grid_size={getattr(self, 'grid_size', None)}, "
            f"select_layer={self.select_layer}, with_cls={self.with_cls}, freeze={self.freeze}"
        )


def _pil_to_tensor(image) -> torch.Tensor:
    """A PIL image -> uint8 ``[3, h, w]`` (converted to RGB)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
