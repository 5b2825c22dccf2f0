"""The evaluation loop: scoring of text answers, and a real model end to end."""
import json

import numpy as np
import pytest
import torch

from tpo.data.datasets import SampleDataset
from tpo.data.synth import synthesize
from tpo.evaluation import check_answer_budget, evaluate, evaluate_trivial, parse_box, parse_span
from tpo.evaluation.evaluate import SCORED_TASKS, _score, _scored_reference


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
            if (item.get("meta") or {}).get("task") in SCORED_TASKS:
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
    assert perfect["count/track"] > 0 and perfect["track/unanswered"] == perfect["count/track"]  # nor tracks
    wrong = evaluate(Oracle(dataset, corrupt=True), dataset)
    assert wrong["qa/accuracy"] < 0.5 and wrong["box/acc@0.5"] < 1.0


def test_reference_answers_score_perfectly_on_the_frames_they_name(tmp_path):
    """8-frame videos read at 4 frames (1, 3, 5, 7): a reference answer's first box is on the object's first
    frame, which may be left out; it is scored against that frame's box."""
    synthesize(tmp_path, 12, seed=3, frames=8, size=64)
    items = SampleDataset(str(tmp_path / "train.jsonl"), num_frames=4, tasks=["grounding"])
    report = evaluate(Oracle(items), items, predictions=tmp_path / "oracle.jsonl")
    assert report["count/box"] == len(items) and report["box/acc@0.5"] == 1.0
    scores = [json.loads(line)["score"] for line in (tmp_path / "oracle.jsonl").read_text().splitlines()]
    assert min(scores) > 0.97  # all but the 3 decimals the reference writes


def test_predictions_file_holds_what_was_scored(dataset, tmp_path):
    path = tmp_path / "answers" / "oracle.jsonl"
    report = evaluate(Oracle(dataset, corrupt=True), dataset, predictions=path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_task = {task: [line for line in lines if line["task"] == task] for task in SCORED_TASKS}
    assert [len(by_task[t]) for t in by_task] == [report[f"count/{k}"]
                                                  for k in ("qa", "box", "temporal", "mask", "track")]
    assert np.mean([line["score"] for line in by_task["qa"]]) == pytest.approx(report["qa/accuracy"])
    assert all(line["text"] == "[0.9, 0.9, 0.95, 0.95] from 0.9 to 0.95 Z" for line in lines)
    box = by_task["grounding"][0]
    assert box["pred"] == [0.9, 0.9, 0.95, 0.95] and box["source"] == "text" and len(box["target"]) == 4
    assert np.mean([line["score"] for line in by_task["grounding"]]) == pytest.approx(report["box/miou"])
    assert np.mean([line["score"] for line in by_task["temporal_grounding"]]) == pytest.approx(
        report["temporal/mIoU"])
    assert {line["id"] for line in lines} <= {item["id"] for item in dataset}
    trivial = evaluate_trivial(dataset, predictions=tmp_path / "none.jsonl")
    heads = [json.loads(line) for line in (tmp_path / "none.jsonl").read_text().splitlines()]
    assert {line["source"] for line in heads if line["task"] != "qa"} == {"head"}
    assert {tuple(line["heads"]) for line in heads if line["task"] == "qa"} <= {("region", "temporal"),
                                                                             ("mask", "region", "temporal")}
    assert all(line["heads"] == [] for line in lines)  # text answers ran no head
    assert np.mean([line["score"] for line in heads if line["task"] == "segmentation"]) == pytest.approx(
        trivial["mask/miou"])


def test_predictions_path_is_checked_before_answering(dataset, tmp_path):
    class Never(Oracle):
        def chat(self, prompt, max_new_tokens=0, **media):
            raise AssertionError("answered before the path was checked")

    with pytest.raises(ValueError, match="predictions: a .jsonl path"):
        evaluate(Never(dataset), dataset, predictions=tmp_path / "answers.json")


def test_real_models_are_evaluated(dataset):
    from tpo.registry import build_model

    for config in ("configs/mllm/timm_mlp_llama.py", "configs/tpo/timm_mlp_llama.py"):
        report = evaluate(build_model(config), dataset, max_new_tokens=40, limit=12)
        assert report["count/qa"] + report["count/box"] + report["count/temporal"] + report["count/mask"] > 0
        assert (report["assign/accuracy"] is None) == ("mllm" in config)  # task assignment: TPO models only


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
    # the rest is counted by task, not dropped silently
    tasks = [(item.get("meta") or {}).get("task") for item in dataset]
    scored = sum(report[f"count/{k}"] for k in ("qa", "box", "temporal", "mask", "track"))
    assert report["count/unscored"] == len(tasks) - scored > 0
    assert report["unscored/caption"] == tasks.count("caption") > 0
    assert report["unscored/preference"] == tasks.count("preference") > 0


def test_unscored_samples_are_not_answered(dataset):
    asked = []
    report = _score(dataset, lambda item: asked.append(item["meta"]["task"]) or ("A", {}), None)
    assert set(asked) <= set(SCORED_TASKS) and len(asked) == len(dataset) - report["count/unscored"]


def test_tracks_are_scored_by_success_auc_over_visible_frames(dataset):
    """The no-input tracker (the first box on every frame) against an OTB success AUC written out here:
    per visible frame the IoU with the first box, the share of frames above each of 21 thresholds, their mean."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    aucs = []
    for item in dataset:
        if (item.get("meta") or {}).get("task") != "tracking" or not item["tracks"]:
            continue
        track = item["tracks"][0]
        first = track["boxes"][track["valid"]][0].tolist()  # the prompt box: on the first frame the object is on
        ious = [iou(first, box.tolist()) for box, ok in zip(track["boxes"], track["valid"]) if ok]
        if ious:
            aucs.append(np.mean([np.mean([v > t for v in ious]) for t in np.linspace(0, 1, 21)]))
    report = evaluate_trivial(dataset)
    assert report["count/track"] == len(aucs) > 0 and report["track/unanswered"] == 0
    assert report["track/auc"] == pytest.approx(np.mean(aucs), rel=1e-6)
    assert 0 < report["track/auc"] < 1  # the objects move: a box that stays put loses them in part


def test_a_budget_too_short_for_the_reference_answers_is_refused_before_answering(dataset):
    from tpo.registry import build_model

    model = build_model("configs/mllm/timm_mlp_llama.py")
    calls = []
    model.chat = lambda *args, **kwargs: calls.append(args) or "A"
    longest = max(
        (len(model.tokenizer(_scored_reference([t.to_dict() for t in s.conversations], s.meta.get("task")),
                             add_special_tokens=False)["input_ids"]), s.id)
        for s in dataset.samples if _scored_reference([t.to_dict() for t in s.conversations], s.meta.get("task"))
    )
    assert longest[0] > 20  # a box written out takes more than 20 tokens of the tiny tokenizer
    with pytest.raises(ValueError) as err:
        evaluate(model, dataset, max_new_tokens=longest[0] - 1)
    assert f"at least {longest[0]}" in str(err.value) and repr(longest[1]) in str(err.value)
    assert calls == []  # nothing answered: the check reads the annotations only
    check_answer_budget(model.tokenizer, dataset, longest[0])  # exactly enough is enough
    # any other iterable of items is checked item by item, before that item is answered
    with pytest.raises(ValueError, match="cannot hold the reference answer"):
        evaluate(model, list(dataset), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: a positive int"):
        check_answer_budget(model.tokenizer, dataset, 0)


def test_scored_reference_is_the_part_a_text_answer_is_scored_on():
    def conv(answer):
        return [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]

    assert _scored_reference(conv("frame 1: [0.1, 0.2, 0.3, 0.4]; frame 2: [0, 0, 1, 1]"), "grounding") == (
        "frame 1: [0.1, 0.2, 0.3, 0.4]")
    assert _scored_reference(conv("It enters from 0.25 to 0.50. Then it leaves."), "temporal_grounding") == (
        "It enters from 0.25 to 0.50")
    assert _scored_reference(conv("the red circle"), "qa") == "the red circle"
    assert _scored_reference(conv("<mask>"), "segmentation") is None  # masks come only from a head


def test_task_assignment_is_scored_from_the_heads_an_answer_ran(dataset):
    box = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}

    def answer(item):  # right heads for questions, boxes and masks; the mask head for a span question
        task = item["meta"]["task"]
        if task == "grounding":
            return "", {"region": box}
        if task == "temporal_grounding":
            return "", {"mask": {"masks": torch.ones(1, 4, 32, 32, dtype=torch.bool)}}
        if task == "segmentation":
            return "", {"mask": {"masks": torch.ones_like(item["masks"], dtype=torch.bool)[None]}}
        return "A", {}

    expected = {"qa": [], "grounding": ["region"], "temporal_grounding": ["temporal"], "segmentation": ["mask"],
                "tracking": ["track"]}
    report = _score(dataset, answer, None, expected_heads=expected)
    counts = [report[f"count/{k}"] for k in ("qa", "box", "temporal", "mask", "track")]
    assert all(counts)
    assert report["assign/qa"] == report["assign/grounding"] == report["assign/segmentation"] == 1.0
    assert report["assign/temporal_grounding"] == 0.0 and report["assign/tracking"] == 0.0  # no head ran
    assert report["assign/accuracy"] == pytest.approx((sum(counts) - counts[2] - counts[4]) / sum(counts))
    assert report["temporal/unanswered"] == counts[2]  # no temporal head ran and the text holds no span
    assert _score(dataset, answer, None)["assign/accuracy"] is None  # not a TPO model: not scored


def test_a_tpo_model_tracks_from_the_first_box(dataset):
    from tpo.registry import build_model

    model = build_model("configs/tpo/timm_mlp_llama.py")
    # init_box is the box on the source init_frame, which frame sampling may leave out: not the prompt
    tracking = [dict(item, tracks=[dict(item["tracks"][0], init_box=torch.tensor([0.0, 0.0, 1.0, 1.0]))])
                for item in dataset if (item.get("meta") or {}).get("task") == "tracking" and item["tracks"]
                and bool(item["tracks"][0]["valid"].any())]
    given, predict = [], model.predict

    def recording(prompt, **kwargs):
        given.append((kwargs.get("input_box"), kwargs["head_inputs"]["init_frames"].tolist()))
        return predict(prompt, **kwargs)

    model.predict = recording
    report = evaluate(model, tracking, max_new_tokens=40)
    firsts = [int(item["tracks"][0]["valid"].nonzero()[0, 0]) for item in tracking]
    assert given == [(item["tracks"][0]["boxes"][f].tolist(), [f]) for item, f in zip(tracking, firsts)]
    assert report["count/track"] == len(tracking) > 0
    assert 0 <= report["track/unanswered"] <= report["count/track"]  # items whose answer ran no track head


def _item(sid, task, **fields):
    return {"id": sid, "meta": {"task": task}, "media_type": "video", **fields,
            "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}]}


def test_samples_without_a_mask_on_a_sampled_frame_are_unscored():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True
    items = [_item("seen", "segmentation", masks=masks, mask_valid=torch.tensor([True, False])),
             _item("unseen", "segmentation", masks=masks, mask_valid=torch.tensor([False, False]))]
    report = evaluate_trivial(items)
    assert report["count/mask"] == 1 and report["mask/miou"] == pytest.approx(0.25)
    assert report["count/unscored"] == report["unscored/segmentation"] == 1


def test_a_text_box_is_scored_against_the_box_of_the_frame_it_names():
    """Boxes on source frames 0..3, frames 1 and 3 sampled: a text answer's "frame N:" names the frame of
    its box, sampled or not (the reference answers list every frame); without one, or naming a frame with no
    box, it is scored against the first box on a sampled frame, as a head's box is."""
    source = torch.tensor([[0.1 * t, 0.0, 0.1 * t + 0.1, 0.1] for t in range(4)])
    item = _item("box", "grounding", boxes=source[[1, 3]], box_frames=torch.tensor([0, 1]),
                 frame_indices=torch.tensor([1, 3]), source_boxes=source, source_box_frames=torch.arange(4))

    def fmt(t):
        return "[" + ", ".join(f"{v:.2f}" for v in source[t].tolist()) + "]"

    answers = {f"frame 0: {fmt(0)}; frame 1: {fmt(1)}": 1.0, f"Frame 2: {fmt(2)}": 1.0, fmt(1): 1.0,
               f"frame 6: {fmt(1)}": 1.0, f"frame 3: {fmt(1)}": 0.0, f"frame 1: {fmt(0)}": 0.0}
    items = [dict(item, id=text) for text in answers]
    report = _score(items, lambda it: (it["id"], {}), None)
    assert report["count/box"] == len(answers) and report["box/miou"] == pytest.approx(np.mean(list(answers.values())))
    head = _score([item], lambda it: ("", {"region": {"boxes": source[[1]]}}), None)
    assert head["box/miou"] == pytest.approx(1.0)


def test_the_trivial_tracker_keeps_the_tracks_box_on_its_first_sampled_frame(tmp_path):
    """init_box is on the source init_frame, which sampling left out here: the prompt box is the track's
    own box on the first sampled frame its object is on."""
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.1, 0.1, 0.5, 0.5], [0.3, 0.1, 0.7, 0.5], [0.1, 0.1, 0.5, 0.5]])
    track = {"init_frame": 0, "init_box": torch.tensor([0.6, 0.6, 0.9, 0.9]), "boxes": boxes,
             "valid": torch.tensor([False, True, True, True])}
    report = evaluate_trivial([_item("t", "tracking", tracks=[track])], predictions=tmp_path / "p.jsonl")
    assert json.loads((tmp_path / "p.jsonl").read_text())["init"] == [0.1, 0.1, 0.5, 0.5]
    ious = np.array([1.0, 1 / 3, 1.0])  # the prompt box against frames 1, 2, 3
    assert report["track/auc"] == pytest.approx(np.mean([(ious > t).mean() for t in np.linspace(0, 1, 21)]))


def test_videos_of_another_frame_count_than_the_model_reads_are_refused_before_answering(dataset):
    """The model would resample them to its own frames and its per-frame masks and tracks would be scored against
    other frames."""
    from tpo.registry import build_model

    model = build_model("configs/tpo/timm_mlp_llama.py")  # reads 4 frames
    two = SampleDataset(dataset.ann_file, num_frames=2)
    with pytest.raises(ValueError, match=r"2 frames per video but the model reads 4: .*num_frames=4"):
        evaluate(model, two, limit=1)
    videos = (item for item in two if item["media_type"] == "video" and item["meta"]["task"] == "qa")  # item by item
    with pytest.raises(ValueError, match=r"sample '.*' has 2 frames per video but the model reads 4"):
        evaluate(model, videos, limit=1)
