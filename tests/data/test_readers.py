"""Readers of LLaVA, RefCOCO, Charades-STA and TRL preference files, on small
files written here; converted samples pass the validator after a round trip."""
import json

import numpy as np
import pytest
from PIL import Image

from tpo.data.readers import read_charades_sta, read_llava, read_refcoco, read_trl_preference
from tpo.data.schema import load_samples, write_jsonl


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    (tmp_path / "videos").mkdir()
    np.save(tmp_path / "videos" / "v1.npy", np.zeros((6, 8, 8, 3), np.uint8))
    np.save(tmp_path / "videos" / "v2.npy", np.zeros((6, 8, 8, 3), np.uint8))
    return tmp_path


def round_trip(samples, folder):
    out = folder / "out" / "samples.jsonl"
    write_jsonl(samples, out)
    return load_samples(out)


def test_llava_json_and_jsonl(files):
    data = [
        {"id": "1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "2", "image": "b.png", "conversations": [  # no placeholder: added to the first human turn
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "3", "video": "../videos/v1.npy", "conversations": [  # <image> for a video becomes <video>
            {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]},
        {"id": 4, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = files / "llava.json"
    path.write_text(json.dumps(data))
    samples = read_llava(path, media_root=files / "images")
    assert [s.id for s in samples] == ["1", "2", "3", "4"]
    assert samples[1].conversations[0].value == "<image>\nColour?"
    assert samples[1].conversations[2].value == "Sure?"
    assert samples[2].media.kind == "npy" and samples[2].conversations[0].value == "<video>\nWhat happens?"
    assert samples[3].media is None
    again = round_trip(samples, files)
    assert [s.media.paths if s.media else None for s in again] == [s.media.paths if s.media else None for s in samples]
    jsonl = files / "llava.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in data[:2]) + "\n")
    assert [s.id for s in read_llava(jsonl, media_root=files / "images")] == ["1", "2"]


def test_llava_problems_name_entry_id_and_field(files):
    data = [
        {"id": "ok", "image": "a.jpg",
         "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "bad-role", "conversations": [{"from": "bot", "value": "x"}]},
        {"id": "missing", "image": "zzz.jpg", "conversations": [{"from": "human", "value": "x"},
                                                                 {"from": "gpt", "value": "y"}]},
        {"image": "a.jpg", "conversations": []},
    ]
    path = files / "llava.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        read_llava(path, media_root=files / "images")
    msg = str(info.value)
    assert msg.startswith(f"3 problem(s) in {path}")
    assert f"{path}:1: sample 'bad-role': field 'conversations[0]'" in msg
    assert f"{path}:2: sample 'missing': field 'media'" in msg and "zzz.jpg" in msg
    assert f"{path}:3: sample (no id): field 'id'" in msg


def coco_files(folder):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 20}],
        "annotations": [
            # a 10x5 rectangle as a polygon: x 8..18, y 4..9
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [8, 4, 10, 5],
             "segmentation": [[8, 4, 18, 4, 18, 9, 8, 9]]},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 20],
             "segmentation": {"size": [20, 40], "counts": [0, 800]}},
        ],
        "categories": [{"id": 1, "name": "wall"}, {"id": 3, "name": "car"}],
    }
    refs = [
        {"ref_id": 100, "ann_id": 11, "image_id": 1, "split": "train",
         "sentences": [{"sent": "the small car"}, {"sent": "car on the left"}]},
        {"ref_id": 101, "ann_id": 12, "image_id": 2, "split": "val", "sentences": [{"sent": "everything"}]},
    ]
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs.json").write_text(json.dumps(refs))
    return folder / "instances.json", folder / "refs.json"


def test_refcoco_boxes_and_masks(files):
    instances, refs = coco_files(files)
    samples = read_refcoco(instances, refs, files / "images")
    assert [s.id for s in samples] == ["ref100-0", "ref100-1", "ref101-0"]
    first = samples[0]
    assert first.boxes[0].box == (8 / 40, 4 / 20, 18 / 40, 9 / 20)
    assert "the small car" in first.conversations[0].value and first.conversations[0].value.startswith("<image>")
    mask = first.masks[0].decode()
    assert mask.shape == (20, 40)
    ys, xs = np.nonzero(mask)  # the polygon's pixels sit inside its box
    assert xs.min() >= 8 and xs.max() <= 18 and ys.min() >= 4 and ys.max() <= 9 and mask.sum() >= 40
    assert samples[2].masks[0].decode().all()
    assert first.meta["category_id"] == 3 and first.meta["split"] == "train"
    assert [s.id for s in read_refcoco(instances, refs, files / "images", split="val")] == ["ref101-0"]
    assert len(round_trip(samples, files)) == 3


def test_refcoco_problems(files):
    instances, refs = coco_files(files)
    bad = json.loads(refs.read_text())
    bad[0]["ann_id"] = 999
    bad[1]["sentences"] = []
    refs.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as info:
        read_refcoco(instances, refs, files / "images")
    msg = str(info.value)
    assert f"{refs}:0: sample 'ref100': field 'ann_id'" in msg and "999" in msg
    assert f"{refs}:1: sample 'ref101': field 'sentences'" in msg


def test_charades_sta_spans(files):
    ann = files / "charades_sta.txt"
    ann.write_text("v1 2.0 6.0##a person opens a door.\nv2 0 12.5##someone sits down.\n\nv1 7.5 10##they leave.\n")
    samples = read_charades_sta(ann, {"v1": 10.0, "v2": 12.0}, files / "videos", video_ext=".npy")
    assert [s.id for s in samples] == ["v1-1", "v2-2", "v1-4"]
    assert samples[0].spans == [(0.2, 0.6)]
    assert samples[1].spans == [(0.0, 1.0)]  # 12.5 s past a 12 s video: clipped
    assert samples[2].spans == [(0.75, 1.0)]
    assert '"a person opens a door."' in samples[0].conversations[0].value
    assert samples[0].conversations[1].value == "From 0.20 to 0.60."
    assert samples[0].meta["duration_s"] == 10.0
    csv = files / "Charades_v1_test.csv"
    csv.write_text("id,subject,length\nv1,x,10.0\nv2,y,12.0\n")
    assert [s.spans for s in read_charades_sta(ann, csv, files / "videos", ".npy")] == [s.spans for s in samples]
    js = files / "durations.json"
    js.write_text(json.dumps({"v1": 10.0, "v2": 12.0}))
    assert len(read_charades_sta(ann, js, files / "videos", ".npy")) == 3
    assert len(round_trip(samples, files)) == 3


def test_charades_sta_problems(files):
    ann = files / "sta.txt"
    ann.write_text("v1 2 6##ok.\nv1 6 2##backwards.\nv3 1 2##no duration.\nv1 x 2##not a number.\nv1 1 2 no sentence\n"
                   "v1 11 12##after the end.\n")
    with pytest.raises(ValueError) as info:
        read_charades_sta(ann, {"v1": 10.0}, files / "videos", ".npy")
    msg = str(info.value)
    assert msg.startswith(f"5 problem(s) in {ann}")
    assert f"{ann}:2: sample 'v1-2': field 'start/end'" in msg
    assert f"{ann}:3: sample 'v3-3': field 'duration'" in msg
    assert f"{ann}:4: sample 'v1-4': field 'start/end'" in msg
    assert f"{ann}:5: sample (no id): field '<line>'" in msg
    assert f"{ann}:6: sample 'v1-6': field 'start'" in msg


def test_trl_preference_plain_and_conversational(files):
    path = files / "pref.jsonl"
    rows = [
        {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green.", "score_chosen": 9},
        {"id": "c1", "image": "images/a.jpg",
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
         "chosen": [{"role": "assistant", "content": "A black image."}],
         "rejected": [{"role": "assistant", "content": "A cat."}]},
        {"id": "c2", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Add 2 and 2"}],
         "chosen": "4", "rejected": "5"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = read_trl_preference(path)
    assert [s.id for s in samples] == ["pref-1", "c1", "c2"]
    assert samples[0].preference.chosen == "Blue." and samples[0].meta == {"task": "preference", "score_chosen": 9}
    assert samples[1].media.kind == "image" and samples[1].conversations[0].value == "<image>\nDescribe it."
    assert samples[1].preference.rejected == "A cat."
    assert [t.role for t in samples[2].conversations] == ["human", "gpt", "human"]
    assert samples[2].preference.prompt == "Add 2 and 2"
    assert len(round_trip(samples, files)) == 3


def test_trl_preference_problems(files):
    path = files / "pref.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n"
                    + json.dumps({"id": "x", "prompt": [{"role": "wizard", "content": "a"}], "chosen": "b",
                                  "rejected": "c"}) + "\n"
                    + json.dumps({"id": "y", "prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(ValueError) as info:
        read_trl_preference(path)
    msg = str(info.value)
    assert f"{path}:1: sample 'pref-1': field 'rejected': missing" in msg
    assert f"{path}:2: sample 'x': field 'prompt[0]'" in msg
    assert f"{path}:3: sample 'y': field 'preference'" in msg and "same text" in msg


def test_tpo_data_convert_writes_each_format(files, capsys):
    """`tpo data convert FORMAT ... --out OUT.jsonl`: the readers from the command line; the output loads back,
    and an input with problems is one error naming them, with nothing written."""
    from tpo.cli import main

    llava = files / "llava.json"
    llava.write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "Black."}]}]))
    out = files / "out" / "llava.jsonl"
    assert main(["data", "convert", "llava", str(llava), "--media-root", str(files / "images"), "--out", str(out),
                 "--check-media"]) == 0
    assert "wrote 1 sample to" in capsys.readouterr().out and len(load_samples(out)) == 1

    instances, refs = coco_files(files)
    out = files / "out" / "refcoco.jsonl"
    assert main(["data", "convert", "refcoco", str(instances), str(refs), "--image-root", str(files / "images"),
                 "--split", "train", "--out", str(out)]) == 0
    assert [s.id for s in load_samples(out)] == ["ref100-0", "ref100-1"]

    ann = files / "sta.txt"
    ann.write_text("v1 2.0 6.0##a person opens a door.\n")
    durations = files / "durations.json"
    durations.write_text(json.dumps({"v1": 10.0}))
    out = files / "out" / "sta.jsonl"
    assert main(["data", "convert", "charades-sta", str(ann), "--durations", str(durations), "--video-root",
                 str(files / "videos"), "--video-ext", ".npy", "--out", str(out)]) == 0
    assert load_samples(out)[0].spans == [(0.2, 0.6)]

    trl = files / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}) + "\n")
    out = files / "out" / "trl.jsonl"
    assert main(["data", "convert", "trl-preference", str(trl), "--out", str(out)]) == 0
    assert load_samples(out)[0].preference is not None
    capsys.readouterr()

    bad = files / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "image": "a.jpg", "conversations": []}]))
    out = files / "out" / "bad.jsonl"
    assert main(["data", "convert", "llava", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo data convert: error: ") and "conversations" in err and not out.exists()
    assert main(["data", "convert", "llava", str(llava), "--out", str(llava)]) == 2
    assert "give a .jsonl file" in capsys.readouterr().err
    assert main(["data", "convert", "trl-preference", str(trl), "--out", str(trl)]) == 2
    assert "is one of the input files" in capsys.readouterr().err
