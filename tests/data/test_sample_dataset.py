"""SampleDataset on the synthetic benchmark: built through the registry,
items carry media, conversations, annotations and timestamps that agree with
the pixels of the frames they hold."""
import json

import numpy as np
import pytest
import torch
from tpo.registry import build_dataset

from tpo.data import SampleDataset
from tpo.data.synth import COLORS


@pytest.fixture(scope="module")
def dataset(bench):
    out, _, _ = bench
    return build_dataset(dict(type="SampleDataset", ann_file=str(out / "train.jsonl"), num_frames=4))


def items_of(ds, task):
    return [ds[i] for i, s in enumerate(ds.samples) if s.meta.get("task") == task]


def pixels(item, helpers, obj):
    """[T, H, W] bool: the object's pixels in the item's own frames."""
    media = item["media"].numpy()
    frames = media.transpose(0, 2, 3, 1) if media.ndim == 4 else media.transpose(1, 2, 0)[None]
    return helpers.color_mask(frames, COLORS[obj.split()[0]])


def test_item_layout_and_timestamps(dataset):
    assert len(dataset) > 100
    video = next(dataset[i] for i, s in enumerate(dataset.samples) if s.media.is_video)
    assert video["media_type"] == "video" and video["media"].dtype == torch.uint8
    assert video["media"].shape == (4, 3, 64, 64)
    assert video["frame_indices"].tolist() == [1, 3, 5, 7] and video["num_source_frames"] == 8
    assert video["timestamps"].tolist() == [0.1875, 0.4375, 0.6875, 0.9375]
    assert video["conversations"][0]["from"] == "human" and video["conversations"][0]["value"].startswith("<video>")
    assert video["description"] and video["meta"]["split"] == "train"
    image = next(dataset[i] for i, s in enumerate(dataset.samples) if not s.media.is_video)
    assert image["media_type"] == "image" and image["media"].shape == (3, 64, 64) and "timestamps" not in image


def test_media_match_the_files(dataset, bench, helpers):
    out = bench[0]
    for i in (0, 5, 17):
        item = dataset[i]
        raw = helpers.load_frames(out, json.loads((out / "train.jsonl").read_text().splitlines()[i])["media"])
        if item["media_type"] == "video":
            expect = raw[item["frame_indices"].numpy()].transpose(0, 3, 1, 2)
        else:
            expect = raw[0].transpose(2, 0, 1)
        assert np.array_equal(item["media"].numpy(), expect)


def test_boxes_masks_tracks_on_sampled_frames(dataset, helpers):
    for item in items_of(dataset, "grounding"):
        pix = pixels(item, helpers, item["meta"]["object"])
        present = [t for t in range(pix.shape[0]) if pix[t].any()]
        assert item["box_frames"].tolist() == present
        for box, t in zip(item["boxes"], item["box_frames"]):
            ys, xs = np.nonzero(pix[t])
            assert torch.allclose(box, torch.tensor([xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64,
                                                     (ys.max() + 1) / 64], dtype=torch.float32))
        if item["media_type"] == "video":  # every box, sampled or not, by its source frame
            source = item["source_box_frames"].tolist()
            assert source == sorted(source) and len(source) >= len(present)
            sampled = [source.index(int(item["frame_indices"][t])) for t in item["box_frames"]]
            assert torch.equal(item["source_boxes"][sampled], item["boxes"])
    for item in items_of(dataset, "segmentation"):
        pix = pixels(item, helpers, item["meta"]["object"])
        assert torch.equal(item["masks"], torch.from_numpy(pix if item["media_type"] == "video" else pix[0]))
        if item["media_type"] == "video":
            assert item["mask_valid"].all()
    for item in items_of(dataset, "tracking"):
        (track,) = item["tracks"]
        pix = pixels(item, helpers, track["object"])
        sampled = item["frame_indices"].tolist()
        expect_valid = [pix[i].any() and f >= track["init_frame"] for i, f in enumerate(sampled)]
        assert track["valid"].tolist() == expect_valid


def test_span_frames_are_the_sampled_frames_in_the_span(dataset, helpers):
    checked = 0
    for item in items_of(dataset, "temporal_grounding"):
        if item["meta"]["event"] != "visible":
            continue
        pix = pixels(item, helpers, item["meta"]["object"])
        assert item["span_frames"].shape == (1, 4)
        assert item["span_frames"][0].tolist() == [bool(p.any()) for p in pix]
        checked += 1
    assert checked > 0


def test_preference_items(dataset):
    (item, *_) = items_of(dataset, "preference")
    assert set(item["preference"]) == {"prompt", "chosen", "rejected", "judge"}
    assert item["conversations"][-1]["value"] == item["preference"]["prompt"]


def test_task_filter_and_all_frames(bench):
    out = bench[0]
    ds = SampleDataset(str(out / "val.jsonl"), tasks=["tracking"])
    assert len(ds) > 0 and all(s.meta["task"] == "tracking" for s in ds.samples)
    item = ds[0]
    assert item["media"].shape[0] == 8 and item["frame_indices"].tolist() == list(range(8))
    with pytest.raises(ValueError, match="no sample has a meta.task in"):
        SampleDataset(str(out / "val.jsonl"), tasks=["nothing"])


def test_bad_file_fails_when_built(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "media": "missing.npy", "conversations": [
        {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: sample 'a': field 'media'"):
        build_dataset(dict(type="SampleDataset", ann_file=str(path)))
    with pytest.raises(ValueError, match="num_frames"):
        SampleDataset(str(path), num_frames=0)


def test_load_errors_name_the_sample(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((4, 8, 8, 3), np.uint8))
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"id": "late", "media": "v.npy", "conversations": [
        {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]}) + "\n")
    ds = SampleDataset(str(path))
    np.save(tmp_path / "v.npy", np.zeros((4, 8, 8), np.uint8))  # broken after validation
    with pytest.raises(ValueError, match=r"s.jsonl:1: sample 'late': .*uint8 \[T, H, W, 3\]"):
        ds[0]
