"""The task-head contract, and what the heads share.

A task head reads the LLM's hidden state at its task token (the *query*,
``[B, in_dim]``) and, where it needs them, the vision encoder's patch
features. The MLLM drives every head, users' own registered heads included,
through this interface:

``head = build_task_head(dict(type=..., in_dim=llm_hidden_size, [visual_dim=C], ...))``

* ``head.task``: the task's name (class attribute), the prefix of its loss
  names in the MLLM's output;
* ``head.requires_visual``: whether ``forward`` needs ``visual``;
* ``head.input_keys``: the extra keyword inputs ``forward`` reads (e.g.
  ``init_boxes``); other keywords are ignored, so the MLLM may pass a batch's
  extras to every head;
* ``head.target_keys``: the keys of ``targets`` that ``loss`` reads;
* ``forward(query, visual=None, **inputs) -> dict`` of raw predictions, with
  ``visual = dict(features=[B, T, N, C], grid_size=(h, w), image_size=(H, W))``
  (``T = 1`` for images; optional ``frame_mask [B, T]`` bool, True on real
  frames);
* ``loss(predictions, targets) -> dict`` of named weighted scalars plus their
  total ``loss``; ``targets`` may carry ``ids`` (one per sample), which bad
  targets' errors name;
* ``postprocess(predictions, **inputs) -> dict`` of results (boxes clipped to
  [0, 1], spans ordered, masks bool at image size), and
  ``predict(query, visual=None, **inputs)`` = ``postprocess(forward(...))``
  without gradients.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from tpo.models.utils import FreezeAwareModule
from tpo.registry import LOSSES, build_child, current_config_key

# numeric slack when checking that normalised coordinates lie in [0, 1]
COORD_TOL = 1e-6


# --------------------------------------------------------------------------- #
# config helpers
# --------------------------------------------------------------------------- #
def check_positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{current_config_key(key)}: must be a positive integer, got {value!r}")
    return value


def check_attention_width(hidden_dim: Any, num_heads: Any, multiple: int = 4) -> int:
    """``hidden_dim`` of a head that attends with ``num_heads`` heads and adds sine position embeddings:
    a positive integer, a multiple of ``multiple`` (4: 2-D embeddings, 2: 1-D) and of ``num_heads``."""
    check_positive_int(hidden_dim, "hidden_dim")
    check_positive_int(num_heads, "num_heads")
    if hidden_dim % num_heads or hidden_dim % multiple:
        raise ValueError(
            f"{current_config_key('hidden_dim')}: {hidden_dim} must be a multiple of {multiple} and of "
            f"num_heads={num_heads}"
        )
    return hidden_dim


def check_nonneg_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{current_config_key(key)}: must be a finite number >= 0, got {value!r}")
    return float(value)


def build_loss_module(cfg: Mapping | nn.Module | None, key: str) -> nn.Module | None:
    """A loss from its config dict (built in ``LOSSES`` under config key
    ``key``), an already-built module, or ``None`` (that loss is off)."""
    if cfg is None or isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"{current_config_key(key)}: a loss config must be a dict with a 'type', got {type(cfg).__name__}"
        )
    return build_child(cfg, LOSSES, key)


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
class MLP(nn.Module):
    """``num_layers`` linear layers with GELU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        check_positive_int(num_layers, "num_layers")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    @property
    def last(self) -> nn.Linear:
        return self.layers[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def small_init_(layer: nn.Linear, std: float = 1e-3, bias: float | Sequence[float] = 0.0) -> nn.Linear:
    """Near-zero weights (the output starts at ``bias`` and barely depends on
    the input, yet gradients reach the layers below from the first step)."""
    with torch.no_grad():
        nn.init.normal_(layer.weight, std=std)
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype).expand_as(layer.bias))
    return layer


def sine_embedding(positions: Tensor, dim: int, max_frequency: float = 64.0) -> Tensor:
    """Sinusoidal embedding ``[..., dim]`` of continuous ``positions [...]``
    (normalised times or coordinates in [0, 1]): sines and cosines at
    ``dim / 2`` frequencies from 1 to ``max_frequency`` cycles over [0, 1]."""
    if dim % 2:
        raise ValueError(f"sine embedding dim must be even, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, device=positions.device, dtype=torch.float32) / max(half - 1, 1)
    freqs = max_frequency**exponents
    angles = positions.float()[..., None] * (2 * math.pi) * freqs
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def grid_centres(grid_size: tuple[int, int], device=None) -> Tensor:
    """``[h * w, 2]`` normalised ``(x, y)`` centres of a patch grid's cells (row-major)."""
    h, w = grid_size
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


def box_cell_overlap(boxes: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """``[B, h * w]``: the share of each normalised ``xyxy`` box that falls in each cell of a patch
    grid (row-major; a row sums to 1; a degenerate box goes to the cell holding its centre)."""
    h, w = grid_size
    x0, y0, x1, y1 = boxes.float().clamp(0.0, 1.0).unbind(-1)
    edges_x = torch.arange(w + 1, device=boxes.device, dtype=torch.float32) / w
    edges_y = torch.arange(h + 1, device=boxes.device, dtype=torch.float32) / h
    ox = (torch.minimum(x1[:, None], edges_x[None, 1:]) - torch.maximum(x0[:, None], edges_x[None, :-1])).clamp(min=0)
    oy = (torch.minimum(y1[:, None], edges_y[None, 1:]) - torch.maximum(y0[:, None], edges_y[None, :-1])).clamp(min=0)
    area = (oy[:, :, None] * ox[:, None, :]).reshape(boxes.shape[0], h * w)
    total = area.sum(-1, keepdim=True)
    cx, cy = ((x0 + x1) / 2).clamp(0, 1 - 1e-6), ((y0 + y1) / 2).clamp(0, 1 - 1e-6)
    nearest = torch.nn.functional.one_hot((cy * h).long() * w + (cx * w).long(), h * w).float()
    return torch.where(total > 0, area / total.clamp(min=1e-12), nearest)


def grid_sine_embedding(grid_size: tuple[int, int], dim: int, device=None) -> Tensor:
    """``[h * w, dim]`` 2-D sinusoidal embedding of a patch grid (row-major),
    half the channels for y, half for x, at the patch centres in [0, 1]."""
    if dim % 4:
        raise ValueError(f"2-D sine embedding dim must be a multiple of 4, got {dim}")
    centres = grid_centres(grid_size, device)
    return torch.cat((sine_embedding(centres[:, 1], dim // 2), sine_embedding(centres[:, 0], dim // 2)), dim=-1)


def frame_times(frame_mask: Tensor) -> Tensor:
    """``[B, T]`` normalised centre time ``(t + 0.5) / T_b`` of every frame,
    ``T_b`` the sample's number of real frames (padded frames get > 1)."""
    lengths = frame_mask.sum(1, keepdim=True).clamp(min=1).float()
    t = torch.arange(frame_mask.shape[1], device=frame_mask.device, dtype=torch.float32)[None]
    return (t + 0.5) / lengths


# --------------------------------------------------------------------------- #
# target validation
# --------------------------------------------------------------------------- #
def sample_name(index: int, ids: Sequence | None) -> str:
    if ids is not None and index < len(ids):
        return f"sample {index} (id {ids[index]!r})"
    return f"sample {index}"


def target_ids(targets: Mapping) -> Sequence | None:
    ids = targets.get("ids")
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return list(ids)


def require_target(targets: Mapping, key: str, head: str) -> Any:
    if not isinstance(targets, Mapping):
        raise TypeError(f"{head}.loss: targets must be a dict, got {type(targets).__name__}")
    if key not in targets or targets[key] is None:
        raise KeyError(
            f"{head}.loss: targets has no {key!r}; it needs {key!r} "
            f"(present: {', '.join(map(repr, targets)) or 'none'})"
        )
    return targets[key]


def as_target_tensor(value: Any, key: str, head: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{head}.loss: targets[{key!r}] must be a tensor or nested numbers ({err})") from None


def validate_boxes(boxes: Tensor, key: str, ids: Sequence | None, head: str, valid: Tensor | None = None) -> None:
    """Normalised ``xyxy`` boxes ``[B, ..., 4]``: finite, in [0, 1], ``x2 >= x1``
    and ``y2 >= y1``; ``valid [B, ...]`` masks out unannotated entries."""
    if boxes.dim() < 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{head}.loss: targets[{key!r}] must be [B, ..., 4] normalised xyxy boxes, got {tuple(boxes.shape)}"
        )
    b = boxes.detach().float()
    x1, y1, x2, y2 = b.unbind(-1)
    problems = [
        (~torch.isfinite(b).all(-1), "is not finite"),
        (((b < -COORD_TOL) | (b > 1 + COORD_TOL)).any(-1), "is outside [0, 1] (boxes are normalised xyxy)"),
        (x2 < x1, "has x2 < x1"),
        (y2 < y1, "has y2 < y1"),
    ]
    for bad, what in problems:
        if valid is not None:
            bad = bad & valid.bool()
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = f"[{', '.join(map(str, index[1:]))}]" if len(index) > 1 else ""
            raise ValueError(
                f"{head}.loss: targets[{key!r}] of {sample_name(index[0], ids)}{where} {what}: "
                f"{[round(v, 4) for v in b[index].tolist()]}"
            )


def validate_spans(spans: Tensor, key: str, index: int, ids: Sequence | None, head: str) -> None:
    """Normalised ``(start, end)`` spans ``[..., 2]`` of one sample: finite, in
    [0, 1], ``end >= start``."""
    if spans.shape[-1] != 2:
        raise ValueError(
            f"{head}.loss: targets[{key!r}] of {sample_name(index, ids)} must be [..., 2] (start, end) spans, "
            f"got {tuple(spans.shape)}"
        )
    s = spans.detach().float().reshape(-1, 2)
    checks = [
        (~torch.isfinite(s).all(-1), "is not finite"),
        (
            ((s < -COORD_TOL) | (s > 1 + COORD_TOL)).any(-1),
            "is outside [0, 1] (spans are normalised to the video length)",
        ),
        (s[:, 1] < s[:, 0], "has end < start"),
    ]
    for bad, what in checks:
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{head}.loss: targets[{key!r}] of {sample_name(index, ids)} {what}: "
                f"{[round(v, 4) for v in s[j].tolist()]}"
            )


def validate_masks(masks: Tensor, key: str, ids: Sequence | None, head: str) -> Tensor:
    """Binary masks ``[B, H, W]`` or ``[B, T, H, W]`` (bool or 0/1): returns
    them as float ``[B, T, H, W]``; a sample with no foreground pixel at all
    is an error (empty frames of a video are allowed)."""
    if masks.dim() not in (3, 4):
        raise ValueError(
            f"{head}.loss: targets[{key!r}] must be [B, H, W] or [B, T, H, W] masks, got {tuple(masks.shape)}"
        )
    m = masks if masks.dim() == 4 else masks[:, None]
    if m.dtype != torch.bool:
        mf = m.detach().float()
        if not torch.isfinite(mf).all() or ((mf != 0) & (mf != 1)).any():
            bad = int((~torch.isfinite(mf) | ((mf != 0) & (mf != 1))).flatten(1).any(1).nonzero()[0, 0])
            raise ValueError(
                f"{head}.loss: targets[{key!r}] of {sample_name(bad, ids)} is not binary (bool or 0/1 values)"
            )
    empty = ~(m.detach().flatten(1) != 0).any(1)
    if empty.any():
        i = int(empty.nonzero()[0, 0])
        raise ValueError(f"{head}.loss: targets[{key!r}] of {sample_name(i, ids)} is empty (no foreground pixel)")
    return m.float()


def batch_size_check(n: int, expected: int, key: str, head: str) -> None:
    if n != expected:
        raise ValueError(f"{head}.loss: targets[{key!r}] has {n} samples but the predictions have {expected}")


# --------------------------------------------------------------------------- #
# the contract
# --------------------------------------------------------------------------- #
class TaskHead(FreezeAwareModule, metaclass=abc.ABCMeta):
    """Base class of the task heads (see the module docstring for the contract).
    ``train()`` keeps sub-modules frozen with ``freeze_module`` in eval mode.

    Subclasses set ``task`` and implement ``forward``, ``loss`` and
    ``postprocess``; ``predict`` comes from here."""

    task: ClassVar[str] = ""
    requires_visual: ClassVar[bool] = False
    input_keys: ClassVar[tuple[str, ...]] = ()
    target_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_dim: int):
        super().__init__()
        if not isinstance(type(self).task, str) or not type(self).task:
            raise TypeError(f"{type(self).__name__} must set the class attribute `task` (a non-empty string)")
        self.in_dim = check_positive_int(in_dim, "in_dim")

    # -- the interface ------------------------------------------------------ #
    @abc.abstractmethod
    def forward(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        """Raw predictions of the batch."""

    @abc.abstractmethod
    def loss(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Tensor]:
        """Named weighted loss scalars and their total ``loss``."""

    @abc.abstractmethod
    def postprocess(self, predictions: Mapping[str, Any], **inputs: Any) -> dict[str, Tensor]:
        """Results from raw predictions."""

    @torch.no_grad()
    def predict(self, query: Tensor, visual: Mapping[str, Any] | None = None, **inputs: Any) -> dict[str, Tensor]:
        """``postprocess(forward(query, visual, **inputs))`` without gradients
        (put the head in ``eval()`` first for deterministic dropout)."""
        return self.postprocess(self(query, visual, **inputs), **inputs)

    # -- helpers for subclasses -------------------------------------------- #
    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def check_query(self, query: Tensor) -> Tensor:
        """``query [B, in_dim]`` cast to the head's dtype."""
        if not isinstance(query, Tensor):
            raise TypeError(f"{self.name}: query must be a tensor [B, {self.in_dim}], got {type(query).__name__}")
        if query.dim() != 2 or query.shape[1] != self.in_dim:
            raise ValueError(
                f"{self.name}: query must be [B, in_dim={self.in_dim}] (the LLM hidden state at the task token), "
                f"got {tuple(query.shape)}"
            )
        if not query.is_floating_point():
            raise TypeError(f"{self.name}: query must be floating point, got {query.dtype}")
        return query.to(self.param_dtype)

    def check_visual(self, visual: Mapping[str, Any] | None, visual_dim: int, batch_size: int) -> dict[str, Any]:
        """Validated ``visual``: ``features [B, T, N, C]`` (head dtype),
        ``grid_size (h, w)`` with ``h * w == N``, ``image_size (H, W)`` and
        ``frame_mask [B, T]`` bool (all True when not given)."""
        if visual is None:
            raise ValueError(
                f"{self.name} needs visual=dict(features=[B, T, N, C], grid_size=(h, w), image_size=(H, W))"
            )
        if not isinstance(visual, Mapping):
            raise TypeError(f"{self.name}: visual must be a dict, got {type(visual).__name__}")
        missing = [k for k in ("features", "grid_size", "image_size") if visual.get(k) is None]
        if missing:
            raise KeyError(
                f"{self.name}: visual has no {', '.join(map(repr, missing))} (keys: {', '.join(map(repr, visual))})"
            )
        feats = visual["features"]
        if not isinstance(feats, Tensor) or feats.dim() != 4:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"{self.name}: visual['features'] must be [B, T, N, C] (T=1 for images), got {shape}")
        b, t, n, c = feats.shape
        if c != visual_dim:
            raise ValueError(
                f"{self.name}: visual['features'] has C={c} channels "
                f"but the head was built with visual_dim={visual_dim}"
            )
        if b != batch_size:
            raise ValueError(f"{self.name}: visual['features'] has batch {b} but the query has {batch_size}")
        grid = tuple(int(v) for v in visual["grid_size"])
        if len(grid) != 2 or grid[0] * grid[1] != n:
            raise ValueError(
                f"{self.name}: visual['grid_size'] {tuple(visual['grid_size'])} "
                f"does not match the N={n} patches per frame"
            )
        size = tuple(int(v) for v in visual["image_size"])
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"{self.name}: visual['image_size'] must be (H, W), got {visual['image_size']!r}")
        frame_mask = visual.get("frame_mask")
        if frame_mask is None:
            frame_mask = torch.ones(b, t, dtype=torch.bool, device=feats.device)
        else:
            if not isinstance(frame_mask, Tensor) or tuple(frame_mask.shape) != (b, t):
                raise ValueError(f"{self.name}: visual['frame_mask'] must be a [B, T] = [{b}, {t}] bool tensor")
            frame_mask = frame_mask.bool().to(feats.device)
            empty = ~frame_mask.any(1)
            if empty.any():
                raise ValueError(
                    f"{self.name}: visual['frame_mask'] marks no real frame for sample {int(empty.nonzero()[0, 0])}"
                )
        return {"features": feats.to(self.param_dtype), "grid_size": grid, "image_size": size, "frame_mask": frame_mask}

    @staticmethod
    def total(*parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Merge named loss dicts and add their sum as ``loss``."""
        out: dict[str, Tensor] = {}
        for part in parts:
            for key, value in part.items():
                if key in out or key == "loss":
                    raise ValueError(f"two losses are named {key!r}; give one a different `name` in its config")
                out[key] = value
        if not out:
            raise ValueError("the head has every loss switched off")
        out["loss"] = sum(out.values())
        return out
