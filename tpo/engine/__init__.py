"""The training engine on accelerate: the loop, checkpoints and resume,
metrics (JSONL, TensorBoard, progress bar), reports, and the ``tpo train``
command (:func:`train_main`)."""
from .checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from .config import validate as validate_config
from .main import train_main
from .trainer import NonFiniteLossError, Trainer, train

__all__ = [
    "NonFiniteLossError", "Trainer", "latest_checkpoint", "list_checkpoints", "save_checkpoint", "train",
    "train_main", "validate_config",
]
