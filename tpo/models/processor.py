"""Turns text and media into model inputs: chat template, media placeholders
expanded to the visual token count, pixels preprocessed by the encoder."""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from .tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


class MultimodalProcessor:
    """Text and media -> ``input_ids`` and ``media`` for a :class:`MultimodalLLM`.

    Args:
        tokenizer: a transformers tokenizer with ``<image>``/``<video>`` tokens.
        preprocess: the vision encoder's ``preprocess`` (resize, normalise).
        tokens_per_frame: visual tokens one frame becomes after the projector.
        num_frames: frames sampled uniformly from a longer video.
    """

    def __init__(self, tokenizer, preprocess: Callable, tokens_per_frame: int, num_frames: int):
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.tokens_per_frame = tokens_per_frame
        self.num_frames = num_frames
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    def sample_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniformly sample ``num_frames`` of ``frames [T, 3, H, W]`` (all of
        them when there are fewer), as the data loaders do. Returns the frames
        and their normalised timestamps."""
        from tpo.data.video import frame_timestamps, uniform_indices

        total = frames.shape[0]
        index = uniform_indices(total, self.num_frames)
        return frames[torch.from_numpy(index)], torch.from_numpy(frame_timestamps(index, total))

    def prepare_media(self, media, kind: str) -> torch.Tensor:
        """An image (``[3, H, W]``, PIL) -> ``[1, 3, h, w]``; a video
        (``[T, 3, H, W]`` or a list of ``[3, H, W]``) -> ``[num_frames, 3, h, w]``,
        preprocessed for the encoder."""
        if kind == "image":
            pixels = self.preprocess(media)
            return pixels.reshape(-1, *pixels.shape[-3:])[:1]
        if isinstance(media, (list, tuple)):
            media = torch.stack([torch.as_tensor(frame) for frame in media])
        if not torch.is_tensor(media) or media.dim() != 4 or media.shape[1] != 3:
            shape = list(media.shape) if torch.is_tensor(media) else type(media).__name__
            raise ValueError(f"a video must be frames [T, 3, H, W], got {shape}")
        frames, _ = self.sample_frames(media)
        return self.preprocess(frames)

    def expand_placeholders(self, text: str, frames_per_media: Sequence[int], sample_id=None) -> str:
        """Each ``<image>``/``<video>`` placeholder, in order, becomes as many
        of its tokens as its media item gives visual tokens."""
        found = _PLACEHOLDER.findall(text)
        if len(found) != len(frames_per_media):
            where = f"sample {sample_id!r}: " if sample_id is not None else ""
            raise ValueError(
                f"{where}the text has {len(found)} media placeholder(s) ({IMAGE_TOKEN}/{VIDEO_TOKEN}) "
                f"but {len(frames_per_media)} media item(s) were given; put one placeholder per image or video"
            )
        counts = iter(frames_per_media)
        return _PLACEHOLDER.sub(lambda m: m.group(0) * (next(counts) * self.tokens_per_frame), text)

    def chat_prompt(self, prompt: str, kind: str | None) -> str:
        """The chat-templated prompt for one user turn, the media placeholder
        first (as LLaVA), ready for the assistant's answer."""
        if kind is not None and IMAGE_TOKEN not in prompt and VIDEO_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN if kind == 'image' else VIDEO_TOKEN}\n{prompt}"
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompts: Sequence[str], media: Sequence[torch.Tensor | None], padding_side: str = "left"):
        """Batch of already templated ``prompts`` with one preprocessed media
        item (``[T, 3, h, w]``) or ``None`` each -> model inputs."""
        texts = [
            self.expand_placeholders(p, [] if m is None else [m.shape[0]], sample_id=i)
            for i, (p, m) in enumerate(zip(prompts, media))
        ]
        encoded = self.tokenizer(
            texts, add_special_tokens=False, padding=True, padding_side=padding_side, return_tensors="pt"
        )
        return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "media": list(media)}
