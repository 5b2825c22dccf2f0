"""Training algorithms: each a small step over a batch plus its config
(``Algorithm``). Importing this package registers them in
``tpo.registry.ALGORITHMS``."""
from . import base, dpo, sft  # noqa: F401
from .base import Algorithm, SetupContext, group_parameters
from .dpo import DPO
from .sft import SFT

__all__ = ["Algorithm", "DPO", "SFT", "SetupContext", "group_parameters"]
