"""Score several task tokens after a sequence in one forward pass of a HF causal LM.

Task Preference Optimization reads each task head from the hidden state of a task token
appended after the prompt. With ``K`` task tokens one could run ``K`` forwards, each
appending one token; here the ``K`` tokens are appended together and kept isolated from
one another, so that one forward gives the same hidden states:

* the prefix tokens use ordinary causal attention (PyTorch SDPA, right padding masked);
* the ``K`` appended task tokens use :func:`tpo.kernels.task_token_attention` over their
  sample's prefix (per-sample prefix lengths for padded batches) and themselves, never
  over the other task tokens;
* every task token gets the position right after its sample's prefix.

The attention function is registered in transformers' ``AttentionInterface`` (and the SDPA
mask builder in ``AttentionMaskInterface``) under ``"tpo_task_tokens"``. A model loaded or
switched to that implementation behaves exactly as ``"sdpa"`` in ordinary forwards and
generation; the task-token path runs only when :func:`score_task_tokens` passes its
keyword arguments through the model's forward.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

TASK_TOKEN_ATTENTION = "tpo_task_tokens"

# Keyword arguments that travel from the model's forward to the attention function.
_NUM_TASK_KW = "tpo_num_task_tokens"
_LENGTHS_KW = "tpo_prefix_lengths"
_BACKEND_KW = "tpo_task_backend"

__all__ = [
    "TASK_TOKEN_ATTENTION",
    "register_task_token_attention",
    "score_task_tokens",
    "task_token_attention_enabled",
    "task_token_attention_forward",
]


def _prefix_mask(prefix_lengths: torch.Tensor, length: int, device: torch.device) -> torch.Tensor | None:
    """``[B, 1, L, L]`` boolean mask of causal attention over each sample's valid prefix, or
    ``None`` when no sample is padded (SDPA's ``is_causal`` then does the same). Padded query
    rows also see themselves so that no row is empty (their outputs are never read)."""
    if bool((prefix_lengths == length).all()):
        return None
    pos = torch.arange(length, device=device)
    causal = pos[None, :] <= pos[:, None]  # [L(query), L(key)]
    valid_key = pos[None, :] < prefix_lengths.to(device)[:, None]  # [B, L]
    mask = (causal[None] & valid_key[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
    return mask[:, None]


def task_token_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"tpo_task_tokens"`` attention function, called by a transformers attention layer
    as ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
    ``query [B, Hq, L + K, D]`` and ``key, value [B, Hkv, L + K, D]``; returns
    ``(out [B, L + K, Hq, D], None)``.

    Without the ``tpo_num_task_tokens`` keyword it is transformers' SDPA attention. With it
    (and ``tpo_prefix_lengths [B]``), the first ``L`` positions are the right-padded prefix and
    the last ``K`` positions are task tokens, each attending to its sample's prefix and itself.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    num_task = kwargs.pop(_NUM_TASK_KW, None)
    prefix_lengths = kwargs.pop(_LENGTHS_KW, None)
    backend = kwargs.pop(_BACKEND_KW, "auto")
    if num_task is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    # The submodule, not the package's lazy export: importing the submodule rebinds the
    # package attribute of the same name to the module.
    from tpo.kernels.task_token_attention import task_token_attention

    layer = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if dropout:
        raise ValueError(
            f"{TASK_TOKEN_ATTENTION}: {layer} asks for attention dropout {dropout}; task-token attention has no "
            "dropout. Call model.eval() or set config.attention_dropout = 0.0."
        )
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(f"{TASK_TOKEN_ATTENTION}: {layer} got a KV cache; score task tokens with use_cache=False.")
    total = query.shape[2]
    if key.shape[2] != total:
        raise ValueError(
            f"{TASK_TOKEN_ATTENTION}: {layer} has {total} queries but {key.shape[2]} keys; task tokens are scored "
            "in a single forward over prefix + task tokens, without a cache."
        )
    if not 0 < num_task <= total:
        raise ValueError(f"{TASK_TOKEN_ATTENTION}: {num_task} task tokens do not fit a sequence of {total} positions.")
    length = total - num_task
    if prefix_lengths is None:
        prefix_lengths = torch.full((query.shape[0],), length, dtype=torch.int32, device=query.device)
    window = kwargs.get("sliding_window")
    if window is not None and length + 1 > window:
        raise ValueError(
            f"{TASK_TOKEN_ATTENTION}: {layer} uses a sliding window of {window} tokens but the prefix has up to "
            f"{length} tokens; task tokens attend to the whole prefix. Use prefixes shorter than the window."
        )

    task_out = task_token_attention(
        query[:, :, length:],
        key[:, :, :length],
        value[:, :, :length],
        k_self=key[:, :, length:],
        v_self=value[:, :, length:],
        kv_lengths=prefix_lengths,
        scale=scaling,
        backend=backend,
    ).transpose(1, 2)  # [B, K, Hq, D]
    if length == 0:
        return task_out.contiguous(), None
    # The prefix: transformers' own SDPA path (it picks GQA support or repeat_kv by the mask).
    kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    prefix_out, _ = sdpa_attention_forward(
        module,
        query[:, :, :length],
        key[:, :, :length],
        value[:, :, :length],
        _prefix_mask(prefix_lengths, length, query.device),
        dropout=0.0,
        scaling=scaling,
        is_causal=True,
        **kwargs,
    )  # [B, L, Hq, D]
    return torch.cat([prefix_out, task_out], dim=1), None


def register_task_token_attention() -> str:
    """Register ``"tpo_task_tokens"`` with transformers (idempotent); returns the name, to pass
    as ``attn_implementation=`` to ``from_pretrained``/``from_config`` or to
    ``model.set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TASK_TOKEN_ATTENTION, task_token_attention_forward)
    # Ordinary forwards under this implementation need SDPA's padding/causal masks.
    AttentionMaskInterface.register(TASK_TOKEN_ATTENTION, sdpa_mask)
    return TASK_TOKEN_ATTENTION


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@contextmanager
def task_token_attention_enabled(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to ``"tpo_task_tokens"`` attention
    for the duration of the block, restoring its previous implementation afterwards."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(
            f"score_task_tokens: model must be a transformers PreTrainedModel with a config, got {type(model).__name__}."
        )
    register_task_token_attention()
    previous = config._attn_implementation
    if previous != TASK_TOKEN_ATTENTION:
        _set_implementation(model, TASK_TOKEN_ATTENTION)
    try:
        yield model
    finally:
        if previous != TASK_TOKEN_ATTENTION:
            _set_implementation(model, previous)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under tpo's ``HFCausalLM`` wrapper and/or a PEFT wrapper."""
    if not hasattr(model, "set_attn_implementation") and hasattr(model, "causal_lm"):
        model = model.causal_lm  # tpo.models.llm.HFCausalLM
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # peft.PeftModel (the LoRA layers stay in place)
    return model


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body that returns ``last_hidden_state`` (``model.model`` of a
    ``...ForCausalLM``, the model itself when it already is the body)."""
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return getattr(model, "base_model", model)


def _prefix_lengths(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((batch,), length, dtype=torch.int32, device=device)
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"score_task_tokens: attention_mask must have shape [B, L] = [{batch}, {length}] like the prefix, "
            f"got {list(attention_mask.shape)}."
        )
    mask = attention_mask.to(device) != 0
    lengths = mask.sum(-1)
    right_padded = torch.arange(length, device=device)[None, :] < lengths[:, None]
    if not bool((right_padded == mask).all()):
        bad = int((right_padded != mask).any(-1).nonzero()[0])
        raise ValueError(
            f"score_task_tokens: attention_mask row {bad} is not right-padded (ones, then zeros); task tokens go "
            "right after each prefix. Pad on the right (tokenizer.padding_side = 'right')."
        )
    return lengths.to(torch.int32)


def score_task_tokens(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    task_embeds: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Final hidden states ``[B, K, H]`` of ``K`` task tokens appended after each prefix, in
    one forward pass, each task token isolated from the others.

    Args:
        model: a transformers causal LM (``...ForCausalLM`` or its base model, optionally under
            a PEFT wrapper, or tpo's ``HFCausalLM``) whose attention layers dispatch through
            transformers' attention interface (Llama, Qwen2, Mistral, ...).
        input_ids: ``[B, L]`` prefix token ids (or give ``inputs_embeds``).
        attention_mask: ``[B, L]`` right-padded mask of the prefix (``None``: no padding).
        task_embeds: ``[B, K, H]`` input embeddings of the task tokens.
        inputs_embeds: ``[B, L, H]`` prefix embeddings instead of ``input_ids`` (e.g. with
            visual tokens spliced in).
        backend: ``task_token_attention`` backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Task token ``k`` of sample ``b`` sees exactly what it would see as the only token appended
    after the ``attention_mask[b].sum()`` valid prefix tokens, at that position.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("score_task_tokens: give exactly one of input_ids [B, L] and inputs_embeds [B, L, H].")
    if task_embeds is None:
        raise ValueError("score_task_tokens: task_embeds [B, K, H] (the task tokens' input embeddings) is required.")
    model = _causal_lm(model)
    embedding = model.get_input_embeddings()
    if inputs_embeds is None:
        if input_ids.dim() != 2:
            raise ValueError(f"score_task_tokens: input_ids must be [B, L], got shape {list(input_ids.shape)}.")
        inputs_embeds = embedding(input_ids)
    if inputs_embeds.dim() != 3:
        raise ValueError(f"score_task_tokens: inputs_embeds must be [B, L, H], got shape {list(inputs_embeds.shape)}.")
    batch, length, hidden = inputs_embeds.shape
    if task_embeds.dim() != 3 or task_embeds.shape[0] != batch or task_embeds.shape[2] != hidden:
        raise ValueError(
            f"score_task_tokens: task_embeds must be [B, K, H] = [{batch}, K, {hidden}], got {list(task_embeds.shape)}."
        )
    num_task = task_embeds.shape[1]
    if num_task < 1:
        raise ValueError("score_task_tokens: task_embeds holds no task token (K == 0).")
    device = inputs_embeds.device
    lengths = _prefix_lengths(attention_mask, batch, length, device)

    embeds = torch.cat([inputs_embeds, task_embeds.to(device=device, dtype=inputs_embeds.dtype)], dim=1)
    prefix_pos = torch.arange(length, device=device)[None, :].expand(batch, length)
    task_pos = lengths.long()[:, None].expand(batch, num_task)
    position_ids = torch.cat([prefix_pos, task_pos], dim=1)
    # An all-ones 2D mask lets the SDPA mask builder skip building an [L+K, L+K] mask; the
    # attention function builds the masks it needs from the prefix lengths.
    full_mask = torch.ones(batch, length + num_task, dtype=torch.long, device=device)

    decoder = _decoder(model)
    with task_token_attention_enabled(model):
        outputs = decoder(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            use_cache=False,
            **{_NUM_TASK_KW: num_task, _LENGTHS_KW: lengths, _BACKEND_KW: backend},
        )
    return outputs.last_hidden_state[:, length:]


# Importing this module makes ``attn_implementation="tpo_task_tokens"`` available.
register_task_token_attention()
