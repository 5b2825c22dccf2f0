"""LLM backbones: any transformers causal LM, from a config dict (tiny,
random init) or a local pretrained folder, with LoRA through peft."""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tpo.registry import LLMS, current_config_key

from .utils import FreezeAwareModule, as_dtype, freeze_module, hf_config_for, resolve_pretrained

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")


def resolve_attn_implementation(name: str) -> str:
    """``auto`` is flash-attn 2 when it is installed and CUDA is there, else
    SDPA; asking for ``flash_attention_2`` without flash-attn is an error."""
    if name not in ATTN_IMPLEMENTATIONS and not name.startswith("tpo_"):
        raise ValueError(
            f"{current_config_key('attn_implementation')}: unknown attention implementation {name!r}; "
            f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ImportError(
            f"{current_config_key('attn_implementation')}: 'flash_attention_2' needs the flash-attn package, "
            "which is not installed. Install it with `pip install 'tpo[flash-attn]'` (CUDA only), "
            "or use attn_implementation='sdpa'."
        )
    return name


@LLMS.register_module()
class HFCausalLM(FreezeAwareModule):
    """A transformers causal LM.

    Args:
        config: a transformers config as a dict with ``model_type`` (``llama``,
            ``qwen2``, ``mistral``, ...) for random initialisation.
        pretrained: a local ``save_pretrained`` folder (nothing is downloaded);
            ``config`` entries then override the saved config.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2``
            (needs flash-attn) or ``auto``.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16``.
        lora: peft LoRA settings (``r``, ``lora_alpha``, ``lora_dropout``,
            ``target_modules``, ...); the base weights are then frozen.
        freeze: freeze every weight of the LLM.
        gradient_checkpointing: recompute activations in the backward pass.
        vocab_size: the tokenizer's size (the MLLM passes it); a config without
            ``vocab_size`` takes it, a smaller embedding table is resized.
        special_token_ids: ``pad/bos/eos_token_id`` the MLLM passes from the
            tokenizer, written into the model and generation configs.
    """

    def __init__(
        self,
        config: dict | None = None,
        pretrained: str | None = None,
        attn_implementation: str = "sdpa",
        torch_dtype: str | None = None,
        lora: dict | None = None,
        freeze: bool = False,
        gradient_checkpointing: bool = False,
        vocab_size: int | None = None,
        special_token_ids: dict | None = None,
    ):
        super().__init__()
        if config is None and pretrained is None:
            raise ValueError(
                f"{current_config_key()}: give `config` (a dict with model_type) or `pretrained` (a local folder)"
            )
        attn = resolve_attn_implementation(attn_implementation)
        dtype = as_dtype(torch_dtype)
        overrides = dict(config or {})
        special = {k: v for k, v in (special_token_ids or {}).items() if v is not None}
        path = resolve_pretrained(pretrained)
        if path is not None:
            overrides.pop("model_type", None)
            hf_config = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
            for key, value in special.items():
                setattr(hf_config, key, value)
            model = AutoModelForCausalLM.from_pretrained(
                path, config=hf_config, attn_implementation=attn, dtype=dtype, local_files_only=True
            )
        else:
            if "model_type" not in overrides:
                raise KeyError(
                    f"{current_config_key('config')}: needs 'model_type' (e.g. 'llama', 'qwen2', 'mistral')"
                )
            if vocab_size is not None:
                overrides.setdefault("vocab_size", vocab_size)
            overrides.update(special)
            hf_config = hf_config_for(overrides.pop("model_type"), overrides, current_config_key("config"))
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=dtype)
        for key, value in special.items():
            setattr(model.generation_config, key, value)
        if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
            resize_embeddings_to_mean(model, vocab_size)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if freeze:
            freeze_module(model)
        self.uses_lora = lora is not None
        if lora is not None:
            model = _apply_lora(model, lora)
        self.model = model

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model itself (under any peft wrapper)."""
        return self.model.get_base_model() if self.uses_lora else self.model

    @property
    def decoder(self) -> nn.Module:
        """The transformer body, giving hidden states without the LM head."""
        return self.causal_lm.get_decoder()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.causal_lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.causal_lm.get_output_embeddings()

    def resize_token_embeddings(self, num_tokens: int) -> None:
        resize_embeddings_to_mean(self.causal_lm, num_tokens)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Hidden states of the transformer body (no logits are computed)."""
        return self.decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)


def resize_embeddings_to_mean(model: nn.Module, num_tokens: int) -> None:
    """Grow the input (and an untied output) embedding to ``num_tokens`` rows,
    the new rows set to the mean of the old ones."""
    old = model.get_input_embeddings().num_embeddings
    if num_tokens <= old:
        return
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    with torch.no_grad():
        for table in {id(t): t for t in (model.get_input_embeddings(), model.get_output_embeddings()) if t}.values():
            table.weight[old:] = table.weight[:old].mean(dim=0, keepdim=True)
            bias = getattr(table, "bias", None)
            if bias is not None:
                bias[old:] = bias[:old].mean()


def _apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    settings = dict(lora)
    settings.setdefault("task_type", "CAUSAL_LM")
    try:
        lora_config = LoraConfig(**settings)
    except TypeError as err:
        raise TypeError(f"{current_config_key('lora')}: {err}") from None
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:
        raise ValueError(f"{current_config_key('lora.target_modules')}: {err}") from None
