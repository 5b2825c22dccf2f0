"""``tpo.registry``: every registry of tpo and the ``build_*`` functions.

>>> from tpo.registry import build_model
>>> model = build_model("configs/mllm/timm_mlp_llama.py")
"""
from .build import (
    build_algorithm,
    build_child,
    build_dataset,
    build_from_cfg,
    build_judge,
    build_llm,
    build_loss,
    build_metric,
    build_model,
    build_projector,
    build_task_head,
    build_tokenizer,
    build_vision_encoder,
    config_key,
    current_config_key,
    load_config,
    registered_names,
)
from .registry import (
    ALGORITHMS,
    ALL_REGISTRIES,
    DATASETS,
    JUDGES,
    LLMS,
    LOSSES,
    METRICS,
    MODELS,
    PROJECTORS,
    SCOPE,
    TASK_HEADS,
    TOKENIZERS,
    VISION_ENCODERS,
)

__all__ = [name for name in dir() if not name.startswith("_")]
