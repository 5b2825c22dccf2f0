"""The sample validator: valid files load; each kind of bad sample gets an
error naming the file, the line, the sample id and the field; all problems of
a file come in one ValueError."""
import json

import numpy as np
import pytest
from PIL import Image

from tpo.data.schema import (
    Sample,
    check_rle,
    decode_mask,
    encode_mask,
    load_samples,
    read_samples,
    rle_string_to_counts,
    validate_record,
    write_jsonl,
)


@pytest.fixture
def media(tmp_path):
    """An image (32x48), a 5-frame .npy video, a frame folder and a mask PNG."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    np.save(tmp_path / "vid.npy", rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8))
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 48, 3), i, np.uint8)).save(tmp_path / "frames" / f"{i}.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[4:10, 5:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def image_sample(**extra):
    rec = {"id": "img-1", "media": "img.png",
           "conversations": [{"from": "human", "value": "<image>\nWhere is it?"}, {"from": "gpt", "value": "There."}]}
    rec.update(extra)
    return rec


def video_sample(**extra):
    rec = {"id": "vid-1", "media": "vid.npy",
           "conversations": [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "Then."}]}
    rec.update(extra)
    return rec


def write(folder, records, name="data.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def problems_of(folder, record):
    """The error message for a file whose line 2 is ``record`` (line 1 is valid)."""
    path = write(folder, [image_sample(id="ok"), record])
    with pytest.raises(ValueError) as info:
        load_samples(path)
    return str(info.value), str(path)


def test_valid_samples_of_every_kind_load(media):
    full_rle = encode_mask(np.ones((32, 48), bool))
    records = [
        image_sample(boxes=[0.1, 0.2, 0.5, 0.9], masks="mask.png", description="An image.", meta={"task": "x"}),
        image_sample(id="img-2", boxes=[[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1]], masks=full_rle),
        video_sample(
            boxes=[{"frame": 0, "box": [0.1, 0.1, 0.2, 0.2]}, {"frame": 4, "box": [0.5, 0.5, 1.0, 1.0]}],
            spans=[[0.2, 0.4], [0.0, 1.0]],
            masks=[{"frame": 1, "mask": full_rle}, {"frame": 2, "mask": "mask.png"}],
            tracks=[{"object": "dot", "init_frame": 1, "init_box": [0.1, 0.1, 0.3, 0.3],
                     "boxes": [{"frame": 1, "box": [0.1, 0.1, 0.3, 0.3]}, {"frame": 2, "box": None}]}],
            description=["First.", "Second."],
        ),
        {"id": "frames-1", "media": "frames",
         "conversations": [{"from": "human", "value": "<video>\nA?"}, {"from": "gpt", "value": "B."}]},
        {"id": "list-1", "media": ["frames/0.png", "frames/1.png"],
         "conversations": [{"from": "human", "value": "<video>\nA?"}, {"from": "gpt", "value": "B."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "pref-1", "media": "img.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}],
         "preference": {"prompt": "<image>\nQ?", "chosen": "good", "rejected": "bad", "judge": {"name": "gpt-4v"}}},
    ]
    samples = load_samples(write(media, records))
    assert [s.id for s in samples] == ["img-1", "img-2", "vid-1", "frames-1", "list-1", "text-1", "pref-1"]
    kinds = [s.media.kind if s.media else None for s in samples]
    assert kinds == ["image", "image", "npy", "folder", "frames", None, "image"]
    vid = samples[2]
    assert vid.source.line == 3 and vid.spans == [(0.2, 0.4), (0.0, 1.0)]
    assert [b.frame for b in vid.boxes] == [0, 4]
    assert vid.tracks[0].boxes[1].box is None
    assert vid.masks[1].decode().sum() == 6 * 15
    assert samples[0].masks[0].decode().shape == (32, 48)
    assert samples[1].boxes[1].box == (0.0, 0.0, 1.0, 1.0)
    assert samples[6].preference.judge == {"name": "gpt-4v"}


def test_round_trip_through_write_jsonl(media, tmp_path):
    samples = load_samples(write(media, [video_sample(spans=[[0.2, 0.4]], masks=[{"frame": 0, "mask": "mask.png"}])]))
    out = tmp_path / "elsewhere" / "copy.jsonl"
    write_jsonl(samples, out)
    line = json.loads(out.read_text())
    assert line["media"] == "../vid.npy" and line["masks"][0]["mask"] == "../mask.png"
    again = load_samples(out)
    assert again[0].media.paths == samples[0].media.paths and again[0].spans == samples[0].spans


@pytest.mark.parametrize(
    "record, field, words",
    [
        (image_sample(media="nope.png"), "media", "does not exist"),
        (video_sample(media="gone/"), "media", "does not exist"),
        (image_sample(media=["frames/0.png", "frames/9.png"]), "media", "do not exist"),
        (image_sample(media="img.xyz"), "media", "unknown media type"),
        (image_sample(conversations=[{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]),
         "conversations", "placeholder count mismatch"),
        (image_sample(conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]),
         "conversations", "placeholder count mismatch"),
        (image_sample(conversations=[{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]),
         "conversations", "placeholder count mismatch"),
        ({"id": "t", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
         "conversations", "placeholder count mismatch"),
        (image_sample(conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}]),
         "conversations[1].value", "gpt turn"),
        (image_sample(conversations=[{"from": "gpt", "value": "<image>"}]), "conversations[0].from", "alternate"),
        (image_sample(conversations=[{"from": "robot", "value": "<image>"}]), "conversations[0].from", "robot"),
        (image_sample(conversations=[]), "conversations", "non-empty"),
        (image_sample(boxes=[0.1, 0.2, 1.5, 0.9]), "boxes", "out of range"),
        (image_sample(boxes=[-0.1, 0.2, 0.5, 0.9]), "boxes", "out of range"),
        (image_sample(boxes=[0.6, 0.2, 0.5, 0.9]), "boxes", "x1 < x2"),
        (image_sample(boxes=[0.1, 0.2, 0.5]), "boxes", "4 finite numbers"),
        (image_sample(boxes=[[0.1, 0.2, 0.5, 0.9], [0.1, 0.9, 0.5, 0.2]]), "boxes[1]", "y1 < y2"),
        (video_sample(boxes=[{"frame": 1, "box": [0.1, 0.2, 0.05, 0.9]}]), "boxes[0].box", "x1 < x2"),
        (video_sample(boxes=[{"frame": 9, "box": [0.1, 0.2, 0.5, 0.9]}]), "boxes[0].frame", "past the end"),
        (video_sample(boxes=[0.1, 0.2, 0.5, 0.9]), "boxes[0]", "{frame, box}"),
        (video_sample(spans=[[0.2, 1.2]]), "spans[0]", "out of range"),
        (video_sample(spans=[[0.5, 0.3]]), "spans[0]", "start < end"),
        (video_sample(spans=[[0.5]]), "spans[0]", "[start, end]"),
        (image_sample(spans=[[0.1, 0.3]]), "spans", "need a video"),
        (image_sample(masks={"size": [32, 48], "counts": [10, 20]}), "masks", "bad RLE"),
        (image_sample(masks={"size": [32, 48], "counts": "\x7f\x7f"}), "masks", "bad RLE"),
        (image_sample(masks={"size": [32], "counts": [1536]}), "masks", "bad RLE"),
        (image_sample(masks={"size": [16, 48], "counts": [768]}), "masks", "differs from the media size"),
        (image_sample(masks="missing.png"), "masks", "does not exist"),
        (video_sample(masks=[{"frame": 0, "mask": {"counts": "0"}}]), "masks[0].mask", "bad RLE"),
        (video_sample(tracks=[{"init_frame": 0, "init_box": [0.1, 0.1, 0.2, 0.2]}]), "tracks[0]", "missing boxes"),
        (video_sample(tracks=[{"init_frame": 0, "init_box": [0.1, 0.1, 0.2, 0.2],
                               "boxes": [{"frame": 0, "box": [0.3, 0.3, 0.4, 0.4]}]}]),
         "tracks[0].init_box", "differs"),
        (video_sample(tracks=[{"init_frame": 1, "init_box": [0.1, 0.1, 0.2, 0.2],
                               "boxes": [{"frame": 0, "box": [0.1, 0.1, 0.2, 0.2]}, {"frame": 1, "box": None}]}]),
         "tracks[0].init_box", "the track's box is null"),
        (image_sample(colour="red"), "colour", "unknown field"),
        (image_sample(conversations=[{"from": "human", "value": "<image>", "lang": "en"},
                                     {"from": "gpt", "value": "x"}]), "conversations[0].lang", "unknown field"),
        (image_sample(preference={"prompt": "a", "chosen": "b", "rejected": "c", "score": 1}),
         "preference.score", "unknown field"),
        (image_sample(preference={"prompt": "<image>\nWhere is it?", "chosen": "b"}),
         "preference.rejected", "missing"),
        (image_sample(description=7), "description", "sentences"),
        (image_sample(meta=[1]), "meta", "object"),
        (image_sample(id=""), "id", "non-empty"),
    ],
)
def test_each_problem_names_file_line_id_and_field(media, record, field, words):
    message, path = problems_of(media, record)
    sid = record.get("id") or None
    where = f"{path}:2: sample {sid!r}" if sid else f"{path}:2: sample (no id)"
    assert where in message, message
    assert f"field {field!r}" in message, message
    assert words in message, message
    assert ":1:" not in message  # the valid first line is not blamed


def test_all_problems_of_a_file_in_one_error(media):
    path = write(media, [
        image_sample(id="a", boxes=[0.5, 0.5, 0.1, 0.1]),
        image_sample(id="b"),
        video_sample(id="c", spans=[[0.9, 0.1]], extra=1),
        "not an object",
        image_sample(id="b"),
    ])
    path.write_text(path.read_text() + "{broken json\n")
    with pytest.raises(ValueError) as info:
        load_samples(path)
    message = str(info.value)
    assert message.startswith(f"6 problem(s) in {path}:")
    for expected in (f"{path}:1: sample 'a': field 'boxes'", f"{path}:3: sample 'c': field 'spans[0]'",
                     f"{path}:3: sample 'c': field 'extra'", f"{path}:4: sample (no id): field '<line>'",
                     f"{path}:5: sample 'b': field 'id': duplicate id, first on line 2",
                     f"{path}:6: sample (no id): field '<json>'"):
        assert expected in message, (expected, message)
    samples, problems = read_samples(path)
    assert [s.id for s in samples] == ["b", "b"] and len(problems) == 6


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_samples(tmp_path / "nothing.jsonl")


def test_validate_record_in_memory(media):
    sample, problems = validate_record(image_sample(), root=str(media))
    assert isinstance(sample, Sample) and problems == []
    sample, problems = validate_record(image_sample(boxes=[0, 0, 2, 1]), file="x.jsonl", line=9, root=str(media))
    assert sample is None and str(problems[0]).startswith("x.jsonl:9: sample 'img-1': field 'boxes'")


def test_rle_round_trip_and_string_decoding():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 17)) > 0.6
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str) and check_rle(rle) is None
    assert np.array_equal(decode_mask(rle), mask)
    runs = rle_string_to_counts(rle["counts"])
    assert sum(runs) == 13 * 17
    # column-major runs, as COCO: the list form decodes to the same mask
    assert np.array_equal(decode_mask({"size": [13, 17], "counts": runs}), mask)
    # hand-made: 2x2, first column off, second on -> runs [2, 2]
    assert decode_mask({"size": [2, 2], "counts": [2, 2]}).tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError, match="bad COCO RLE"):
        decode_mask({"size": [2, 2], "counts": [2, 3]})
    assert "ends inside a number" in check_rle({"size": [2, 2], "counts": "o"})
