"""Training algorithms: each a small step over a batch plus its config
(``Algorithm``). Importing this package registers them in
``tpo.registry.ALGORITHMS``."""
from . import base, dpo, sft, tpo  # noqa: F401
from . import ppo, reward_model  # noqa: F401
from .base import Algorithm, SetupContext, group_parameters
from .dpo import DPO
from .sft import SFT
from .tpo import TPO

__all__ = ["Algorithm", "DPO", "SFT", "SetupContext", "TPO", "group_parameters"]
