"""Reward and value models: a multimodal LLM with a scalar head.

:class:`RewardModel` is a :class:`~tpo.models.mllm.MultimodalLLM` (built from
the same config keys, so any composition of the registry works) whose last
hidden state goes through ``value_head``, a ``Linear(hidden, 1)``, at every
position. A sequence's *reward* is the head's output on one position: by
default its last labelled token (the end-of-turn token after the answer, in
the batches of :class:`~tpo.data.collate.PreferenceCollator`), else its last
attended token; a batch may name the positions itself (``score_positions``).
PPO's value model is the same class: its per-position outputs are the values.

LoRA or full fine-tuning: ``llm=dict(..., lora=dict(r=..., target_modules=[...]))``
freezes the LLM's weights and trains the adapters and the head. The LM head is
unused by a reward model and is frozen (``freeze_lm_head``) unless it is tied
to the input embeddings.

``init_from`` starts the backbone from a checkpoint of a plain MLLM (an SFT
run's ``model.safetensors``; the paper initialises the reward model from the
SFT model), mapping names across a LoRA wrapper; the head starts fresh.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from tpo.registry import MODELS, current_config_key

from .mllm import IGNORE_INDEX, MultimodalLLM

__all__ = ["RewardModel", "canonical_name", "load_backbone_weights", "score_positions"]

_PEFT_PREFIX = re.compile(r"\.base_model\.model\.")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def canonical_name(name: str) -> str:
    """A parameter's name without peft's wrappers: ``llm.model.base_model.model.
    model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``llm.model.model.
    layers.0.self_attn.q_proj.weight``."""
    return _BASE_LAYER.sub("", _PEFT_PREFIX.sub(".", name))


def _read_weights(checkpoint: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{current_config_key(key)}: {str(checkpoint)!r} has no model.safetensors; give a checkpoint folder "
            "written by `tpo train` (work_dir/checkpoints/step_<N>) or a .safetensors file"
        )
    return load_file(str(path))


def load_backbone_weights(model: nn.Module, checkpoint: str | os.PathLike, skip: Iterable[str] = (),
                          key: str = "init_from") -> list[str]:
    """Load the weights of ``checkpoint`` into ``model`` by canonical name
    (LoRA wrappers ignored both ways). Every non-LoRA tensor of the model whose
    name does not start with one of ``skip`` must be in the checkpoint, and
    every tensor of the checkpoint must be used (a LoRA checkpoint's adapters
    included when the model has the same adapters); else a KeyError names
    them. Returns the names of the model's tensors left as they were."""
    weights = {canonical_name(k): v for k, v in _read_weights(checkpoint, key).items()}
    skip = tuple(skip)
    state = model.state_dict()
    own = {canonical_name(k): k for k in state}
    missing = [c for c, k in own.items() if c not in weights and not k.startswith(skip) and ".lora_" not in k]
    unused = [c for c in weights if c not in own]
    if missing or unused:
        raise KeyError(
            f"{current_config_key(key)}: checkpoint {str(checkpoint)!r} does not fit the model: missing "
            f"{sorted(missing)[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{sorted(unused)[:6]}{' ...' if len(unused) > 6 else ''}; was it written for the same model config?"
        )
    loaded = {}
    for canon, tensor in weights.items():
        name = own[canon]
        if state[name].shape != tensor.shape:
            raise ValueError(
                f"{current_config_key(key)}: {name} has shape {list(state[name].shape)} in the model but "
                f"{list(tensor.shape)} in {str(checkpoint)!r}"
            )
        loaded[name] = tensor
    model.load_state_dict(loaded, strict=False)
    return sorted(k for k in state if k not in loaded)


def score_positions(batch: dict[str, Any], attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose value is the sequence's score:
    ``batch["score_positions"]`` when given, else the last labelled token,
    else the last attended token."""
    given = batch.get("score_positions")
    if given is not None:
        return torch.as_tensor(given, device=attention_mask.device).long()
    labels = batch.get("labels")
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    if labels is not None:
        labelled = labels != IGNORE_INDEX
        if not bool(labelled.any(1).all()):
            rows = (~labelled.any(1)).nonzero().flatten().tolist()
            ids = batch.get("ids")
            names = [ids[r] for r in rows] if ids is not None else rows
            raise ValueError(f"reward model: row(s) {names} have no labelled (answer) token to score")
        return torch.where(labelled, index, -1).amax(1)
    if not bool(attention_mask.bool().any(1).all()):
        raise ValueError("reward model: a row of the batch has no attended token")
    return torch.where(attention_mask.bool(), index, -1).amax(1)


@MODELS.register_module()
class RewardModel(MultimodalLLM):
    """A multimodal LLM with a scalar value head (see the module docstring).

    Args:
        vision_encoder, projector, llm, tokenizer, num_frames, freeze_projector,
            kernel_backend: as :class:`~tpo.models.mllm.MultimodalLLM`.
        init_from: a checkpoint (folder or ``.safetensors``) of an MLLM of the
            same composition whose weights start the backbone; ``None``: as built.
        head_init_std: std of the head's initial weights (``None``:
            ``1 / sqrt(hidden + 1)``); its bias starts at 0.
        freeze_lm_head: freeze the (untied) LM head, which a reward model never uses.

    ``forward(batch)`` returns ``{"rewards": [B], "values": [B, L] (float32),
    "hidden_states": [B, L, D], "score_positions": [B]}``.
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
        init_from: str | None = None,
        head_init_std: float | None = None,
        freeze_lm_head: bool = True,
    ):
        super().__init__(vision_encoder, projector, llm, tokenizer, num_frames=num_frames,
                         freeze_projector=freeze_projector, kernel_backend=kernel_backend)
        hidden = self.llm.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        std = head_init_std if head_init_std is not None else 1.0 / (hidden + 1) ** 0.5
        if not isinstance(std, (int, float)) or std < 0:
            raise ValueError(f"{current_config_key('head_init_std')}: must be a number >= 0, got {head_init_std!r}")
        nn.init.normal_(self.value_head.weight, std=float(std))
        nn.init.zeros_(self.value_head.bias)
        if init_from is not None:
            load_backbone_weights(self, init_from, skip=("value_head.",))
        head, embed = self.llm.get_output_embeddings(), self.llm.get_input_embeddings()
        if freeze_lm_head and head is not None and head.weight is not embed.weight:
            head.requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, batch.get("media"), batch.get("ids"))
        hidden = self.decode(embeds, attention_mask)
        # the head keeps its own dtype (float32 under a bf16/fp16 LLM), as the task heads do
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        positions = score_positions(batch, attention_mask)
        rewards = values.gather(1, positions[:, None]).squeeze(1)
        return {"rewards": rewards, "values": values, "hidden_states": hidden, "score_positions": positions}

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        """The rewards ``[B]`` of a batch, without gradients."""
        return self(batch)["rewards"]
