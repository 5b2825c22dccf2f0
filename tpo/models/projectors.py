"""Vision-to-LLM projectors: ``[B, T, N, C_vision] -> [B, T, N', C_llm]``.

The MLLM passes ``in_dim`` (the encoder's ``out_dim``) and ``out_dim`` (the
LLM's hidden size) when a config leaves them out. ``num_output_tokens(n,
grid_size)`` says how many tokens a frame of ``n`` tokens becomes, which is
how many placeholder tokens the text must hold per frame.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tpo.registry import PROJECTORS, current_config_key


class Projector(nn.Module):
    """Base class: maps per-frame visual tokens into the LLM's embedding space."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        for key, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{current_config_key(key)}: must be a positive int, got {value!r}")
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_output_tokens(self, num_tokens: int, grid_size: tuple[int, int] | None = None) -> int:
        return num_tokens

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects visual features [B, T, N, {self.in_dim}], got {list(x.shape)}; "
                "check that the projector's in_dim matches the vision encoder's out_dim"
            )


@PROJECTORS.register_module()
class LinearProjector(Projector):
    """One linear layer (LLaVA-1)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check(x)
        return self.proj(x)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


@PROJECTORS.register_module()
class MLPProjector(Projector):
    """Two linear layers with a GELU between them (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__(in_dim, out_dim)
        self.mlp = _mlp(in_dim, hidden_dim or out_dim, out_dim)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check(x)
        return self.mlp(x)


@PROJECTORS.register_module()
class PoolingProjector(Projector):
    """Token-reducing projector for video: each frame's patch grid is average
    pooled to ``tokens_per_frame`` tokens (a square ``s x s`` grid, or the
    given ``(h, w)``), then projected by a GELU MLP.

    Needs the encoder's patch grid (``grid_size``), so the encoder must give
    patch tokens without CLS (``with_cls=False``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        tokens_per_frame: int | tuple[int, int] = 4,
        hidden_dim: int | None = None,
    ):
        super().__init__(in_dim, out_dim)
        if isinstance(tokens_per_frame, int):
            side = math.isqrt(tokens_per_frame)
            if side * side != tokens_per_frame:
                raise ValueError(
                    f"{current_config_key('tokens_per_frame')}: {tokens_per_frame} is not a square number; "
                    "give a square (1, 4, 9, 16, ...) or an (h, w) pair"
                )
            self.pooled_grid = (side, side)
        else:
            self.pooled_grid = tuple(int(s) for s in tokens_per_frame)
        self.mlp = _mlp(in_dim, hidden_dim or out_dim, out_dim)

    def num_output_tokens(self, num_tokens: int, grid_size: tuple[int, int] | None = None) -> int:
        return self.pooled_grid[0] * self.pooled_grid[1]

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        self._check(x)
        b, t, n, c = x.shape
        if grid_size is None or grid_size[0] * grid_size[1] != n:
            raise ValueError(
                f"PoolingProjector needs the patch grid of the {n} tokens per frame, got grid_size={grid_size}; "
                "use a vision encoder that outputs patch tokens only (with_cls=False)"
            )
        h, w = grid_size
        if self.pooled_grid[0] > h or self.pooled_grid[1] > w:
            raise ValueError(f"PoolingProjector cannot pool a {h}x{w} patch grid up to {self.pooled_grid}")
        grid = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, self.pooled_grid)
        tokens = pooled.flatten(2).transpose(1, 2).reshape(b, t, -1, c)
        return self.mlp(tokens)
