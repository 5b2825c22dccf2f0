import pytest
import torch

from tpo.registry import build_llm

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=97)


def _embeds(n=7):
    return torch.randn(2, n, 32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hidden_states_without_logits(model_type):
    llm = build_llm(dict(type="HFCausalLM", config=dict(TINY, model_type=model_type)))
    out = llm(inputs_embeds=_embeds(), attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert out.last_hidden_state.shape == (2, 7, 32)
    assert llm.hidden_size == 32 and llm.get_output_embeddings().weight.shape == (97, 32)


def test_pretrained_round_trip_and_vocab_growth(tmp_path):
    llm = build_llm(dict(type="HFCausalLM", config=TINY))
    llm.causal_lm.save_pretrained(tmp_path)
    loaded = build_llm(dict(type="HFCausalLM", pretrained=str(tmp_path)))
    x = _embeds()
    torch.testing.assert_close(loaded(inputs_embeds=x).last_hidden_state, llm(inputs_embeds=x).last_hidden_state,
                               rtol=0, atol=0)
    grown = build_llm(dict(type="HFCausalLM", pretrained=str(tmp_path), vocab_size=100))
    table = grown.get_input_embeddings().weight
    assert table.shape[0] == 100
    torch.testing.assert_close(table[97:], table[:97].mean(0, keepdim=True).expand(3, -1))


def test_lora_trains_only_adapters():
    llm = build_llm(dict(type="HFCausalLM", config=TINY,
                         lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])))
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    llm(inputs_embeds=_embeds()).last_hidden_state.sum().backward()
    assert all(p.grad is not None for n, p in llm.named_parameters() if p.requires_grad)
    assert llm.get_input_embeddings().num_embeddings == 97


def test_freeze_and_gradient_checkpointing():
    frozen = build_llm(dict(type="HFCausalLM", config=TINY, freeze=True))
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.model.training
    ckpt = build_llm(dict(type="HFCausalLM", config=TINY, gradient_checkpointing=True))
    ckpt.train()
    assert ckpt.causal_lm.is_gradient_checkpointing
    x = _embeds().requires_grad_()
    ckpt(inputs_embeds=x).last_hidden_state.sum().backward()
    assert x.grad is not None


def test_attention_implementations():
    eager = build_llm(dict(type="HFCausalLM", config=TINY, attn_implementation="eager"))
    sdpa = build_llm(dict(type="HFCausalLM", config=TINY, attn_implementation="sdpa"))
    sdpa.load_state_dict(eager.state_dict())
    x = _embeds()
    torch.testing.assert_close(sdpa(inputs_embeds=x).last_hidden_state, eager(inputs_embeds=x).last_hidden_state,
                               rtol=1e-4, atol=1e-5)
    auto = build_llm(dict(type="HFCausalLM", config=TINY, attn_implementation="auto"))
    assert auto.config._attn_implementation in ("sdpa", "flash_attention_2")


def test_flash_attention_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ImportError, match=r"tpo\[flash-attn\]"):
        build_llm(dict(type="HFCausalLM", config=TINY, attn_implementation="flash_attention_2"))


def test_llm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="give `config`"):
        build_llm(dict(type="HFCausalLM"))
    with pytest.raises(KeyError, match="model_type"):
        build_llm(dict(type="HFCausalLM", config=dict(hidden_size=8)))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        build_llm(dict(type="HFCausalLM", config=TINY, attn_implementation="fast"))
    with pytest.raises(FileNotFoundError, match=r"llm\.pretrained"):
        build_llm(dict(type="HFCausalLM", pretrained=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"llm\.torch_dtype"):
        build_llm(dict(type="HFCausalLM", config=TINY, torch_dtype="float7"))
