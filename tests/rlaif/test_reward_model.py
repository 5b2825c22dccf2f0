"""The reward model (an MLLM with a value head) and its training algorithm."""
import pytest
import torch
from rlaif_testkit import policy_config, reward_model_config, save_weights
from tpo.registry import build_algorithm, build_model


def preference_items(n=8, seed=0):
    """The correct colour of a square chosen over a wrong one (images)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235), "yellow": (235, 220, 30)}
    names = list(colours)
    items = []
    for i in range(n):
        c = names[i % 4]
        img = rng.integers(0, 60, size=(32, 32, 3))
        img[8:24, 8:24] = colours[c]
        prompt = "<image>\nWhat colour is the square?"
        items.append({"id": f"p{i}", "media": torch.from_numpy(img.astype("uint8").transpose(2, 0, 1).copy()),
                      "media_type": "image", "conversations": [{"from": "human", "value": prompt}],
                      "preference": {"prompt": prompt, "chosen": c, "rejected": names[(i + 1) % 4]}})
    return items


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    return build_model(reward_model_config())


def test_rewards_are_the_head_on_the_last_answer_token(reward_model):
    from tpo.data import PreferenceCollator

    batch = PreferenceCollator(reward_model.processor)(preference_items(3))
    out = reward_model(batch)
    assert out["rewards"].shape == (6,) and out["values"].shape == batch["input_ids"].shape
    last = torch.stack([(row != -100).nonzero().max() for row in batch["labels"]])
    assert torch.equal(out["score_positions"], last)
    tokens = batch["input_ids"][torch.arange(6), last]
    assert (tokens == reward_model.tokenizer.eos_token_id).all()  # the end of the answer
    torch.testing.assert_close(out["rewards"], out["values"][torch.arange(6), last])
    given = reward_model({**batch, "score_positions": last - 1})["rewards"]
    torch.testing.assert_close(given, out["values"][torch.arange(6), last - 1])
    no_answer = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="no labelled"):
        reward_model(no_answer)


def test_a_bf16_llm_is_scored_by_the_float32_head():
    from tpo.data import PreferenceCollator

    torch.manual_seed(0)
    model = build_model(reward_model_config(**{"llm.torch_dtype": "bfloat16"}))
    assert model.value_head.weight.dtype == torch.float32
    out = model(PreferenceCollator(model.processor)(preference_items(2)))
    assert out["hidden_states"].dtype == torch.bfloat16 and out["values"].dtype == torch.float32
    torch.testing.assert_close(out["values"], model.value_head(out["hidden_states"].float()).squeeze(-1))
    out["rewards"].sum().backward()
    assert model.value_head.weight.grad is not None


def test_lora_reward_model_from_an_sft_checkpoint(tmp_path):
    torch.manual_seed(0)
    sft = build_model(policy_config())
    ckpt = save_weights(sft, tmp_path / "sft.safetensors")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    llm = {**reward_model_config()["llm"], "lora": lora}
    rm = build_model(reward_model_config(llm=llm, init_from=ckpt))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") or n.startswith("projector.")
                             for n in trainable)
    sft_q = dict(sft.named_parameters())["llm.model.model.layers.0.self_attn.q_proj.weight"]
    rm_q = dict(rm.named_parameters())["llm.model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    torch.testing.assert_close(rm_q, sft_q)
    full = build_model(reward_model_config(init_from=ckpt))
    assert not full.llm.get_output_embeddings().weight.requires_grad  # unused by a reward model
    other = build_model(policy_config(**{"llm.config.hidden_size": 32, "llm.config.intermediate_size": 64}))
    bad = save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="model.init_from: .* has shape"):
        build_model(reward_model_config(init_from=bad))


def test_reward_modeling_learns_the_preferences():
    torch.manual_seed(0)
    algo = build_algorithm(dict(type="RewardModeling"), default_args={"model": build_model(reward_model_config())})
    collate = algo.build_collator(max_length=256)
    batch = collate(preference_items(8))
    assert algo.num_items(batch) == 8
    opt = torch.optim.AdamW([p for p in algo.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(25):
        out = algo.step(batch)
        first = first if first is not None else float(out["loss"].detach())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"].detach()) < 0.5 * first
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "loss/center"} <= set(out)
    result = algo.evaluate(batch)
    assert result["num_items"] == 8 and len(result["samples"]) == 8
    acc = sum(s["chosen_reward"] > s["rejected_reward"] for s in result["samples"]) / 8
    assert acc == float(result["metrics"]["rewards/accuracies"]) == 1.0


def test_reward_modeling_config_errors():
    from tpo.algorithms.reward_model import RewardModeling

    with pytest.raises(TypeError, match="value head"):
        RewardModeling(build_model(policy_config()))
    with pytest.raises(KeyError, match="algorithm.loss.type"):
        RewardModeling.check_config(dict(type="RewardModeling", loss=dict(type="BradleyTery")))
    with pytest.raises(TypeError, match="algorithm.los"):
        RewardModeling.check_config(dict(type="RewardModeling", los=dict(type="BradleyTerryLoss")))
