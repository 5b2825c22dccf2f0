"""Context for the judge: a detailed description of the sample's media.

VLM-RLAIF's context-aware reward modelling gives the judge a detailed
description of the video besides the video itself. A *context provider* turns
a dataset item into that text (or ``None``):

* :class:`SampleDescription`: the item's own ``description`` (the synthetic
  benchmark writes a correct one, sentence by sentence);
* :class:`CaptionContext`: a captioning MLLM describes the whole video (or image);
* :class:`ClipCaptionContext`: the paper's recipe: the video is cut into
  segments, each segment is captioned, and the captions, each with its time
  span, make the description.

Each is registered in ``tpo.registry.JUDGES`` (they are parts of the
AI-feedback stage) and built from ``context=dict(type=...)``. A captioner is a
model config (dict or file path), a built model, or ``"policy"`` (the policy
describes the videos itself, as in the paper); captions are cached per media
content, so the samples of one video share one description.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch import nn

from tpo.data.synth import fmt_time
from tpo.registry import JUDGES, build_model, current_config_key

from .prompts import CAPTION_PROMPT, CLIP_CAPTION_PROMPT

__all__ = ["CaptionContext", "ClipCaptionContext", "ContextProvider", "SampleDescription", "resolve_model"]


def resolve_model(spec, policy: nn.Module | None, key: str, checkpoint: str | None = None,
                  cfg_options: Mapping[str, Any] | None = None) -> nn.Module:
    """A model from a config dict or file (its ``model`` key, with dotted
    ``cfg_options``), a built ``nn.Module``, or ``"policy"`` (the ``policy``
    given by the caller); ``checkpoint`` (a ``tpo train`` checkpoint folder or
    ``.safetensors``) loads its weights."""
    if isinstance(spec, str) and spec == "policy":
        if policy is None:
            raise ValueError(f"{current_config_key(key)}: 'policy' means the model being sampled, which only "
                             "`tpo rlaif generate` (or a caller passing policy=...) provides")
        if checkpoint is not None:
            raise ValueError(f"{current_config_key('checkpoint')}: the policy comes with its own weights; "
                             "drop the checkpoint")
        return policy
    if isinstance(spec, nn.Module):
        model = spec
    elif isinstance(spec, (str, Mapping)) or hasattr(spec, "to_dict"):
        model = build_model(spec, cfg_options=cfg_options)
    else:
        raise TypeError(f"{current_config_key(key)}: give a model config (dict or file), a model or 'policy', "
                        f"got {type(spec).__name__}")
    if checkpoint is not None:
        from tpo.models.utils import load_model_weights

        load_model_weights(model, checkpoint)
    model.eval()
    return model


def media_key(item: Mapping) -> str | None:
    """A key for the item's media content (samples of one video share it)."""
    media = item.get("media")
    if media is None:
        return None
    data = media.detach().cpu().contiguous().numpy().tobytes()
    return f"{item.get('media_type')}:{tuple(media.shape)}:{hashlib.sha1(data).hexdigest()}"


class ContextProvider:
    """Base: ``provider(item) -> str | None``; ``name`` goes into the records."""

    name = "context"

    def __call__(self, item: Mapping) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


@JUDGES.register_module()
class SampleDescription(ContextProvider):
    """The item's own ``description`` (a list of sentences, joined by spaces).

    Args:
        missing: ``"error"`` (an item without a description is an error naming
            it) or ``"none"`` (the judge then works without context for it).
    """

    name = "sample_description"

    def __init__(self, missing: str = "error"):
        if missing not in ("error", "none"):
            raise ValueError(f"{current_config_key('missing')}: use 'error' or 'none', got {missing!r}")
        self.missing = missing

    def __call__(self, item: Mapping) -> str | None:
        desc = item.get("description")
        if not desc:
            if self.missing == "error":
                raise ValueError(
                    f"sample {item.get('id')!r}: has no 'description' for the judge's context; add one, use "
                    "context=dict(type='CaptionContext', ...) to caption the media, or "
                    "SampleDescription(missing='none')"
                )
            return None
        return desc if isinstance(desc, str) else " ".join(s.strip() for s in desc)


class _Captioner(ContextProvider):
    def __init__(self, model, checkpoint: str | None, prompt: str, max_new_tokens: int, policy: nn.Module | None):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{current_config_key('prompt')}: must be a non-empty string, got {prompt!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{current_config_key('max_new_tokens')}: must be a positive int, got {max_new_tokens!r}")
        self.model = resolve_model(model, policy, "model", checkpoint)
        if not hasattr(self.model, "chat"):
            raise TypeError(f"{current_config_key('model')}: a captioner must be a multimodal LLM with chat(), got "
                            f"{type(self.model).__name__}")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self._cache: dict[str, str] = {}

    def caption(self, media: torch.Tensor, kind: str) -> str:
        was = self.model.training
        self.model.eval()
        try:
            kwargs = {"image": media} if kind == "image" else {"video": media}
            return self.model.chat(self.prompt, max_new_tokens=self.max_new_tokens, **kwargs).strip()
        finally:
            self.model.train(was)

    def __call__(self, item: Mapping) -> str | None:
        key = media_key(item)
        if key is None:
            return None
        if key not in self._cache:
            self._cache[key] = self.describe(item)
        return self._cache[key]

    def describe(self, item: Mapping) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@JUDGES.register_module()
class CaptionContext(_Captioner):
    """A captioning MLLM describes the whole image or video (greedy).

    Args:
        model: the captioner: a model config (dict or file), or ``"policy"``.
        checkpoint: its weights (a ``tpo train`` checkpoint), if not the config's.
        prompt: what it is asked.
        max_new_tokens: the description's length limit.
        policy: given by ``tpo rlaif generate`` (not a config key).
    """

    name = "caption"

    def __init__(self, model="policy", checkpoint: str | None = None, prompt: str = CAPTION_PROMPT,
                 max_new_tokens: int = 64, policy: nn.Module | None = None):
        super().__init__(model, checkpoint, prompt, max_new_tokens, policy)

    def describe(self, item: Mapping) -> str:
        return self.caption(item["media"], item.get("media_type") or "video")


@JUDGES.register_module()
class ClipCaptionContext(_Captioner):
    """Clip-wise captions (the paper's recipe): the video's frames are cut
    into ``num_segments`` consecutive segments, each is captioned, and the
    description is ``"From 0.00 to 0.25: <caption> From 0.25 to 0.50: ..."``
    (times normalised to the video's length). An image gets one caption.

    Args:
        model, checkpoint, max_new_tokens, policy: as :class:`CaptionContext`.
        num_segments: segments per video (at most its frame count).
        prompt: what the captioner is asked about each segment.
    """

    name = "clip_captions"

    def __init__(self, model="policy", checkpoint: str | None = None, num_segments: int = 4,
                 prompt: str = CLIP_CAPTION_PROMPT, max_new_tokens: int = 32, policy: nn.Module | None = None):
        if not isinstance(num_segments, int) or num_segments < 1:
            raise ValueError(f"{current_config_key('num_segments')}: must be a positive int, got {num_segments!r}")
        super().__init__(model, checkpoint, prompt, max_new_tokens, policy)
        self.num_segments = num_segments

    def describe(self, item: Mapping) -> str:
        media, kind = item["media"], item.get("media_type") or "video"
        if kind == "image":
            return self.caption(media, "image")
        total = int(media.shape[0])
        n = min(self.num_segments, total)
        bounds = [round(i * total / n) for i in range(n + 1)]
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            text = self.caption(media[a:b], "video")
            # times as the synthetic benchmark writes them: inside the frames they bound
            parts.append(f"From {fmt_time(a, total)} to {fmt_time(b - 1, total, end=True)}: {text}")
        return " ".join(parts)
