"""Encoding a box into the LLM's input space (tracking and region prompts)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tpo.registry import TASK_HEADS

from .base import COORD_TOL, MLP, check_positive_int


@TASK_HEADS.register_module()
class BoxEncoder(nn.Module):
    """A small MLP from normalised ``xyxy`` boxes ``[..., 4]`` to embeddings
    ``[..., in_dim]`` (``in_dim`` = the LLM hidden size when the embedding is
    spliced into the LLM's input, as a tracking or region prompt; the track
    head also uses one inside, at its own width).

    The box's corners, centre and size go through Fourier features at
    ``num_frequencies`` octaves, then ``num_layers`` linear layers; the output
    is layer-normalised and scaled by a learnable ``output_scale`` (initial
    ``init_scale``), so it starts at the magnitude of token embeddings.

    Registered in ``TASK_HEADS`` for building from configs; it is a prompt
    encoder, not a :class:`TaskHead`."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_frequencies: int = 8,
        init_scale: float = 1.0,
    ):
        super().__init__()
        self.in_dim = check_positive_int(in_dim, "in_dim")
        check_positive_int(hidden_dim, "hidden_dim")
        self.num_frequencies = check_positive_int(num_frequencies, "num_frequencies")
        self.register_buffer(
            "frequencies", (2.0 ** torch.arange(num_frequencies, dtype=torch.float32)) * math.pi, persistent=False
        )
        feature_dim = 8 * (2 * num_frequencies + 1)
        self.mlp = MLP(feature_dim, hidden_dim, in_dim, num_layers)
        self.norm = nn.LayerNorm(in_dim)
        self.output_scale = nn.Parameter(torch.tensor(float(init_scale)))

    def features(self, boxes: Tensor) -> Tensor:
        x1, y1, x2, y2 = boxes.unbind(-1)
        coords = torch.stack((x1, y1, x2, y2, 0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), dim=-1)
        angles = coords[..., None] * self.frequencies
        fourier = torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return torch.cat((coords, fourier), dim=-1)

    def forward(self, boxes: Tensor) -> Tensor:
        if not isinstance(boxes, Tensor) or boxes.dim() == 0 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"BoxEncoder: boxes must be [..., 4] normalised xyxy, got {shape}")
        b = boxes.detach().float()
        if not torch.isfinite(b).all() or (b < -COORD_TOL).any() or (b > 1 + COORD_TOL).any():
            raise ValueError("BoxEncoder: boxes must be finite and normalised to [0, 1]")
        if (b[..., 2] < b[..., 0]).any() or (b[..., 3] < b[..., 1]).any():
            i = int((b[..., 2] < b[..., 0]).logical_or(b[..., 3] < b[..., 1]).flatten().nonzero()[0, 0])
            raise ValueError(f"BoxEncoder: box {i} has x2 < x1 or y2 < y1: {b.reshape(-1, 4)[i].tolist()}")
        dtype = self.output_scale.dtype
        return self.output_scale * self.norm(self.mlp(self.features(boxes.to(dtype))))
