"""The TPO stage algorithm: loss selection, trainable parameters, collator wiring."""
from pathlib import Path

import pytest
import torch

from tpo.data.datasets import SampleDataset
from tpo.data.synth import synthesize
from tpo.registry import build_algorithm, build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 4, seed=5, frames=4, size=32)
    dataset = SampleDataset(str(out / "train.jsonl"), num_frames=4,
                            tasks=["grounding", "temporal_grounding", "segmentation", "tracking", "qa"])
    return [dataset[i] for i in range(len(dataset))]


def _algorithm(**kwargs):
    torch.manual_seed(0)
    model = build_model(ROOT / "configs" / "tpo" / "timm_mlp_llama.py")
    return build_algorithm(dict(type="TPO", **kwargs), default_args=dict(model=model))


def _task_batch(algo, items):
    collate = algo.build_collator(max_length=1024)
    tasks = {"grounding", "temporal_grounding", "segmentation", "tracking"}
    chosen = [next(i for i in items if i["meta"]["task"] == t) for t in sorted(tasks)]
    return collate(chosen + [next(i for i in items if i["meta"]["task"] == "qa")])


def test_head_stage_trains_only_heads_on_task_losses(items):
    algo = _algorithm(losses=[r"^(region|temporal|mask|track)\."],
                      trainable=[r"^heads\.", r"^task_embeddings\.", r"^box_encoder\."])
    batch = _task_batch(algo, items)
    assert set(batch["task_targets"]) == {"region", "temporal", "mask", "track"}
    out = algo.step(batch)
    task_total = sum(v for k, v in out.items() if k.startswith("losses/") and k.split("/")[1].split(".")[0]
                     in {"region", "temporal", "mask", "track"})
    torch.testing.assert_close(out["loss"].detach(), task_total, rtol=1e-5, atol=1e-6)
    assert "losses/lm" in out and "losses/assign" in out  # still logged
    out["loss"].backward()
    trainable = {n for n, p in algo.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in {"heads", "task_embeddings", "box_encoder"} for n in trainable)
    assert all(algo.model.get_parameter(n).grad is not None for n in trainable if n.startswith("heads.region"))


def test_assignment_stage_optimises_lm_and_assign(items):
    algo = _algorithm(losses=["^lm$", "^assign$"])
    out = algo.step(_task_batch(algo, items))
    torch.testing.assert_close(out["loss"].detach(), out["losses/lm"] + algo.model.assign_weight * out["losses/assign"])


def test_stage_config_errors():
    with pytest.raises(ValueError, match="no parameter name matches"):
        _algorithm(trainable=["^nothing_here"])
    with pytest.raises(ValueError, match="bad regular expression"):
        _algorithm(losses=["("])
    with pytest.raises(TypeError, match="TPOModel"):
        build_algorithm(dict(type="TPO"), default_args=dict(model=build_model(ROOT / "configs/mllm/timm_mlp_llama.py")))
