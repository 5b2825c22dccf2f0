"""The evaluation loop: scoring of text answers, and a real model end to end."""
import numpy as np
import pytest

from tpo.data.datasets import SampleDataset
from tpo.data.synth import synthesize
from tpo.evaluation import evaluate, evaluate_trivial, parse_box, parse_span


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 6, seed=3, frames=4, size=32)
    return SampleDataset(str(out / "train.jsonl"), num_frames=4)


def test_parsers():
    np.testing.assert_allclose(parse_box("frame 0: [0.1, 0.2, 0.5, 0.75]; frame 1: [0, 0, 1, 1]"), [0.1, 0.2, 0.5, 0.75])
    np.testing.assert_allclose(parse_span("From 0.25 to 0.50."), [0.25, 0.5])
    assert parse_box("no box here [1, 2]") is None and parse_span("at 0.5") is None


class Oracle:
    """Answers with the dataset's own reference answers (the scoring must then be perfect)."""

    def __init__(self, dataset, corrupt=False):
        self.answers = {}
        for item in dataset:
            question = next(t["value"] for t in item["conversations"] if t["from"] == "human")
            answer = next((t["value"] for t in item["conversations"] if t["from"] == "gpt"), "")
            key = question.replace("<video>", "").replace("<image>", "").strip()
            if (item.get("meta") or {}).get("task") in ("qa", "grounding", "temporal_grounding", "segmentation"):
                self.answers.setdefault(key, []).append(answer)  # asked in dataset order
        self.corrupt = corrupt

    def eval(self):
        return self

    def chat(self, prompt, max_new_tokens=0, **media):
        answer = self.answers[prompt].pop(0)
        return "[0.9, 0.9, 0.95, 0.95] from 0.9 to 0.95 Z" if self.corrupt else answer


def test_reference_answers_score_perfectly_and_wrong_ones_do_not(dataset):
    perfect = evaluate(Oracle(dataset), dataset)
    assert perfect["count/qa"] > 0 and perfect["qa/accuracy"] == 1.0
    assert perfect["count/box"] > 0 and perfect["box/acc@0.5"] == 1.0
    assert perfect["count/temporal"] > 0 and perfect["temporal/R@0.5"] == 1.0
    assert perfect["mask/unanswered"] == perfect["count/mask"]  # text answers hold no mask
    wrong = evaluate(Oracle(dataset, corrupt=True), dataset)
    assert wrong["qa/accuracy"] < 0.5 and wrong["box/acc@0.5"] < 1.0


def test_real_models_are_evaluated(dataset):
    from tpo.registry import build_model

    for config in ("configs/mllm/timm_mlp_llama.py", "configs/tpo/timm_mlp_llama.py"):
        report = evaluate(build_model(config), dataset, max_new_tokens=4, limit=12)
        assert report["count/qa"] + report["count/box"] + report["count/temporal"] + report["count/mask"] > 0


def test_the_no_input_reference_scores_what_its_answers_are_worth(dataset):
    """Option A, the whole frame and the whole clip, checked against numbers computed here from the
    annotations: the fraction of multiple-choice answers that are A, the box areas, the span lengths and
    the masks' share of the frame."""
    report = evaluate_trivial(dataset)
    qa, areas, lengths, shares = [], [], [], []
    for item in dataset:
        meta = item.get("meta") or {}
        if meta.get("task") == "qa":
            qa.append(meta.get("answer_type") == "mc" and meta["answer"] == "A")
        elif meta.get("task") == "grounding" and len(item["boxes"]):
            x1, y1, x2, y2 = item["boxes"][0].tolist()
            areas.append((x2 - x1) * (y2 - y1))
        elif meta.get("task") == "temporal_grounding" and len(item["spans"]):
            lengths.append(float(item["spans"][0, 1] - item["spans"][0, 0]))
        elif meta.get("task") == "segmentation" and item.get("masks") is not None:
            masks = item["masks"].bool()
            masks = masks[None] if masks.dim() == 2 else masks
            valid = item.get("mask_valid")
            frames = range(masks.shape[0]) if valid is None else [t for t in range(masks.shape[0]) if valid[t]]
            shares.append(np.mean([masks[t].float().mean().item() for t in frames]))
    assert len(qa) and len(areas) and len(lengths) and len(shares)
    assert report["qa/accuracy"] == pytest.approx(np.mean(qa)) and 0 < report["qa/accuracy"] < 1
    assert report["box/miou"] == pytest.approx(np.mean(areas), rel=1e-5)
    assert report["temporal/mIoU"] == pytest.approx(np.mean(lengths), rel=1e-5)
    assert report["temporal/R@0.5"] == pytest.approx(np.mean(np.array(lengths) >= 0.5))
    assert report["mask/miou"] == pytest.approx(np.mean(shares), rel=1e-5)
    assert report["box/unanswered"] == report["temporal/unanswered"] == report["mask/unanswered"] == 0
