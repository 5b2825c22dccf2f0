"""Prompts for sampling: dataset items -> left-padded generation prompts.

:class:`PromptCollator` renders each item's conversation up to its last human
turn with the tokenizer's chat template and the generation prompt (the same
rendering :class:`~tpo.data.collate.PreferenceCollator` gives a pair's
prompt, so a reward model trained on preference pairs scores PPO's rollouts
in the format it was trained on), expands the media placeholder to the visual
token count and left-pads the batch for ``generate``. The item's reference
answer (``meta.answer``/``answer_type``/``options``, as the synthetic
benchmark writes them) rides along for QA metrics; it never enters the prompt.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from tpo.data.schema import IMAGE_TOKEN, VIDEO_TOKEN

_PLACEHOLDER = re.compile(f"{re.escape(IMAGE_TOKEN)}\n?|{re.escape(VIDEO_TOKEN)}\n?")
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _sid(item: Mapping) -> Any:
    return item.get("id", "<no id>") if isinstance(item, Mapping) else "<not a dict>"


def prompt_messages(item: Mapping, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The item's conversation up to and including its last human turn, as
    chat-template messages; a ValueError naming the sample when it has none."""
    sid = _sid(item)
    conv = item.get("conversations") if isinstance(item, Mapping) else None
    if not isinstance(conv, (list, tuple)) or not conv:
        raise ValueError(f"sample {sid!r}: field 'conversations' must be a non-empty list of turns, got {conv!r}")
    messages = []
    for i, turn in enumerate(conv):
        role = turn.get("from", turn.get("role")) if isinstance(turn, Mapping) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, Mapping) else None
        if role not in ROLES or not isinstance(value, str):
            raise ValueError(f"sample {sid!r}: conversations[{i}] must be {{'from': human|gpt, 'value': str}}, "
                             f"got {turn!r}")
        messages.append({"role": ROLES[role], "content": value})
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"sample {sid!r}: field 'conversations' has no human turn to answer")
    messages = messages[: users[-1] + 1]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def question_text(item: Mapping) -> str:
    """The last human turn without its media placeholder."""
    return _PLACEHOLDER.sub("", prompt_messages(item)[-1]["content"]).strip()


def reference_of(item: Mapping) -> dict[str, Any] | None:
    """``{"answer", "answer_type", "options", "question_type"}`` from the
    item's ``meta`` when it holds a reference answer, else ``None``."""
    meta = item.get("meta") or {}
    if "answer" not in meta:
        return None
    return {"answer": meta["answer"], "answer_type": meta.get("answer_type", "open"),
            "options": meta.get("options"), "question_type": meta.get("question_type")}


class PromptCollator:
    """Dataset items -> ``generate`` inputs (see the module docstring).

    Args:
        processor: the policy's :class:`~tpo.models.processor.MultimodalProcessor`.
        max_prompt_length: the longest prompt in tokens (media tokens
            included); a longer one is an error naming the sample (prompts are
            never cut: a cut prompt would ask another question). ``None``: no limit.
        system_prompt: a system turn put first in conversations without one.

    Returns ``input_ids``/``attention_mask`` (long ``[B, P]``, left-padded),
    ``media`` (per item ``[T, 3, h, w]`` or ``None``), ``media_type``, ``ids``,
    ``questions`` (the last human turn's text), ``references`` (see
    :func:`reference_of`), ``descriptions`` (the item's ``description`` or
    ``None``) and ``num_prompts``.
    """

    def __init__(self, processor, max_prompt_length: int | None = None, system_prompt: str | None = None):
        for attr in ("tokenizer", "prepare_media", "expand_placeholders"):
            if not hasattr(processor, attr):
                raise TypeError(f"processor: needs a MultimodalProcessor (model.processor); "
                                f"{type(processor).__name__} has no {attr!r}")
        if max_prompt_length is not None and (isinstance(max_prompt_length, bool)
                                              or not isinstance(max_prompt_length, int) or max_prompt_length < 1):
            raise ValueError(f"max_prompt_length: must be a positive integer or None, got {max_prompt_length!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt: must be a string or None, got {type(system_prompt).__name__}")
        tok = processor.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"processor.tokenizer: {type(tok).__name__} has no chat template")
        if tok.pad_token_id is None:
            raise ValueError(f"processor.tokenizer: {type(tok).__name__} has no pad token; set tokenizer.pad_token")
        self.processor = processor
        self.tokenizer = tok
        self.max_prompt_length = max_prompt_length
        self.system_prompt = system_prompt

    def render(self, item: Mapping) -> tuple[str, torch.Tensor | None]:
        """The templated prompt text (placeholders expanded) and the
        preprocessed media of one item."""
        sid = _sid(item)
        messages = prompt_messages(item, self.system_prompt)
        kind, media = item.get("media_type"), item.get("media")
        placeholders = sum(len(_PLACEHOLDER.findall(m["content"])) for m in messages)
        if media is None:
            pixels = None
            if placeholders:
                raise ValueError(f"sample {sid!r}: the conversation has a media placeholder but the sample no media")
        else:
            if kind not in ("image", "video"):
                raise ValueError(f"sample {sid!r}: field 'media_type' must be 'image' or 'video', got {kind!r}")
            if placeholders != 1:
                raise ValueError(f"sample {sid!r}: {placeholders} media placeholders ({IMAGE_TOKEN}/{VIDEO_TOKEN}) "
                                 "for one media item; put exactly one in a human turn")
            pixels = self.processor.prepare_media(media, kind)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = self.processor.expand_placeholders(text, [] if pixels is None else [int(pixels.shape[0])],
                                                  sample_id=sid)
        return text, pixels

    def __call__(self, items: Sequence[Mapping]) -> dict[str, Any]:
        if not items:
            raise ValueError("the prompt collator got an empty list of items")
        texts, media = [], []
        for item in items:
            if not isinstance(item, Mapping) or "id" not in item:
                raise TypeError(f"a collator takes SampleDataset items (dicts with an 'id'), got {type(item).__name__}")
            text, pixels = self.render(item)
            texts.append(text)
            media.append(pixels)
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        lengths = enc.attention_mask.sum(1).tolist()
        if self.max_prompt_length is not None:
            long = [(item["id"], n) for item, n in zip(items, lengths) if n > self.max_prompt_length]
            if long:
                raise ValueError(
                    f"sample {long[0][0]!r}: its prompt takes {long[0][1]} tokens (media included), more than "
                    f"max_prompt_length={self.max_prompt_length}; raise it or sample fewer frames"
                )
        return {
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "media": media,
            "media_type": [item.get("media_type") for item in items],
            "ids": [item["id"] for item in items],
            "questions": [question_text(item) for item in items],
            "references": [reference_of(item) for item in items],
            "descriptions": [item.get("description") for item in items],
            "num_prompts": len(items),
        }
