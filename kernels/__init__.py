"""``tpo.kernels``: fused Triton kernels, one op per file, each with a torch
reference, an ``autograd.Function``, a functional API and a ``backend=``
switch (``auto``, ``triton``, ``torch``).

Names are imported lazily so that ``import tpo.kernels`` stays cheap.
"""
import importlib

_EXPORTS = {
    "fused_linear_logprob": "fused_linear_logprob",
    "FusedLinearPreferenceLoss": "fused_linear_preference",
    "fused_linear_preference_loss": "fused_linear_preference",
    "task_token_attention": "task_token_attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)
