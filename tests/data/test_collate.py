"""Collators on a synthetic benchmark and the tiny model's processor: label
masking, media placeholders, padding, truncation, task tokens and targets,
preference pairs; every batch also goes through ``model(batch)``."""
import copy
import math

import numpy as np
import pytest
import torch
from tpo.registry import build_model

from tpo.data import SampleDataset, synthesize
from tpo.data.collate import (
    BOX_TOKEN,
    IGNORE_INDEX,
    ConversationCollator,
    PreferenceCollator,
    add_task_tokens,
    build_collator,
    task_tokens,
)
from tpo.data.video import uniform_indices
from tpo.models.processor import MultimodalProcessor

TASKS = {"region": {"annotation": "boxes"}, "temporal": {"annotation": "spans"},
         "mask": {"annotation": "masks"}, "track": {"annotation": "tracks"}}
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def model():
    """The tiny timm + MLP + Llama model, its tokenizer holding the task tokens
    (as the TPO model adds them) and its embeddings resized to match."""
    model = build_model("configs/mllm/timm_mlp_llama.py")
    assert add_task_tokens(model.processor.tokenizer, TASKS) == 9
    model.llm.resize_token_embeddings(len(model.processor.tokenizer))
    return model.eval()


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """The train split of a 5-scene benchmark (images and 8-frame videos), all
    frames loaded: the collator samples the model's 4."""
    out = tmp_path_factory.mktemp("collate-synth")
    synthesize(out, num=5, seed=0)
    ds = SampleDataset(str(out / "train.jsonl"))
    loaded = [ds[i] for i in range(len(ds))]
    assert {i["media_type"] for i in loaded} == {"image", "video"}
    return loaded


def tok_of(model):
    return model.processor.tokenizer


def labelled_runs(labels_row):
    """The labelled tokens of one row as runs of consecutive positions."""
    runs, current, last = [], [], None
    for j in (labels_row != IGNORE_INDEX).nonzero().flatten().tolist():
        if last is not None and j != last + 1:
            runs.append(current)
            current = []
        current.append(int(labels_row[j]))
        last = j
    return runs + ([current] if current else [])


def expected_text(model, item, frames, extra_answer=None):
    """The conversation rendered by the tokenizer's own template, the media
    placeholder expanded: what the row's tokens must decode to."""
    messages = [{"role": ROLE[t["from"]], "content": t["value"]} for t in item["conversations"]]
    if extra_answer is not None:
        messages.append({"role": "assistant", "content": extra_answer})
    text = tok_of(model).apply_chat_template(messages, tokenize=False)
    n = frames * model.processor.tokens_per_frame
    return text.replace("<video>", "<video>" * n).replace("<image>", "<image>" * n)


def row_ids(batch, b):
    return batch["input_ids"][b][batch["attention_mask"][b].bool()]


def finite_loss(model, batch):
    with torch.no_grad():
        out = model(batch)
    assert math.isfinite(float(out["loss"]))
    assert int(out["num_tokens"]) == batch["num_tokens"]
    return float(out["loss"])


def llava_item(sid="llava-1", turns=3, answer="It is red.", **extra):
    conv = [{"from": "system", "value": "You are a careful assistant."},
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue, at the left."},
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "Two."}]
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=gen)
    item = {"id": sid, "media_type": "image", "media": image, "conversations": conv[: 1 + 2 * turns]}
    item.update(extra)
    return item


# ------------------------------------------------------------------ labels, media, padding
def test_labels_are_exactly_the_answers_and_end_tokens(model, items):
    tok = tok_of(model)
    batch = ConversationCollator(model.processor)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["ids"] == [i["id"] for i in items]
    for b, item in enumerate(items):
        pref = item["preference"]
        answer = pref["chosen"] if pref is not None else item["conversations"][-1]["value"]
        frames = batch["media"][b].shape[0]
        extra = pref["chosen"] if pref is not None else None
        assert tok.decode(row_ids(batch, b)) == expected_text(model, item, frames, extra)
        runs = labelled_runs(batch["labels"][b])
        assert [tok.decode(r) for r in runs] == [answer + tok.eos_token], item["id"]
        lab = batch["labels"][b]
        assert torch.equal(lab[lab != IGNORE_INDEX], batch["input_ids"][b][lab != IGNORE_INDEX])
    assert batch["num_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert batch["num_truncated"] == 0 and batch["task_targets"] == {}


def test_placeholders_media_and_model_loss(model, items):
    proc = model.processor
    batch = ConversationCollator(proc)(items)
    video_id, image_id = proc.video_token_id, proc.image_token_id
    for b, item in enumerate(items):
        media = batch["media"][b]
        if item["media_type"] == "video":
            sel = uniform_indices(item["media"].shape[0], proc.num_frames)
            assert media.shape == (proc.num_frames, 3, 32, 32)
            assert torch.allclose(media, proc.preprocess(item["media"][torch.from_numpy(sel)]))
            assert torch.allclose(batch["timestamps"][b].double(), item["timestamps"][torch.from_numpy(sel)])
            token = video_id
        else:
            assert media.shape == (1, 3, 32, 32) and batch["timestamps"][b] is None
            token = image_id
        count = int((batch["input_ids"][b] == token).sum())
        assert count == media.shape[0] * model.tokens_per_frame
        assert not (batch["labels"][b][batch["input_ids"][b] == token] != IGNORE_INDEX).any()
    finite_loss(model, batch)


def test_left_and_right_padding_hold_the_same_rows(model, items):
    chosen = items[:6] + [i for i in items if i["media_type"] == "image"][:2]
    right = ConversationCollator(model.processor, padding_side="right")(chosen)
    left = ConversationCollator(model.processor, padding_side="left")(chosen)
    lengths = right["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the padding does something
    L = right["input_ids"].shape[1]
    pad = tok_of(model).pad_token_id
    for b, n in enumerate(lengths.tolist()):
        assert right["attention_mask"][b].tolist() == [1] * n + [0] * (L - n)
        assert left["attention_mask"][b].tolist() == [0] * (L - n) + [1] * n
        assert (right["input_ids"][b, n:] == pad).all() and (left["input_ids"][b, : L - n] == pad).all()
        assert torch.equal(right["input_ids"][b, :n], left["input_ids"][b, L - n:])
        assert torch.equal(right["labels"][b, :n], left["labels"][b, L - n:])
        assert (right["labels"][b, n:] == IGNORE_INDEX).all() and (left["labels"][b, : L - n] == IGNORE_INDEX).all()
    assert finite_loss(model, right) == pytest.approx(finite_loss(model, left), rel=1e-4, abs=1e-4)


def test_multi_turn_llava_conversation(model):
    tok = tok_of(model)
    item = llava_item()
    batch = ConversationCollator(model.processor)([item])
    assert tok.decode(row_ids(batch, 0)) == expected_text(model, item, 1)
    runs = [tok.decode(r) for r in labelled_runs(batch["labels"][0])]
    assert runs == [a + tok.eos_token for a in ("It is red.", "Blue, at the left.", "Two.")]
    assert int((batch["input_ids"][0] == model.processor.image_token_id).sum()) == model.tokens_per_frame
    assert batch["media"][0].shape == (1, 3, 32, 32)
    finite_loss(model, batch)
    # a system prompt is put first only where the conversation has none
    no_system = dict(item, conversations=item["conversations"][1:])
    prompted = ConversationCollator(model.processor, system_prompt="Answer briefly.")([no_system, item])
    assert "<|system|>\nAnswer briefly." in tok.decode(row_ids(prompted, 0))
    assert "Answer briefly." not in tok.decode(row_ids(prompted, 1))


def test_template_that_is_not_prefix_stable_is_named(model):
    tok = copy.deepcopy(tok_of(model))
    # the end-of-sequence token only after the final answer: earlier answers render differently
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    proc = MultimodalProcessor(tok, model.processor.preprocess, model.tokens_per_frame, model.processor.num_frames)
    with pytest.raises(ValueError, match=r"TokenizersBackend.*not prefix-stable.*'llava-1'"):
        ConversationCollator(proc)([llava_item()])
    ConversationCollator(proc)([llava_item(turns=1)])  # one answer: the prefixes agree


# ------------------------------------------------------------------ truncation
def test_truncation_drops_whole_trailing_turns(model):
    tok = tok_of(model)
    full = ConversationCollator(model.processor, max_length=None)([llava_item()])
    two = ConversationCollator(model.processor, max_length=None)([llava_item(turns=2)])
    n3, n2 = full["input_ids"].shape[1], two["input_ids"].shape[1]
    assert n2 < n3
    for limit in (n2, n3 - 1):
        batch = ConversationCollator(model.processor, max_length=limit)([llava_item()])
        assert torch.equal(batch["input_ids"], two["input_ids"]) and torch.equal(batch["labels"], two["labels"])
        assert batch["num_truncated"] == 1
        assert batch["truncated_turns"].tolist() == [2] and batch["truncated_tokens"].tolist() == [n3 - n2]
        runs = [tok.decode(r) for r in labelled_runs(batch["labels"][0])]
        assert runs == ["It is red." + tok.eos_token, "Blue, at the left." + tok.eos_token]
    fits = ConversationCollator(model.processor, max_length=n3)([llava_item()])
    assert fits["num_truncated"] == 0 and torch.equal(fits["input_ids"], full["input_ids"])


def test_truncation_keeps_task_tokens_on_the_last_answer_kept(model):
    box = {"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6]]), "box_frames": torch.zeros(1, dtype=torch.long)}
    collate = ConversationCollator(model.processor, max_length=None, tasks=TASKS)
    two = collate([llava_item(turns=2, **box)])
    limited = ConversationCollator(model.processor, max_length=two["input_ids"].shape[1], tasks=TASKS)
    batch = limited([llava_item(**box)])
    assert torch.equal(batch["input_ids"], two["input_ids"]) and torch.equal(batch["labels"], two["labels"])
    begin, query = (tok_of(model).convert_tokens_to_ids(t) for t in task_tokens("region"))
    assert int((batch["input_ids"] == begin).sum()) == 1 and int((batch["input_ids"] == query).sum()) == 1
    assert batch["truncated_turns"].tolist() == [2]
    assert batch["task_targets"]["region"]["index"].tolist() == [0]


def test_truncation_cuts_the_first_answers_text_but_not_media_or_task_tokens(model):
    tok = tok_of(model)
    item = llava_item(turns=1, answer="The circle is red and round. " * 12,
                      boxes=torch.tensor([[0.1, 0.2, 0.5, 0.6]]), box_frames=torch.zeros(1, dtype=torch.long))
    full = ConversationCollator(model.processor, max_length=None, tasks=TASKS)([item])
    n = full["input_ids"].shape[1]
    batch = ConversationCollator(model.processor, max_length=n - 10, tasks=TASKS)([item])
    assert batch["input_ids"].shape[1] == n - 10
    assert batch["num_truncated"] == 1 and batch["truncated_tokens"].tolist() == [10]
    assert batch["truncated_turns"].tolist() == [0]
    full_lab = [t for r in labelled_runs(full["labels"][0]) for t in r]
    cut_lab = [t for r in labelled_runs(batch["labels"][0]) for t in r]
    begin, query = (tok.convert_tokens_to_ids(t) for t in task_tokens("region"))
    assert full_lab[-2:] == [begin, tok.eos_token_id]
    assert cut_lab == full_lab[: len(full_lab) - 12] + full_lab[-2:]
    ids = batch["input_ids"][0]
    assert int((ids == model.processor.image_token_id).sum()) == model.tokens_per_frame
    q = int(batch["task_targets"]["region"]["query_position"][0])
    assert ids[q] == query and ids[q - 1] == begin and batch["labels"][0, q] == IGNORE_INDEX
    finite_loss(model, batch)


def test_truncation_that_would_cut_media_is_an_error(model):
    tok = tok_of(model)
    item = llava_item(turns=1)
    full = ConversationCollator(model.processor, max_length=None)([item])
    labelled = (full["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    first, eos, n = labelled[0], labelled[-1], full["input_ids"].shape[1]
    assert full["input_ids"][0, eos] == tok.eos_token_id
    minimal = first + (n - eos)  # the prompt, the end-of-turn token and what follows it
    # the prompt and the end-of-turn tokens just fit: the whole answer text goes
    batch = ConversationCollator(model.processor, max_length=minimal)([item])
    assert batch["input_ids"].shape[1] == minimal and batch["truncated_tokens"].tolist() == [eos - first]
    assert [tok.decode(r) for r in labelled_runs(batch["labels"][0])] == [tok.eos_token]
    assert int((batch["input_ids"][0] == model.processor.image_token_id).sum()) == model.tokens_per_frame
    with pytest.raises(ValueError, match=rf"sample 'llava-1': cannot fit max_length={minimal - 1}: the prompt takes "
                                         rf"{first} tokens \(16 of them media"):
        ConversationCollator(model.processor, max_length=minimal - 1)([item])
    with pytest.raises(ValueError, match=r"sample 'llava-1'.*max_length=10"):
        ConversationCollator(model.processor, max_length=10)([item])


# ------------------------------------------------------------------ task tokens and targets
def _expected_annotations(item, sel):
    """What each task should get from ``item`` on the sampled frames ``sel``,
    written out independently of the collator."""
    found = {}
    pos = {int(p): j for j, p in enumerate(sel)}
    for n, f in enumerate(item["box_frames"].tolist()):
        if f in pos:
            found["region"] = {"boxes": item["boxes"][n], "frame": pos[f]}
            break
    if len(item["spans"]):
        found["temporal"] = {"spans": item["spans"][0]}
    if item["masks"] is not None:
        if item["media_type"] == "image":
            masks, valid = item["masks"][None], torch.ones(1, dtype=torch.bool)
        else:
            masks, valid = item["masks"][sel], item["mask_valid"][sel]
        if any(bool(v) and bool(m.any()) for m, v in zip(masks, valid)):
            found["mask"] = {"masks": masks, "frame_valid": valid}
    if item["tracks"] and item["tracks"][0]["valid"][sel].any():
        t = item["tracks"][0]
        first = int(t["valid"][sel].nonzero()[0, 0])  # the box prompt: the track's box on its first sampled frame
        found["track"] = {"init_boxes": t["boxes"][sel][first], "init_frames": first,
                          "boxes": t["boxes"][sel], "valid": t["valid"][sel]}
    return found


def test_task_tokens_labels_and_targets_line_up(model, items):
    tok = tok_of(model)
    proc = model.processor
    batch = ConversationCollator(proc, tasks=TASKS)(items)
    ids, labels = batch["input_ids"], batch["labels"]
    expected = []
    for item in items:
        sel = np.zeros(1, dtype=np.int64) if item["media_type"] == "image" else uniform_indices(
            item["media"].shape[0], proc.num_frames)
        expected.append(_expected_annotations(item, sel))
    assert {t for e in expected for t in e} == set(TASKS)  # every task occurs
    for name in TASKS:
        begin, query = (tok.convert_tokens_to_ids(t) for t in task_tokens(name))
        rows = [b for b, e in enumerate(expected) if name in e]
        target = batch["task_targets"][name]
        assert target["index"].tolist() == rows
        assert target["ids"] == [items[b]["id"] for b in rows]
        for b in range(len(items)):
            n_begin, n_query = int((ids[b] == begin).sum()), int((ids[b] == query).sum())
            assert (n_begin, n_query) == ((1, 1) if b in rows else (0, 0)), (name, items[b]["id"])
        for i, b in enumerate(rows):
            q = int(target["query_position"][i])
            assert ids[b, q] == query and ids[b, q - 1] == begin
            assert labels[b, q - 1] == begin and labels[b, q] == IGNORE_INDEX
            assert labels[b, q + 1] == tok.eos_token_id  # the end-of-turn token follows, labelled
            want = expected[b][name]
            if name == "region":
                assert torch.equal(target["boxes"][i], want["boxes"]) and int(target["frame"][i]) == want["frame"]
            elif name == "temporal":
                assert torch.equal(target["spans"][i], want["spans"])
            elif name == "mask":
                t = want["masks"].shape[0]
                assert torch.equal(target["masks"][i, :t], want["masks"]) and not target["masks"][i, t:].any()
                assert target["frame_valid"][i].tolist() == want["frame_valid"].tolist() + [False] * (
                    target["masks"].shape[1] - t)
                assert target["sizes"][i].tolist() == list(want["masks"].shape[-2:])
            else:
                assert torch.equal(target["init_boxes"][i], want["init_boxes"])
                assert target["init_frames"][i] == want["init_frames"]  # where the box prompt is
                assert torch.equal(target["boxes"][i], want["boxes"]) and torch.equal(target["valid"][i], want["valid"])
    # a region box on a video points at the sampled frame it was annotated on
    for i, b in enumerate(batch["task_targets"]["region"]["index"].tolist()):
        item = items[b]
        if item["media_type"] == "video":
            sel = uniform_indices(item["media"].shape[0], proc.num_frames)
            frame = int(sel[int(batch["task_targets"]["region"]["frame"][i])])
            k = item["box_frames"].tolist().index(frame)
            assert torch.equal(item["boxes"][k], batch["task_targets"]["region"]["boxes"][i])
    # tracking prompts: <|box|> closes the first user turn, its box in input_boxes
    track_rows = batch["task_targets"]["track"]["index"].tolist()
    box_id = tok.convert_tokens_to_ids(BOX_TOKEN)
    assert batch["input_box_index"].tolist() == track_rows
    assert torch.equal(batch["input_boxes"], batch["task_targets"]["track"]["init_boxes"])
    for i, b in enumerate(track_rows):
        p = int(batch["input_box_position"][i])
        assert ids[b, p] == box_id and int((ids[b] == box_id).sum()) == 1 and labels[b, p] == IGNORE_INDEX
        assert tok.decode(ids[b, p + 1 : p + 3]) == "\n<|assistant|>"
    assert int((ids == box_id).sum()) == len(track_rows)
    finite_loss(model, batch)


def test_annotations_empty_on_the_sampled_frames_add_no_task_tokens(model):
    """Sampled frames 1, 3, 5, 7 of 8: a box, mask or track only on frame 0
    is not seen by the model, so the item is a plain conversation sample."""
    tok = tok_of(model)
    gen = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(8, 24, 24, dtype=torch.bool)
    masks[0, 2:9, 3:7] = True
    masks[4, 5:9, 5:9] = True  # on a frame that is not sampled, too
    track_boxes = torch.zeros(8, 4)
    track_boxes[0] = torch.tensor([0.1, 0.1, 0.3, 0.4])
    stamps = torch.linspace(0.02, 0.98, 8, dtype=torch.float64)  # not the centres: the collator keeps the item's own
    item = {"id": "v-first-frame", "media_type": "video", "media": frames, "timestamps": stamps,
            "conversations": [{"from": "human", "value": "<video>\nWhere is it?"}, {"from": "gpt", "value": "Left."}],
            "boxes": torch.tensor([[0.1, 0.1, 0.3, 0.4]]), "box_frames": torch.tensor([0]),
            "masks": masks, "mask_valid": torch.ones(8, dtype=torch.bool),
            "tracks": [{"object": None, "init_frame": 0, "init_box": track_boxes[0], "boxes": track_boxes,
                        "valid": track_boxes.any(1)}]}
    empty_image = dict(llava_item("empty-mask", turns=1), masks=torch.zeros(40, 56, dtype=torch.bool))
    batch = ConversationCollator(model.processor, tasks=TASKS)([item, empty_image])
    assert all(t["index"].numel() == 0 for t in batch["task_targets"].values())
    assert batch["input_boxes"].shape == (0, 4) and batch["input_box_index"].numel() == 0
    assert [tok.decode(r) for r in labelled_runs(batch["labels"][0])] == ["Left." + tok.eos_token]
    assert torch.equal(batch["timestamps"][0], stamps[[1, 3, 5, 7]].float())
    # the same item with its annotations on frame 3 (sampled, position 1)
    shifted = dict(item, box_frames=torch.tensor([3]), masks=masks.roll(3, 0),
                   tracks=[dict(item["tracks"][0], init_frame=3, boxes=track_boxes.roll(3, 0),
                                valid=track_boxes.roll(3, 0).any(1))])
    batch = ConversationCollator(model.processor, tasks=TASKS)([shifted])
    assert {name: t["index"].tolist() for name, t in batch["task_targets"].items()} == {
        "region": [0], "temporal": [], "mask": [0], "track": [0]}
    assert batch["task_targets"]["region"]["frame"].tolist() == [1]
    assert batch["task_targets"]["mask"]["frame_valid"].tolist() == [[True] * 4]
    assert batch["task_targets"]["mask"]["masks"][0].flatten(1).any(1).tolist() == [False, True, False, True]
    assert batch["task_targets"]["track"]["valid"].tolist() == [[False, True, False, False]]
    finite_loss(model, batch)


def test_the_box_prompt_is_the_tracks_box_on_its_first_sampled_frame(model):
    """Sampled frames 1, 3, 5, 7 of 8: an object that moves from frame 0 on, its init_box (on frame 0, not
    sampled) is not the prompt; its box on frame 1 (position 0) is, in the targets and in input_boxes alike."""
    boxes = torch.tensor([[0.1 * t, 0.1, 0.1 * t + 0.2, 0.3] for t in range(8)])
    item = {"id": "mover", "media_type": "video", "media": torch.zeros(8, 3, 24, 24, dtype=torch.uint8),
            "conversations": [{"from": "human", "value": "<video>\nTrack it."}, {"from": "gpt", "value": "Done."}],
            "tracks": [{"object": None, "init_frame": 0, "init_box": boxes[0], "boxes": boxes,
                        "valid": torch.ones(8, dtype=torch.bool)}]}
    batch = ConversationCollator(model.processor, tasks=TASKS)([item])
    target = batch["task_targets"]["track"]
    assert target["init_frames"].tolist() == [0] and torch.equal(target["init_boxes"], boxes[1][None])
    assert torch.equal(batch["input_boxes"], boxes[1][None])
    assert torch.equal(target["boxes"][0], boxes[[1, 3, 5, 7]])
    finite_loss(model, batch)


def test_masks_of_different_sizes_are_resized_to_the_largest(model):
    small = torch.zeros(20, 28, dtype=torch.bool)
    small[3:9, 5:20] = True
    large = torch.zeros(40, 56, dtype=torch.bool)
    large[10:30, 1:4] = True
    items = [dict(llava_item("small", turns=1), masks=small), dict(llava_item("large", turns=1), masks=large)]
    items[0]["media"] = items[0]["media"][:, :20, :28]
    target = ConversationCollator(model.processor, tasks=TASKS)(items)["task_targets"]["mask"]
    assert target["masks"].shape == (2, 1, 40, 56) and target["masks"].dtype == torch.bool
    assert target["sizes"].tolist() == [[20, 28], [40, 56]]
    assert torch.equal(target["masks"][0, 0], small.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(target["masks"][1, 0], large) and target["frame_valid"].tolist() == [[True], [True]]


def test_unconfigured_annotations_are_plain_samples_unless_strict(model, items):
    tok = tok_of(model)
    masked = [i for i in items if i["masks"] is not None][:2]
    batch = ConversationCollator(model.processor, tasks=["region"])(masked)
    assert set(batch["task_targets"]) == {"region"} and batch["task_targets"]["region"]["index"].numel() == 0
    for name in TASKS:
        for token in task_tokens(name):
            assert not (batch["input_ids"] == tok.convert_tokens_to_ids(token)).any()
    for b, item in enumerate(masked):
        assert [tok.decode(r) for r in labelled_runs(batch["labels"][b])] == [
            item["conversations"][-1]["value"] + tok.eos_token]
    with pytest.raises(ValueError, match=rf"sample {masked[0]['id']!r}: field 'masks'.*strict_tasks"):
        ConversationCollator(model.processor, tasks=["region"], strict_tasks=True)(masked)


def test_task_configuration_errors(model):
    from tpo.models.tokenizer import TinyTokenizer

    plain = TinyTokenizer()
    proc = MultimodalProcessor(plain, model.processor.preprocess, model.tokens_per_frame, 4)
    with pytest.raises(ValueError, match=r"tasks\.region: .*has no <\|region\|> token"):
        ConversationCollator(proc, tasks=["region"])
    ConversationCollator(proc)  # no tasks: the plain tokenizer is enough
    with pytest.raises(ValueError, match=r"tasks\.grounding\.annotation"):
        ConversationCollator(model.processor, tasks={"grounding": {"annotation": "points"}})
    with pytest.raises(ValueError, match=r"tasks\.grounding\.annotation: 'grounding' is not a default task name"):
        ConversationCollator(model.processor, tasks={"grounding": {}})
    item = llava_item(turns=1)
    item["conversations"][2]["value"] += " <|region|>"
    with pytest.raises(ValueError, match=r"sample 'llava-1'.*already holds the task token <\|region\|>"):
        ConversationCollator(model.processor, tasks=TASKS)([item])


# ------------------------------------------------------------------ preference pairs
def test_preference_pairs(model, items):
    tok = tok_of(model)
    pairs = [i for i in items if i["preference"] is not None]
    assert len(pairs) >= 3 and {i["media_type"] for i in pairs} == {"image", "video"}
    for side in ("right", "left"):
        batch = PreferenceCollator(model.processor, max_length=2048, padding_side=side)(pairs)
        B = len(pairs)
        assert batch["num_pairs"] == B and batch["input_ids"].shape[0] == 2 * B
        assert batch["ids"] == [i["id"] for i in pairs] * 2
        for i, item in enumerate(pairs):
            assert batch["media"][i] is batch["media"][B + i]
            for row, key in ((i, "chosen"), (B + i, "rejected")):
                runs = [tok.decode(r) for r in labelled_runs(batch["labels"][row])]
                assert runs == [item["preference"][key] + tok.eos_token]
                assert tok.decode(row_ids(batch, row)) == expected_text(model, item, batch["media"][i].shape[0],
                                                                       item["preference"][key])
            prompts = []
            for row in (i, B + i):
                ids, lab = row_ids(batch, row), batch["labels"][row][batch["attention_mask"][row].bool()]
                prompts.append(ids[: int((lab != IGNORE_INDEX).nonzero()[0])])
            assert torch.equal(prompts[0], prompts[1])
        finite_loss(model, batch)


def test_preference_truncation_and_errors(model, items):
    tok = tok_of(model)
    item = llava_item(turns=1, preference={"prompt": "<image>\nWhat colour is the circle?",
                                           "chosen": "It is red, a deep and even red. " * 6, "rejected": "Blue."})
    item["conversations"] = item["conversations"][:2]
    full = PreferenceCollator(model.processor, max_length=None)([item])
    longest = int(full["attention_mask"][0].sum())
    batch = PreferenceCollator(model.processor, max_length=longest - 7)([item])
    assert batch["num_truncated"] == 1 and batch["truncated_tokens"].tolist() == [7, 0]
    assert int(batch["attention_mask"][0].sum()) == longest - 7
    chosen = [t for r in labelled_runs(batch["labels"][0]) for t in r]
    assert chosen[-1] == tok.eos_token_id
    assert chosen[:-1] == [t for r in labelled_runs(full["labels"][0]) for t in r][: len(chosen) - 1]
    assert torch.equal(batch["input_ids"][1, : int(batch["attention_mask"][1].sum())], row_ids(full, 1))
    with pytest.raises(ValueError, match=r"sample 'llava-1'.*max_length=12"):
        PreferenceCollator(model.processor, max_length=12)([item])
    plain = next(i for i in items if i["preference"] is None)
    with pytest.raises(ValueError, match=rf"sample {plain['id']!r}: field 'preference'"):
        PreferenceCollator(model.processor)([plain])
    wrong = dict(item, preference=dict(item["preference"], prompt="something else"))
    with pytest.raises(ValueError, match=r"sample 'llava-1': field 'preference.prompt'"):
        PreferenceCollator(model.processor)([wrong])


# ------------------------------------------------------------------ bad input, configs
def test_bad_items_name_the_sample_and_field(model):
    collate = ConversationCollator(model.processor)
    cases = [
        (dict(llava_item("bad-media"), media=torch.zeros(40, 56, dtype=torch.uint8)), r"'bad-media': field 'media'"),
        (dict(llava_item("bad-end"), conversations=llava_item()["conversations"][:2]),
         r"'bad-end': field 'conversations'.*ends with a user turn"),
        (dict(llava_item("no-placeholder"), conversations=[{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Hello"}]),
         r"'no-placeholder': field 'conversations'.*0 media placeholder"),
        (dict(llava_item("role"), conversations=[{"from": "robot", "value": "<image>"}]),
         r"'role': field 'conversations\[0\]\.from'"),
        (dict(llava_item("kind"), media_type="audio"), r"'kind': field 'media_type'"),
    ]
    for item, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            collate([llava_item("fine"), item])


def test_build_collator_from_a_config(model):
    c = build_collator({"type": "ConversationCollator", "max_length": 512, "padding_side": "left", "tasks": ["region"]},
                       model.processor)
    assert isinstance(c, ConversationCollator) and c.max_length == 512 and c.padding_side == "left"
    assert c.tasks == {"region": "boxes"}
    p = build_collator({"type": "PreferenceCollator", "max_length": 256}, model.processor)
    assert isinstance(p, PreferenceCollator) and p.max_length == 256
    with pytest.raises(KeyError, match=r"collator\.max_len: ConversationCollator got an unexpected argument"):
        build_collator({"type": "ConversationCollator", "max_len": 512}, model.processor)
    with pytest.raises(KeyError, match=r"collator\.type: unknown collator 'Collator'"):
        build_collator({"type": "Collator"}, model.processor)
    with pytest.raises(ValueError, match=r"padding_side"):
        build_collator({"type": "PreferenceCollator", "padding_side": "middle"}, model.processor)


def test_task_tokens_at_the_start_of_the_answer(model, items):
    tok = tok_of(model)
    item = next(i for i in items if i["meta"].get("task") == "grounding")
    start = ConversationCollator(model.processor, tasks=TASKS, task_token_position="start")([item])
    end = ConversationCollator(model.processor, tasks=TASKS)([item])
    begin_id, query_id = tok.convert_tokens_to_ids(["<|region|>", "<|region_query|>"])
    for batch in (start, end):
        row = batch["input_ids"][0].tolist()
        assert row.count(begin_id) == 1 and row.index(query_id) == row.index(begin_id) + 1
        assert batch["labels"][0, row.index(begin_id)] == begin_id
        assert batch["labels"][0, row.index(query_id)] == -100
    labelled = [t for t in start["labels"][0].tolist() if t != -100]
    assert labelled[0] == begin_id  # the first thing the model answers is the task token
    assert [t for t in end["labels"][0].tolist() if t != -100][0] != begin_id
    with pytest.raises(ValueError, match="task_token_position"):
        ConversationCollator(model.processor, tasks=TASKS, task_token_position="middle")


def test_assign_mask_marks_every_task_decision(model, items):
    """Each begin token, and in each answer without one the token a begin token
    would take: the first answer token ("start") or the end-of-turn ("end")."""
    tok = tok_of(model)
    begins = set(tok.convert_tokens_to_ids([task_tokens(n)[0] for n in TASKS]))
    chat = llava_item(turns=3)  # three answers, no task
    for position in ("start", "end"):
        collator = ConversationCollator(model.processor, tasks=TASKS, task_token_position=position)
        batch = collator(items + [chat])
        labels, mask = batch["labels"], batch["assign_mask"]
        assert mask.dtype == torch.bool and mask.shape == labels.shape
        assert not (mask & (labels == IGNORE_INDEX)).any()
        for b in range(labels.shape[0]):
            runs = labelled_runs(labels[b])  # one run per answer (its text, task and end-of-turn tokens)
            marked = labels[b][mask[b]].tolist()
            begin_here = [t for t in labels[b].tolist() if t in begins]
            if begin_here:  # task answers: exactly the begin tokens are marked
                assert marked == begin_here, (position, b)
                first = [j for j, t in enumerate(labels[b].tolist()) if t in begins][0]
                assert (labels[b, first - 1] == IGNORE_INDEX) == (position == "start")  # the answer's first token
            else:  # every answer is a decision not to emit a task token
                want = [run[0] if position == "start" else tok.eos_token_id for run in runs]
                assert marked == want, (position, b, marked, want)
        assert len(labelled_runs(labels[-1])) == 3 and int(mask[-1].sum()) == 3
        left = ConversationCollator(model.processor, tasks=TASKS, task_token_position=position,
                                    padding_side="left")(items + [chat])
        for b in range(labels.shape[0]):  # padding moves the marks with the tokens
            assert labels[b][mask[b]].tolist() == left["labels"][b][left["assign_mask"][b]].tolist()
    assert "assign_mask" not in ConversationCollator(model.processor)(items)  # no tasks, no decisions


def test_a_template_that_wraps_the_answer_cannot_place_the_task_decision(model, items):
    tok = copy.deepcopy(tok_of(model))
    # "Answer: " written before each assistant answer, after the generation prompt
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
        "{% if m['role'] == 'assistant' %}Answer: {% endif %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    proc = MultimodalProcessor(tok, model.processor.preprocess, model.tokens_per_frame, model.processor.num_frames)
    grounding = next(i for i in items if i["meta"].get("task") == "grounding")
    with pytest.raises(ValueError, match=r"first task token is its token \d+.*'start' puts it at 0.*chat template"):
        ConversationCollator(proc, tasks=TASKS, task_token_position="start")([grounding])
    ConversationCollator(proc, tasks=TASKS, task_token_position="end")([grounding])  # after the text: found


def test_truncation_cuts_the_text_after_task_tokens_at_the_start(model):
    """task_token_position="start": the answer's task tokens lead, its text follows and is what is cut."""
    tok = tok_of(model)
    long = "frame 0: [0.1, 0.2, 0.3, 0.4]; " * 8
    item = llava_item(sid="box-long", turns=1, answer=long, boxes=torch.tensor([[0.1, 0.1, 0.5, 0.5]]),
                      box_frames=torch.tensor([0]))
    collator = ConversationCollator(model.processor, tasks=TASKS, task_token_position="start", max_length=None)
    full = collator([item])
    n = full["input_ids"].shape[1]
    begin, query = (tok.convert_tokens_to_ids(t) for t in task_tokens("region"))
    batch = ConversationCollator(model.processor, tasks=TASKS, task_token_position="start", max_length=n - 20)([item])
    assert batch["input_ids"].shape[1] == n - 20 and batch["truncated_tokens"].tolist() == [20]
    full_lab = [t for r in labelled_runs(full["labels"][0]) for t in r]
    cut_lab = [t for r in labelled_runs(batch["labels"][0]) for t in r]
    assert full_lab[0] == begin and full_lab[-1] == tok.eos_token_id
    assert cut_lab == full_lab[: len(full_lab) - 21] + full_lab[-1:]  # the text's last 20 tokens went
    q = int(batch["task_targets"]["region"]["query_position"][0])
    assert batch["input_ids"][0, q] == query and batch["input_ids"][0, q - 1] == begin
    assert batch["labels"][0][batch["assign_mask"][0]].tolist() == [begin]
    finite_loss(model, batch)
    # what cannot be cut: the prompt, the task tokens (and the space after them) and the end-of-turn
    text = len(full_lab) - 2  # the labelled text: all but the begin token and the end-of-turn
    minimal = n - text
    ConversationCollator(model.processor, tasks=TASKS, task_token_position="start", max_length=minimal)([item])
    with pytest.raises(ValueError, match=r"sample 'box-long': cannot fit max_length=.*task and end-of-turn tokens"):
        ConversationCollator(model.processor, tasks=TASKS, task_token_position="start",
                             max_length=minimal - 1)([item])
