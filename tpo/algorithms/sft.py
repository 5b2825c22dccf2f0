"""Supervised fine-tuning: the conversation (next-token) loss on the answer
tokens, through the fused log-prob kernel underneath (``logprob="fused"``,
the model's own loss) or through materialised logits and
``F.cross_entropy`` (``logprob="eager"``, for comparison)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpo.registry import ALGORITHMS, current_config_key

from .base import Algorithm, count_label_tokens

LOGPROB_MODES = ("fused", "eager")


@ALGORITHMS.register_module()
class SFT(Algorithm):
    """Conversation loss: mean negative log-likelihood of the answer tokens.

    Args:
        model: the MLLM (its ``forward(batch)`` returns ``loss`` and named ``losses``).
        logprob: ``"fused"`` (the model's loss: the fused linear log-prob kernel,
            no ``[tokens, vocab]`` logits) or ``"eager"`` (logits, ``F.cross_entropy``).
        max_new_tokens: answer length when evaluation generates (QA metrics;
            ``qa/truncated`` reports the share of answers that ran out of it).

    Metrics: ``loss``, ``losses/<name>`` for each named loss of the model
    (``losses/lm``, and a task model's ``losses/region.l1``, ...), ``num_tokens``.
    """

    collator = "ConversationCollator"

    def __init__(self, model: nn.Module, logprob: str = "fused", max_new_tokens: int = 32):
        super().__init__(model)
        if logprob not in LOGPROB_MODES:
            raise ValueError(f"{current_config_key('logprob')}: use one of {LOGPROB_MODES}, got {logprob!r}")
        self.logprob = logprob
        if logprob == "eager":  # the model's LM loss through materialised logits
            model.kernel_backend = "eager"
        self.max_new_tokens = int(max_new_tokens)

    def num_items(self, batch: dict[str, Any]) -> int:
        return count_label_tokens(self.model, batch)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.model(batch)
        loss = out["loss"]
        losses = dict(out.get("losses", {}))
        metrics = {f"losses/{name}": value.detach() for name, value in losses.items()}
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], predict: bool = False) -> dict[str, Any]:
        result = super().evaluate(batch)
        if predict and batch.get("items") is not None:
            result["samples"] = self.predict_answers(batch["items"])
        return result

    @torch.no_grad()
    def predict_answers(self, items) -> list[dict[str, Any]]:
        """Greedy answers to the QA items of a batch (``meta.task == "qa"``), as
        data samples for ``QAAccuracy``: prediction, answer, answer_type, options,
        question_type, id."""
        model, proc = self.model, self.model.processor
        qa = [it for it in items if (it.get("meta") or {}).get("task") == "qa" and it.get("conversations")]
        # Under sharded weights (FSDP) generate is a collective (synced_gpus): a process whose batch holds no QA
        # item must still take part, or the others wait for it forever; it answers a text-only placeholder.
        synced = getattr(model.llm.model, "_is_fsdp_managed_module", False)
        if not qa and not synced:
            return []
        prompts, media = [], []
        for it in qa:
            question = it["conversations"][0]["value"]
            kind = it.get("media_type")
            prompts.append(proc.chat_prompt(question, kind))
            media.append(None if it.get("media") is None else proc.prepare_media(it["media"], kind))
        if not qa and items:  # the placeholder: the batch's first item, its answer discarded
            first = items[0]
            kind = first.get("media_type") if first.get("media") is not None else None
            question = first["conversations"][0]["value"] if first.get("conversations") else "?"
            prompts = [proc.chat_prompt(question, kind)]
            media = [None if kind is None else proc.prepare_media(first["media"], kind)]
        elif not qa:
            return []
        inputs = proc(prompts, media, padding_side="left")
        device = next(model.parameters()).device
        new = model.generate(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                             media=[None if m is None else m.to(device) for m in media],
                             max_new_tokens=self.max_new_tokens)
        samples = []
        eos = model.tokenizer.eos_token_id
        for it, tokens in zip(qa, new):
            meta = it["meta"]
            samples.append({
                "id": it.get("id"),
                "prediction": model.tokenizer.decode(tokens, skip_special_tokens=True),
                # the budget ran out before the end-of-sequence token: the answer may be cut short
                "truncated": len(tokens) >= self.max_new_tokens and eos not in tokens.tolist(),
                "answer": meta.get("answer", meta.get("answer_text", "")),
                "answer_type": meta.get("answer_type", "open"),
                "options": meta.get("options"),
                "question_type": meta.get("question_type"),
            })
        return samples
