"""SFT: the model's fused conversation loss, the same as materialised logits
with F.cross_entropy, averaged over the answer tokens."""
import pytest
import torch
from engine_testkit import conversation_collator, model_config, qa_items
from tpo.registry import build_algorithm, build_model

from tpo.algorithms.sft import SFT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(model_config())


def _grads(algo, batch):
    algo.zero_grad(set_to_none=True)
    out = algo.step(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}
    algo.zero_grad(set_to_none=True)
    return out, grads


def test_fused_matches_eager(model):
    batch = conversation_collator(model.processor)(qa_items(3))
    fused, g_fused = _grads(build_algorithm({"type": "SFT"}, default_args={"model": model}), batch)
    eager, g_eager = _grads(SFT(model, logprob="eager"), batch)
    torch.testing.assert_close(fused["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
    assert set(g_fused) == set(g_eager) and g_fused
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_eager[name], rtol=1e-4, atol=1e-6)
    assert fused["losses/lm"] == fused["loss"]


def test_items_are_answer_tokens(model):
    batch = conversation_collator(model.processor)(qa_items(3))
    algo = SFT(model)
    assert algo.num_items(batch) == int(model(batch)["num_tokens"])
    answer_tokens = sum(len(model.tokenizer(it["conversations"][1]["value"] + model.tokenizer.eos_token,
                                            add_special_tokens=False).input_ids) for it in qa_items(3))
    assert algo.num_items(batch) == answer_tokens


def test_bad_argument_names_the_key(model):
    with pytest.raises(ValueError, match="algorithm.logprob"):
        build_algorithm({"type": "SFT", "logprob": "chunked"}, default_args={"model": model})


def test_answers_that_ran_out_of_tokens_are_marked(model, monkeypatch):
    algo = SFT(model, max_new_tokens=4)
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    finished, cut = [5, 6, eos, pad], [5, 6, 7, 8]
    monkeypatch.setattr(model, "generate", lambda *a, **k: torch.tensor([finished, cut]))
    samples = algo.predict_answers(qa_items(2))
    assert [s["truncated"] for s in samples] == [False, True]
    assert SFT(model).max_new_tokens == 32  # the default holds the synthetic benchmark's longest answer (17)
