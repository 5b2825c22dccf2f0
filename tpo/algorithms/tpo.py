"""TPO (Task Preference Optimization): one algorithm per training stage.

The paper trains in three stages, each starting from the last:

1. *task assignment*: the LLM learns to emit a task's begin token when a
   request needs that task (losses ``lm`` + ``assign``);
2. *task-head training*: the heads, the task embeddings and the box encoder
   learn from dense labels, the LLM frozen or LoRA (losses ``<task>.*``);
3. *multi-task co-training*: everything the config names is trained on task
   data mixed with conversation data (all losses).

A stage is a ``tpo train`` run of this algorithm with its own ``losses``,
``trainable`` parameters, data mix and learning rates; ``stages=[...]`` in a
config runs them in order (:mod:`tpo.engine.stages`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

from tpo.registry import ALGORITHMS, current_config_key

from .sft import SFT


@ALGORITHMS.register_module()
class TPO(SFT):
    """A TPO training stage on a :class:`~tpo.models.tpo_model.TPOModel`.

    Args:
        model: the TPO model (the collator gets its ``tasks``).
        losses: regular expressions of the loss names this stage optimises
            (``["lm", "assign"]``, ``[r"^(region|temporal|mask|track)\\."]``);
            ``None`` optimises all. Every loss is still logged.
        trainable: regular expressions of the parameter names this stage
            trains (``[r"^heads\\.", r"^task_embeddings\\.", r"^box_encoder\\."]``);
            the others are frozen. ``None`` keeps the model's own settings.
        max_new_tokens: answer length when evaluation generates.
    """

    collator = "ConversationCollator"

    def __init__(
        self,
        model: nn.Module,
        losses: Sequence[str] | None = None,
        trainable: Sequence[str] | None = None,
        max_new_tokens: int = 32,
    ):
        super().__init__(model, logprob="fused", max_new_tokens=max_new_tokens)
        if not hasattr(model, "task_specs"):
            raise TypeError(
                f"{current_config_key()}: TPO trains a TPOModel (model.type='TPOModel' with tasks=...), "
                f"got {type(model).__name__}; use algorithm=dict(type='SFT') for a plain MLLM"
            )
        self.loss_patterns = self._compile(losses, "losses")
        if trainable is not None:
            patterns = self._compile(trainable, "trainable")
            matched = 0
            for name, param in model.named_parameters():
                keep = any(p.search(name) for p in patterns)
                param.requires_grad_(keep)
                matched += keep
            if not matched:
                raise ValueError(
                    f"{current_config_key('trainable')}: no parameter name matches {list(trainable)}; "
                    "names look like heads.region..., task_embeddings.region, llm.model..., projector..."
                )

    @staticmethod
    def _compile(patterns: Sequence[str] | None, key: str):
        if patterns is None:
            return None
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"{current_config_key(key)}: must be a list of regular expressions, got {patterns!r}")
        try:
            return [re.compile(p) for p in patterns]
        except re.error as err:
            raise ValueError(f"{current_config_key(key)}: bad regular expression ({err})") from None

    def num_items(self, batch: dict[str, Any]) -> int:
        """Rows: the task losses are means over samples, ``lm`` over tokens."""
        return int(batch["input_ids"].shape[0])

    def build_collator(self, **cfg: Any):
        cfg.setdefault("tasks", self.model.tasks)
        return super().build_collator(**cfg)

    def loss_weight(self, name: str) -> float:
        """The weight of one named loss in the model's total."""
        if name == "assign":
            return self.model.assign_weight
        task = name.split(".", 1)[0]
        return self.model.task_specs[task]["weight"] if task in self.model.task_specs else 1.0

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.model(batch)
        losses = out.get("losses", {})
        if self.loss_patterns is None:
            loss = out["loss"]
        else:
            chosen = [n for n in losses if any(p.search(n) for p in self.loss_patterns)]
            # a batch may lack some tasks; the zero keeps the graph connected for DDP
            loss = sum((self.loss_weight(n) * losses[n] for n in chosen), out["hidden_states"].sum() * 0.0)
        metrics = {f"losses/{name}": value.detach() for name, value in losses.items()}
        return {"loss": loss, **metrics}
