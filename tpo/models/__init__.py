"""Model components. Importing this package registers them all."""
from . import llm, mllm, projectors, tokenizer, tpo_model, vision  # noqa: F401
from . import reward  # noqa: F401
from .mllm import MultimodalLLM
from .processor import MultimodalProcessor

__all__ = ["MultimodalLLM", "MultimodalProcessor"]
