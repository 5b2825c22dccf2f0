"""score_task_tokens: K task tokens scored in one forward equal K separate forwards, each
appending a single task token after the sample's (unpadded) prefix, on tiny random Llama,
Qwen2 and Mistral with grouped-query attention and right-padded variable-length batches."""
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tpo.models.task_attention import (
    TASK_TOKEN_ATTENTION,
    score_task_tokens,
    task_token_attention_enabled,
)

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per key/value head
    max_position_embeddings=256,
)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(head_dim=12)),  # head dim not a power of two
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict()),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
}
LENGTHS = [11, 4, 7, 1]  # right-padded to 11
NUM_TASK = 4


def tiny_model(name, **overrides):
    config_cls, model_cls, extra = MODELS[name]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    return model_cls(config).eval()


def padded_batch(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # pad id 0 after each prefix
    task = torch.randn(len(lengths), NUM_TASK, COMMON["hidden_size"], generator=g)
    return ids, mask, task


def separate_forwards(model, ids, lengths, task):
    """Reference: for each sample and each task token, one ordinary forward (the model's own
    SDPA attention) over the unpadded prefix plus that single task token."""
    embed = model.get_input_embeddings()
    rows = []
    for b, n in enumerate(lengths):
        prefix = embed(ids[b : b + 1, :n])
        per_task = []
        for k in range(task.shape[1]):
            inputs = torch.cat([prefix, task[b : b + 1, k : k + 1]], dim=1)
            per_task.append(model.model(inputs_embeds=inputs).last_hidden_state[0, -1])
        rows.append(torch.stack(per_task))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_pass_equals_separate_forwards(name, backend):
    model = tiny_model(name)
    ids, mask, task = padded_batch()
    with torch.no_grad():
        got = score_task_tokens(model, ids, mask, task, backend=backend)
        want = separate_forwards(model, ids, LENGTHS, task)
    assert got.shape == (len(LENGTHS), NUM_TASK, COMMON["hidden_size"])
    err = (got - want).abs().max().item()
    assert err < 2e-5, f"{name}/{backend}: max |one pass - separate forwards| = {err:.3e}"
    assert model.config._attn_implementation == "sdpa", "the previous attention implementation is restored"


def test_plain_causal_append_differs():
    """Control: appending the K task tokens with ordinary causal attention lets later task
    tokens see earlier ones, which the comparison above must be able to tell apart."""
    model = tiny_model("llama")
    ids, mask, task = padded_batch(lengths=[9, 9])
    with torch.no_grad():
        isolated = score_task_tokens(model, ids, mask, task)
        embeds = torch.cat([model.get_input_embeddings()(ids), task], dim=1)
        causal = model.model(inputs_embeds=embeds).last_hidden_state[:, 9:]
    assert (isolated[:, 0] - causal[:, 0]).abs().max() < 2e-5  # the first task token sees the same
    assert (isolated[:, 1:] - causal[:, 1:]).abs().amax(dim=(0, 2)).min() > 1e-3  # the others do not


def test_gradients_match_separate_forwards():
    """Training through the Triton backward: parameter and task-embedding gradients of one
    pass equal those of the separate forwards."""
    model = tiny_model("qwen2")
    ids, mask, task = padded_batch(lengths=[6, 3, 5])
    weights = torch.randn(3, NUM_TASK, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]

    task_a = task.clone().requires_grad_()
    loss = (score_task_tokens(model, ids, mask, task_a, backend="triton") * weights).sum()
    grads = torch.autograd.grad(loss, params + [task_a], allow_unused=True)

    task_b = task.clone().requires_grad_()
    ref_loss = (separate_forwards(model, ids, [6, 3, 5], task_b) * weights).sum()
    ref_grads = torch.autograd.grad(ref_loss, params + [task_b], allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or got.abs().max() == 0
            continue
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_inputs_embeds_and_unpadded_batch():
    model = tiny_model("mistral")
    ids, _, task = padded_batch(lengths=[8, 8])
    with torch.no_grad():
        from_ids = score_task_tokens(model, ids, None, task)
        from_embeds = score_task_tokens(model, inputs_embeds=model.get_input_embeddings()(ids), task_embeds=task)
        want = separate_forwards(model, ids, [8, 8], task)
    assert (from_ids - want).abs().max() < 2e-5
    assert (from_embeds - from_ids).abs().max() == 0


def test_registered_implementation_is_sdpa_for_ordinary_forwards():
    """A model switched to "tpo_task_tokens" gives SDPA's outputs in a padded ordinary forward."""
    model = tiny_model("llama")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with task_token_attention_enabled(model):
            assert model.config._attn_implementation == TASK_TOKEN_ATTENTION
            got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (got - want)[valid].abs().max() < 1e-6
    assert model.config._attn_implementation == "sdpa"


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    ids, mask, task = padded_batch()
    left = mask.flip(-1)
    with pytest.raises(ValueError, match=r"row 1 is not right-padded.*padding_side = 'right'"):
        score_task_tokens(model, ids, left, task)
    with pytest.raises(ValueError, match=r"task_embeds must be \[B, K, H\] = \[4, K, 32\]"):
        score_task_tokens(model, ids, mask, task[:, :, :16])
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        score_task_tokens(model, ids, mask, task, inputs_embeds=torch.zeros(4, 11, 32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, L\] = \[4, 11\]"):
        score_task_tokens(model, ids, mask[:, :5], task)
    with pytest.raises(ValueError, match="task_embeds"):
        score_task_tokens(model, ids, mask)
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"dropout 0.1.*model.eval\(\)"):
        score_task_tokens(model, ids, mask, task)
    assert model.config._attn_implementation == "sdpa", "restored after an error too"


def test_sliding_window_shorter_than_prefix_is_an_error():
    model = tiny_model("mistral", sliding_window=6)
    ids, mask, task = padded_batch()
    with pytest.raises(ValueError, match=r"sliding window of 6 tokens but the prefix has up to 11"):
        score_task_tokens(model, ids, mask, task)
