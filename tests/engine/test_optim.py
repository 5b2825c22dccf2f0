"""Parameter groups by name pattern with their own learning rates, no weight
decay on biases and norms, and the warm-up + cosine/linear schedule."""
import math

import pytest
import torch
from engine_testkit import model_config, qa_items, train_config
from tpo.registry import build_model

from tpo.algorithms.base import group_parameters
from tpo.engine import Trainer
from tpo.engine.optim import schedule_factor


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    return build_model(model_config(**{"llm.lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}))


def test_groups_by_pattern(lora_model):
    groups = group_parameters(list(lora_model.named_parameters()), lr=1e-4, weight_decay=0.1,
                              groups={"projector": {"lr": 1e-3}, "lora": {"lr": 2e-4, "weight_decay": 0.0},
                                      "unused": {"pattern": "^nothing", "lr": 9.0}})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"projector", "projector/no_decay", "lora"}  # the frozen base has no trainable rest
    assert all(n.startswith("projector.") for n in by_name["projector"]["param_names"])
    assert all(n.endswith(".bias") for n in by_name["projector/no_decay"]["param_names"])
    assert by_name["projector"]["lr"] == by_name["projector/no_decay"]["lr"] == 1e-3
    assert by_name["projector"]["weight_decay"] == 0.1 and by_name["projector/no_decay"]["weight_decay"] == 0.0
    assert all(".lora_" in n for n in by_name["lora"]["param_names"]) and by_name["lora"]["lr"] == 2e-4
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    grouped = [n for g in groups for n in g["param_names"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter exactly once


def test_first_matching_group_wins_and_rest_is_default():
    torch.manual_seed(0)
    model = build_model(model_config())
    groups = group_parameters(list(model.named_parameters()), lr=1e-4, weight_decay=0.0,
                              groups={"mlp0": {"pattern": r"projector\.mlp\.0\.", "lr": 5e-3},
                                      "projector": {"lr": 1e-3}})
    by_name = {g["name"]: g for g in groups}
    assert by_name["mlp0"]["param_names"] == ["projector.mlp.0.weight"]
    assert by_name["projector"]["param_names"] == ["projector.mlp.2.weight"]
    assert "llm.model.lm_head.weight" in by_name["default"]["param_names"]
    assert all("norm" in n for n in by_name["default/no_decay"]["param_names"] if "bias" not in n)


def test_schedule_shapes():
    total, warm = 10, 2
    cos = [schedule_factor(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert cos[:2] == [0.5, 1.0]
    assert cos[2] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    lin = [schedule_factor(s, total, 0, "linear", 0.0) for s in range(total)]
    assert lin == pytest.approx([1 - s / 10 for s in range(10)])
    assert [schedule_factor(s, total, 3, "constant", 0.0) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


def test_trainer_uses_and_logs_group_rates(tmp_path):
    cfg = train_config(tmp_path, train={"batch_size": 2, "max_steps": 3},
                       optim={"lr": 1e-3, "param_groups": {"projector": {"lr": 1e-2}}},
                       schedule={"type": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0})
    trainer = Trainer(cfg, train_dataset=qa_items(8))
    trainer.fit()
    train = [r for r in trainer.history if r["split"] == "train"]
    assert [r["lr/projector"] for r in train] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert [r["lr/default"] for r in train] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
