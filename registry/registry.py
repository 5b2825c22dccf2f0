"""Every registry of tpo, declared in one place.

Each one is a child of mmengine's root registry of the same kind, with scope
``tpo`` and lazy ``locations``: the modules that register into a registry are
imported on its first ``get``/``build``, so ``from tpo.registry import
build_model`` needs nothing imported beforehand.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

SCOPE = "tpo"

# The composed models (MLLMs, reward models, value models).
MODELS = Registry("model", parent=MMENGINE_MODELS, scope=SCOPE, locations=["tpo.models"])
# Image and video encoders: timm, open_clip, transformers.
VISION_ENCODERS = Registry("vision encoder", scope=SCOPE, locations=["tpo.models.vision"])
# Vision-to-LLM projectors.
PROJECTORS = Registry("projector", scope=SCOPE, locations=["tpo.models.projectors"])
# LLM backbones.
LLMS = Registry("llm", scope=SCOPE, locations=["tpo.models.llm"])
# Tokenizers (local folders, or the offline tiny tokenizer).
TOKENIZERS = Registry("tokenizer", scope=SCOPE, locations=["tpo.models.tokenizer"])
# Task heads read the LLM's hidden state at a task token.
TASK_HEADS = Registry("task head", scope=SCOPE, locations=["tpo.models.heads"])
# Preference losses and task losses.
LOSSES = Registry("loss", scope=SCOPE, locations=["tpo.losses"])
# Datasets and sample readers.
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope=SCOPE, locations=["tpo.data"])
# Evaluation metrics.
METRICS = Registry("metric", parent=MMENGINE_METRICS, scope=SCOPE, locations=["tpo.evaluation"])
# AI-feedback judges.
JUDGES = Registry("judge", scope=SCOPE, locations=["tpo.rlaif"])
# Training algorithms (sft, tpo, dpo, reward model, ppo).
ALGORITHMS = Registry("algorithm", scope=SCOPE, locations=["tpo.algorithms"])

ALL_REGISTRIES = {
    "models": MODELS,
    "vision_encoders": VISION_ENCODERS,
    "projectors": PROJECTORS,
    "llms": LLMS,
    "tokenizers": TOKENIZERS,
    "task_heads": TASK_HEADS,
    "losses": LOSSES,
    "datasets": DATASETS,
    "metrics": METRICS,
    "judges": JUDGES,
    "algorithms": ALGORITHMS,
}
