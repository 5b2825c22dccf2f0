"""The multimodal LLM: vision encoder -> projector -> visual tokens spliced
into the LLM's input embeddings at the media placeholders -> LLM."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from tpo.kernels import fused_linear_logprob
from tpo.registry import LLMS, MODELS, PROJECTORS, TOKENIZERS, VISION_ENCODERS, build_child, current_config_key

from .processor import MultimodalProcessor
from .tokenizer import MEDIA_TOKENS
from .utils import FreezeAwareModule, freeze_module

IGNORE_INDEX = -100


@MODELS.register_module()
class MultimodalLLM(FreezeAwareModule):
    """A LLaVA-style MLLM composed from registered parts.

    Args:
        vision_encoder, projector, llm, tokenizer: config dicts of the parts
            (the projector's ``in_dim``/``out_dim``, the LLM's vocabulary size
            and special token ids are filled in from the others).
        num_frames: frames sampled uniformly from a video.
        freeze_projector: keep the projector's weights fixed.
        kernel_backend: backend of the fused log-prob kernel (``auto``: Triton
            on CUDA, chunked torch otherwise; ``triton``; ``torch``), or
            ``eager``: materialised logits and ``F.cross_entropy`` (for comparison).

    ``forward(batch)`` takes ``input_ids``, ``attention_mask``, optional
    ``labels`` and ``media`` (one ``[T, 3, H, W]`` preprocessed tensor or
    ``None`` per sample, or a batched ``[B, 3, H, W]``/``[B, T, 3, H, W]``
    tensor), and optional ``ids`` (sample ids, for error messages). Each media
    item must match exactly ``T * tokens_per_frame`` placeholder tokens.
    """

    def __init__(
        self,
        vision_encoder: dict,
        projector: dict,
        llm: dict,
        tokenizer: dict,
        num_frames: int = 8,
        freeze_projector: bool = False,
        kernel_backend: str = "auto",
    ):
        super().__init__()
        if kernel_backend not in ("auto", "triton", "torch", "eager"):
            raise ValueError(
                f"{current_config_key('kernel_backend')}: use 'auto', 'triton', 'torch' or 'eager', got {kernel_backend!r}"
            )
        self.kernel_backend = kernel_backend
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{current_config_key('num_frames')}: must be a positive int, got {num_frames!r}")
        self.tokenizer = build_child(tokenizer, TOKENIZERS, "tokenizer")
        extra = [t for t in self.extra_special_tokens() if t not in self.tokenizer.get_vocab()]
        if extra:
            self.tokenizer.add_tokens(extra, special_tokens=True)
        self.vision_encoder = build_child(vision_encoder, VISION_ENCODERS, "vision_encoder")
        special = {
            "pad_token_id": self.tokenizer.pad_token_id,
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        self.llm = build_child(
            llm, LLMS, "llm", default_args=dict(vocab_size=len(self.tokenizer), special_token_ids=special)
        )
        if self.llm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            self.llm.resize_token_embeddings(len(self.tokenizer))
        self.projector = build_child(
            projector,
            PROJECTORS,
            "projector",
            default_args=dict(in_dim=self.vision_encoder.out_dim, out_dim=self.llm.hidden_size),
        )
        if freeze_projector:
            freeze_module(self.projector)
        self.media_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS)))
        self.processor = MultimodalProcessor(
            self.tokenizer,
            self.vision_encoder.preprocess,
            tokens_per_frame=self.tokens_per_frame,
            num_frames=num_frames,
        )

    # ------------------------------------------------------------------ media
    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens one image or video frame becomes in the LLM."""
        encoder = self.vision_encoder
        return self.projector.num_output_tokens(encoder.num_tokens, encoder.grid_size)

    def _media_list(self, media, batch_size: int) -> list[torch.Tensor | None]:
        if media is None:
            return [None] * batch_size
        if torch.is_tensor(media):
            if media.dim() == 4:  # [B, 3, H, W] images
                media = media.unsqueeze(1)
            if media.dim() != 5:
                raise ValueError(f"batch['media'] must be [B, 3, H, W] or [B, T, 3, H, W], got {list(media.shape)}")
            media = list(media)
        if len(media) != batch_size:
            raise ValueError(f"batch['media'] has {len(media)} items for {batch_size} samples; give one (or None) each")
        return [None if m is None else (m.unsqueeze(0) if m.dim() == 3 else m) for m in media]

    def extra_special_tokens(self) -> list[str]:
        """Tokens a subclass adds to the tokenizer before the LLM is built
        (task tokens); a pretrained LLM's new rows start at the mean embedding."""
        return []

    def encode_media(self, media: Sequence[torch.Tensor | None], return_features: bool = False):
        """Per sample ``[T * tokens_per_frame, hidden]`` visual embeddings (or
        ``None``); all frames of the batch go through the encoder at once.
        With ``return_features``, also the encoder's features ``[T, N, C]``
        per sample (what the task heads read)."""
        present = [m for m in media if m is not None]
        if not present:
            empty = [None] * len(media)
            return (empty, list(empty)) if return_features else empty
        frames = torch.cat(present, dim=0)
        param = next(self.projector.parameters())
        features = self.vision_encoder(frames.to(param.device))  # [sum T, 1, N, C]
        tokens = self.projector(features.to(param.dtype), grid_size=self.vision_encoder.grid_size)
        tokens = tokens.flatten(1, 2)  # [sum T, tokens_per_frame, D]
        out, feats, start = [], [], 0
        for m in media:
            if m is None:
                out.append(None)
                feats.append(None)
                continue
            out.append(tokens[start : start + m.shape[0]].flatten(0, 1))
            feats.append(features[start : start + m.shape[0], 0])
            start += m.shape[0]
        return (out, feats) if return_features else out

    def embed_inputs(
        self, input_ids: torch.Tensor, media, ids: Sequence | None = None, return_features: bool = False
    ):
        """Token embeddings with the visual tokens spliced in at the media
        placeholders. A count mismatch is an error naming the sample. With
        ``return_features``, also the per-sample encoder features."""
        media = self._media_list(media, input_ids.shape[0])
        is_media = torch.isin(input_ids, self.media_token_ids.to(input_ids.device))
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_media, 0))
        visual, features = self.encode_media(media, return_features=True)
        for b, feats in enumerate(visual):
            have = int(is_media[b].sum())
            want = 0 if feats is None else feats.shape[0]
            if have != want:
                name = ids[b] if ids is not None else b
                frames = 0 if media[b] is None else media[b].shape[0]
                raise ValueError(
                    f"sample {name!r}: the text holds {have} visual placeholder tokens but its media gives {want} "
                    f"({frames} frame(s) x {self.tokens_per_frame} tokens per frame). Expand each <image> to "
                    f"{self.tokens_per_frame} tokens and each <video> to frames x {self.tokens_per_frame} "
                    "(MultimodalProcessor.expand_placeholders does this)"
                )
        if any(v is not None for v in visual):
            stacked = torch.cat([v for v in visual if v is not None]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_media.unsqueeze(-1), stacked)
        return (embeds, features) if return_features else embeds

    def decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states ``[B, L, D]`` for input embeddings
        (positions counted from each row's first real token)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state

    # --------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The LM loss (mean over answer tokens) and the last hidden states.

        Returns ``{"loss": total, "losses": {"lm": ...}, "hidden_states":
        [B, L, D], "num_tokens": answer tokens}``.
        """
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, batch.get("media"), batch.get("ids"))
        hidden = self.decode(embeds, attention_mask)
        out: dict[str, Any] = {"hidden_states": hidden, "losses": {}}
        labels = batch.get("labels")
        if labels is not None:
            lm, count = self.lm_loss(hidden, self.mask_media_labels(input_ids, labels))
            out["losses"]["lm"] = lm
            out["num_tokens"] = count
            out["loss"] = lm
        return out

    def mask_media_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the media placeholder positions ignored."""
        return labels.masked_fill(torch.isin(input_ids, self.media_token_ids.to(input_ids.device)), IGNORE_INDEX)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over labelled tokens, and their count,
        through the fused log-prob kernel: the ``[tokens, vocab]`` logits are
        never materialised and unlabelled positions cost nothing."""
        head = self.llm.get_output_embeddings()
        shifted = labels[:, 1:]
        if self.kernel_backend == "eager":
            logits = head(hidden[:, :-1]).float()
            count = (shifted != IGNORE_INDEX).sum()
            total = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            return total / count.clamp(min=1), count
        logps = fused_linear_logprob(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]),
            head.weight,
            shifted.reshape(-1),
            bias=head.bias,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            backend=self.kernel_backend,
        )
        return -logps.logps / logps.counts.clamp(min=1), logps.counts

    # -------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``[B, <= max_new_tokens]`` for left-padded prompts,
        greedy or sampled, with the LLM's KV cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, media, kwargs.pop("ids", None))
        sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
        kwargs.setdefault("use_cache", True)
        kwargs.setdefault("suppress_tokens", self.input_only_token_ids())
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
            **kwargs,
        )

    def input_only_token_ids(self) -> list[int]:
        """Tokens that only stand for inputs (media placeholders here): a
        generated one would mean nothing, so generation never emits them."""
        return self.media_token_ids.tolist()

    @torch.no_grad()
    def chat(self, prompt: str, image=None, video=None, **generate_kwargs: Any) -> str:
        """Answer one prompt about an image (``[3, H, W]`` uint8/float or PIL)
        or a video (``[T, 3, H, W]``), or about nothing."""
        if image is not None and video is not None:
            raise ValueError("give an image or a video, not both")
        kind = "image" if image is not None else "video" if video is not None else None
        media = None if kind is None else self.processor.prepare_media(image if kind == "image" else video, kind)
        inputs = self.processor([self.processor.chat_prompt(prompt, kind)], [media])
        device = next(self.parameters()).device
        new_tokens = self.generate(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            media=[None if media is None else media.to(device)],
            **generate_kwargs,
        )
        return self.tokenizer.decode(new_tokens[0], skip_special_tokens=True)
