"""``tpo.kernels``: fused Triton kernels, one op per file, each with a torch
reference, an ``autograd.Function``, a functional API and a ``backend=``
switch (``auto``, ``triton``, ``torch``).

The functions are imported here, after their same-named modules, so that
``from tpo.kernels import fused_linear_logprob`` is always the function.
"""
from .fused_linear_logprob import LogProbs, fused_linear_logprob
from .fused_linear_preference import FusedLinearPreferenceLoss, fused_linear_preference_loss
from .task_token_attention import task_token_attention

__all__ = [
    "FusedLinearPreferenceLoss",
    "LogProbs",
    "fused_linear_logprob",
    "fused_linear_preference_loss",
    "task_token_attention",
]
