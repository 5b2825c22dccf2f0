"""Losses: the DPO family of preference losses and the dense task losses.
Importing this package registers them all in ``tpo.registry.LOSSES``."""
from . import preference, task  # noqa: F401
from . import reward  # noqa: F401
