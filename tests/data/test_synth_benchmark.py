"""The synthetic benchmark's ground truth, checked against the rendered pixels
(read with numpy/Pillow, shapes found by their exact colour), not against the
generator's internal state."""
import hashlib
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tpo.data.schema import decode_mask, load_samples
from tpo.data.synth import (
    COLORS,
    REGIONS,
    describe,
    fmt_time,
    main,
    make_scene,
    mask_box,
    region_of,
    stencil,
    synthesize,
)
from tpo.data.video import frame_timestamps, span_frame_mask


def all_samples(bench):
    _, _, samples = bench
    return [s for split in ("train", "val", "test") for s in samples[split]]


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


TIME = r"(\d\.\d+)"


def frame_at(time, T):
    """The frame that holds a written time (frame i covers [i/T, (i+1)/T), tpo.data.video)."""
    return math.floor(Fraction(time) * T)


def frames_in(start, end, T):
    """The frames a written span holds (their centres lie in it, tpo.data.video)."""
    return np.flatnonzero(span_frame_mask((float(start), float(end)), frame_timestamps(np.arange(T), T))).tolist()


class Pixels:
    """What the frames of one medium show, per colour."""

    def __init__(self, root, media, helpers):
        color_mask = helpers.color_mask
        self.frames = helpers.load_frames(root, media)
        self.T = self.frames.shape[0]
        self.masks = {c: color_mask(self.frames, rgb) for c, rgb in COLORS.items()}
        self.colors = [c for c, m in self.masks.items() if m.any()]
        self.background = ~np.any(np.stack(list(self.masks.values())), axis=0)

    def frames_of(self, color):
        return [t for t in range(self.T) if self.masks[color][t].any()]

    def moving_frames(self, color):
        """Frames on which the shape is displaced: its pixels changed and the
        change covers or uncovers background (occlusion alone never does)."""
        m = self.masks[color]
        out = []
        for t in range(1, self.T):
            if m[t].any() and m[t - 1].any():
                delta = m[t] ^ m[t - 1]
                if (delta & (self.background[t] | self.background[t - 1])).any():
                    out.append(t)
        return out

    def direction(self, color, t):
        m = self.masks[color]
        (y1, x1), (y0, x0) = np.argwhere(m[t]).mean(0), np.argwhere(m[t - 1]).mean(0)
        dx, dy = x1 - x0, y1 - y0
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def color_of(name):
    return name.split()[0]


@pytest.fixture(scope="module")
def pixels(bench, helpers):
    root = bench[0]
    cache = {}

    def get(media):
        if media not in cache:
            cache[media] = Pixels(root, media, helpers)
        return cache[media]

    return get


def test_files_validate_and_summary_adds_up(bench):
    out, summary, samples = bench
    n = 0
    for split in ("train", "val", "test"):
        loaded = load_samples(out / f"{split}.jsonl")  # the validator accepts every sample
        assert len(loaded) == len(samples[split]) == summary["splits"][split]["samples"]
        n += len(loaded)
    assert n == summary["num_samples"] == sum(summary["tasks"].values())
    assert sum(summary["question_types"].values()) == summary["tasks"]["qa"]
    assert sum(summary["media"].values()) == summary["num_scenes"] == 30
    assert all(summary["tasks"][t] > 0 for t in summary["tasks"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k not in ("seconds", "samples_per_second")}
    assert summary["localisation"].get("space", 0) > 0 and summary["localisation"].get("time", 0) > 0


def test_boxes_are_tight_around_the_shape_pixels(bench, pixels):
    checked = 0
    for s in all_samples(bench):
        if s["meta"]["task"] != "grounding":
            continue
        px = pixels(s["media"])
        m = px.masks[color_of(s["meta"]["object"])]
        if px.T == 1:
            assert np.allclose(s["boxes"], tight_box(m[0]), atol=1e-12)
        else:
            assert [b["frame"] for b in s["boxes"]] == px.frames_of(color_of(s["meta"]["object"]))
            for b in s["boxes"]:
                assert np.allclose(b["box"], tight_box(m[b["frame"]]), atol=1e-12)
        checked += 1
    assert checked == 30


def test_tracks_follow_the_shape_from_its_first_box(bench, pixels):
    checked = 0
    for s in all_samples(bench):
        if s["meta"]["task"] != "tracking":
            continue
        (track,) = s["tracks"]
        color = color_of(track["object"])
        px = pixels(s["media"])
        present = px.frames_of(color)
        assert track["init_frame"] == present[0]
        assert np.allclose(track["init_box"], tight_box(px.masks[color][present[0]]), atol=1e-12)
        assert [b["frame"] for b in track["boxes"]] == list(range(present[0], px.T))
        for b in track["boxes"]:
            if b["frame"] in present:
                assert np.allclose(b["box"], tight_box(px.masks[color][b["frame"]]), atol=1e-12)
            else:
                assert b["box"] is None
        checked += 1
    assert checked > 0


def test_tracks_follow_a_moving_shape_where_the_video_has_one(bench, pixels):
    """A static shape is tracked by keeping its first box; a moving one tells a tracker from that."""
    with_movers = 0
    for s in all_samples(bench):
        if s["meta"]["task"] != "tracking":
            continue
        px = pixels(s["media"])
        movers = {c for c in px.colors if px.moving_frames(c)}
        if movers:
            with_movers += 1
            assert color_of(s["tracks"][0]["object"]) in movers, (s["id"], movers)
    assert with_movers >= 5


def test_masks_decode_to_the_visible_pixels(bench, pixels):
    checked = 0
    for s in all_samples(bench):
        if s["meta"]["task"] != "segmentation":
            continue
        px = pixels(s["media"])
        m = px.masks[color_of(s["meta"]["object"])]
        entries = [{"frame": 0, "mask": s["masks"]}] if px.T == 1 else s["masks"]
        assert [e["frame"] for e in entries] == list(range(px.T))
        for e in entries:
            rle = {"size": e["mask"]["size"], "counts": e["mask"]["counts"].encode()}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), m[e["frame"]])
            assert np.array_equal(decode_mask(e["mask"]), m[e["frame"]])
        checked += 1
    assert checked == 30


def test_spans_match_the_frames_of_the_event(bench, pixels):
    kinds = set()
    for s in all_samples(bench):
        if s["meta"]["task"] != "temporal_grounding":
            continue
        px = pixels(s["media"])
        color, kind = color_of(s["meta"]["object"]), s["meta"]["event"]
        present = px.frames_of(color)
        assert present == list(range(present[0], present[-1] + 1))  # never hidden while present
        if kind == "visible":
            frames = present
        elif kind == "enter":
            assert present[0] > 0
            frames = [present[0]]
        elif kind == "leave":
            assert present[-1] < px.T - 1
            frames = [present[-1] + 1]
        else:
            frames = px.moving_frames(color)
            assert frames == list(range(frames[0], frames[-1] + 1))
        (span,) = s["spans"]
        assert span == [frames[0] / px.T, (frames[-1] + 1) / px.T]
        assert frames_in(*span, px.T) == frames
        # the answer's text: the same frames, its start inside the first and its end inside the last or on its end
        start, end = re.fullmatch(rf"From {TIME} to {TIME}\.", s["conversations"][1]["value"]).groups()
        assert frames_in(start, end, px.T) == frames
        assert frame_at(start, px.T) == frames[0] and frames[-1] / px.T < float(end) <= span[1]
        kinds.add(kind)
    assert kinds == {"visible", "enter", "leave", "move"}


@pytest.mark.parametrize("T", [4, 7, 8, 30, 50, 51, 300])
def test_written_times_lie_in_the_frame_they_describe(T):
    """A frame's start is written inside it, its end inside it or on its end, and a span so written holds
    the frames of the exact span [a/T, (b+1)/T]."""
    for i in range(T):
        assert frame_at(fmt_time(i, T), T) == i
        assert Fraction(i, T) < Fraction(fmt_time(i, T, end=True)) <= Fraction(i + 1, T)
    for a, b in [(0, T - 1), (1, 1), (1, T // 2), (T // 2, T - 2)]:
        assert frames_in(fmt_time(a, T), fmt_time(b, T, end=True), T) == list(range(a, b + 1))


def test_regions_are_those_of_the_shapes_box_centre():
    """A shape centred on pixel c has its box centred at c + 0.5: the region is the cell that holds that."""
    size, r = 64, 6
    for c in range(r, size - r):
        m = np.zeros((size, size), bool)
        m[c - r:c + r + 1, c - r:c + r + 1] = stencil("square", r)
        x1, y1, x2, y2 = mask_box(m)
        col, row = min(2, int(1.5 * (x1 + x2))), min(2, int(1.5 * (y1 + y2)))
        assert region_of(c, c, size, size) == REGIONS[3 * row + col], c


def test_descriptions_mention_every_event(bench, pixels):
    scenes = 0
    for s in all_samples(bench):
        if s["meta"]["task"] != "caption":
            continue
        px = pixels(s["media"])
        desc = s["description"]
        assert s["conversations"][1]["value"] == " ".join(desc)
        for color in px.colors:  # every shape is introduced in the first sentence
            assert re.search(rf"\b{color} \w+\b", desc[0]), (color, desc[0])
        if px.T == 1:
            for color in px.colors:
                assert any(re.fullmatch(rf"The {color} \w+ is at the [a-z ]+\.", d) for d in desc), color
            continue
        text = "\n".join(desc)
        for color in px.colors:
            present = px.frames_of(color)
            if present[0] == 0:
                assert re.search(rf"^At the start, the {color} \w+ is at the [a-z ]+\.$", text, re.M), (color, text)
            else:
                m = re.search(rf"^At {TIME}, the {color} \w+ enters at", text, re.M)
                assert m and frame_at(m.group(1), px.T) == present[0], (color, text)
            if present[-1] < px.T - 1:
                m = re.search(rf"^At {TIME}, the {color} \w+ leaves", text, re.M)
                assert m and frame_at(m.group(1), px.T) == present[-1] + 1, (color, text)
            moving = px.moving_frames(color)
            if moving:
                d = px.direction(color, moving[0])
                assert all(px.direction(color, t) == d for t in moving)
                m = re.search(rf"^From {TIME} to {TIME}, the {color} \w+ moves {d}\b", text, re.M)
                assert m and frames_in(*m.groups(), px.T) == moving, (color, text)
            else:
                assert not re.search(rf"the {color} \w+ moves", text)
        at_end = [c for c in px.colors if px.masks[c][-1].any()]
        last = desc[-1]
        assert last.startswith("At the end,")
        assert sorted(re.findall(r"the (\w+) \w+", last)) == sorted(at_end)
        scenes += 1
    assert scenes > 10


def answer_of(s):
    meta = s["meta"]
    given = s["conversations"][1]["value"]
    if meta["answer_type"] == "mc":
        assert meta["options"][ord(given) - 65] == meta["answer_text"]
    else:
        assert given == meta["answer_text"]
    return meta["answer_text"]


def test_answers_agree_with_the_pixels(bench, pixels):
    checked = {}
    for s in all_samples(bench):
        if s["meta"]["task"] != "qa":
            continue
        px = pixels(s["media"])
        question = s["conversations"][0]["value"].split("\n")[1]
        answer = answer_of(s)
        if m := re.fullmatch(rf"How many shapes are visible at {TIME}\?", question):
            t = frame_at(m.group(1), px.T)
            assert int(answer) == sum(px.masks[c][t].any() for c in px.colors)
        elif m := re.fullmatch(r"In which direction does the (\w+) \w+ move\?", question):
            moving = px.moving_frames(m.group(1))
            assert answer == px.direction(m.group(1), moving[0])
        elif m := re.fullmatch(r"Which appears first, the (\w+) \w+ or the (\w+) \w+\?", question):
            a, b = px.frames_of(m.group(1))[0], px.frames_of(m.group(2))[0]
            assert a != b
            assert color_of(answer.removeprefix("the ")) == (m.group(1) if a < b else m.group(2))
        elif m := re.fullmatch(rf"What colour is the shape that enters at {TIME}\?", question):
            t = frame_at(m.group(1), px.T)
            assert [c for c in px.colors if px.frames_of(c)[0] == t] == [answer]
        elif m := re.fullmatch(rf"What happens at {TIME}\?", question):
            t = frame_at(m.group(1), px.T)
            am = re.fullmatch(r"the (\w+) \w+ (enters|leaves|starts moving (\w+))", answer)
            color, verb = am.group(1), am.group(2)
            present = px.frames_of(color)
            if verb == "enters":
                assert present[0] == t > 0
            elif verb == "leaves":
                assert present[-1] + 1 == t
            else:
                assert px.moving_frames(color)[0] == t and px.direction(color, t) == am.group(3)
        else:
            continue
        key = " ".join(question.split()[:2])
        checked[key] = checked.get(key, 0) + 1
    assert len(checked) == 5, checked


def test_preferences_choose_the_ground_truth(bench):
    for s in all_samples(bench):
        if s["meta"]["task"] != "preference":
            continue
        pref = s["preference"]
        assert pref["prompt"] == s["conversations"][-1]["value"]
        assert pref["chosen"] != pref["rejected"]
        same_scene = [q for q in all_samples(bench) if q["meta"]["scene"] == s["meta"]["scene"]
                      and q["meta"]["task"] == "qa" and q["meta"]["question_type"] == s["meta"]["question_type"]]
        assert pref["chosen"] in {q["meta"]["answer_text"] for q in same_scene}


def _question_text(sample):
    """The question of a QA or preference sample (the line after the media token, options left out)."""
    return sample["conversations"][0]["value"].split("\n")[1]


def test_preference_pairs_all_gives_a_pair_per_question(tmp_path):
    one = synthesize(tmp_path / "one", num=24, seed=11)
    every = synthesize(tmp_path / "all", num=24, seed=11, preference_pairs="all")
    assert one["preference_pairs"] == "one" and every["preference_pairs"] == "all"
    assert one["tasks"]["preference"] == 24
    assert every["tasks"]["preference"] == every["tasks"]["qa"] > 24  # one per question
    assert {k: v for k, v in every["tasks"].items() if k != "preference"} == \
        {k: v for k, v in one["tasks"].items() if k != "preference"}
    checked = 0
    for split in ("train", "val", "test"):
        rows_one = [json.loads(line) for line in (tmp_path / "one" / f"{split}.jsonl").read_text().splitlines()]
        rows_all = [json.loads(line) for line in (tmp_path / "all" / f"{split}.jsonl").read_text().splitlines()]
        by_id = {r["id"]: r for r in rows_all}
        assert all(by_id[r["id"]] == r for r in rows_one)  # "all" adds samples and changes none
        scenes = {}
        for r in rows_all:
            scenes.setdefault(r["meta"]["scene"], []).append(r)
        for rows in scenes.values():
            qa = {_question_text(r): r["meta"] for r in rows if r["meta"]["task"] == "qa"}
            pairs = [r for r in rows if r["meta"]["task"] == "preference"]
            assert sorted(_question_text(r) for r in pairs) == sorted(qa)  # every question once
            for r in pairs:
                meta, pref = qa[_question_text(r)], r["preference"]
                assert pref["prompt"] == r["conversations"][0]["value"]
                assert r["meta"]["question_type"] == meta["question_type"]
                assert pref["chosen"] == meta["answer_text"]  # the answer the QA sample gives
                wrong = [o for o in meta["options"] if o != meta["answer_text"]] if "options" in meta else None
                assert pref["rejected"] != pref["chosen"]
                if wrong is not None:
                    assert pref["rejected"] in wrong
                checked += 1
    assert checked == every["tasks"]["preference"]
    assert load_samples(tmp_path / "all" / "train.jsonl")  # the validator accepts the new samples


def test_preference_pairs_all_rejects_every_wrong_option_sometimes(tmp_path):
    """The rejected answer is drawn among the question's wrong options, not always the same one."""
    synthesize(tmp_path, num=60, seed=2, preference_pairs="all")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    rejected = {}
    for r in rows:
        if r["meta"]["task"] == "preference" and r["meta"]["question_type"] == "direction":
            rejected.setdefault(r["preference"]["chosen"], set()).add(r["preference"]["rejected"])
    assert rejected and all(len(v) >= 2 for v in rejected.values()), rejected


def test_the_answers_text_alone_does_not_give_pairs_away(tmp_path):
    """A blind ranker, which scores an answer by how much more often it is chosen than rejected in the
    training pairs of its question type (by its whole text, and by its words other than colours and
    shapes: "enters", "starts moving left", "2"), ranks held-out pairs near chance: a model can only
    rank them by what the frames show. (Before the count and event options were drawn from the scene's
    own answers, it ranked count pairs 75% and event pairs 63-66% right.)"""
    import math
    from collections import Counter, defaultdict

    from tpo.data.synth import SHAPES

    synthesize(tmp_path, num=400, seed=3, preference_pairs="all")

    def pairs(split):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["meta"]["task"] == "preference":
                yield r["meta"]["question_type"], r["preference"]["chosen"], r["preference"]["rejected"]

    def words(answer):
        return " ".join(w for w in answer.split() if w not in COLORS and w not in SHAPES and w != "the")

    for feature in (lambda a: a, words):
        chosen, rejected = defaultdict(Counter), defaultdict(Counter)
        for qtype, c, r in pairs("train"):
            chosen[qtype][feature(c)] += 1
            rejected[qtype][feature(r)] += 1

        def score(qtype, answer):
            f = feature(answer)
            return math.log((chosen[qtype][f] + 1) / (rejected[qtype][f] + 1))

        right = defaultdict(list)
        for qtype, c, r in [*pairs("val"), *pairs("test")]:
            sc, sr = score(qtype, c), score(qtype, r)
            right[qtype].append(1.0 if sc > sr else 0.5 if sc == sr else 0.0)
        accuracy = {k: sum(v) / len(v) for k, v in right.items()}
        overall = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
        assert overall < 0.56, (overall, accuracy)
        assert accuracy["count"] < 0.6 and accuracy["event"] < 0.6, accuracy


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_any_worker_count(tmp_path):
    synthesize(tmp_path / "a", num=12, seed=5)
    synthesize(tmp_path / "b", num=12, seed=5, workers=2)
    synthesize(tmp_path / "c", num=12, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_splits_share_no_scene(bench):
    out, _, samples = bench
    scenes, media, contents = {}, {}, {}
    for split, rows in samples.items():
        assert rows, split
        assert all(r["meta"]["split"] == split for r in rows)
        scenes[split] = {r["meta"]["scene"] for r in rows}
        media[split] = {r["media"] for r in rows}
        contents[split] = {hashlib.sha256((out / m).read_bytes()).hexdigest() for m in media[split]}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not scenes[a] & scenes[b]
        assert not media[a] & media[b]
        assert not contents[a] & contents[b]


def test_main_writes_files_and_prints_the_summary(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--num", "5", "--seed", "1", "--frames", "6", "--size", "48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_scenes"] == 5 and printed["frames"] == 6 and printed["size"] == 48
    assert sum(len(load_samples(tmp_path / f"{s}.jsonl")) for s in ("train", "val", "test")) == printed["num_samples"]
    video = next((tmp_path / "media").glob("*.npy"))
    assert np.load(video).shape == (6, 48, 48, 3)
    assert printed["preference_pairs"] == "one"
    assert main(["--out", str(tmp_path / "all"), "--num", "5", "--seed", "1", "--preference-pairs", "all"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preference_pairs"] == "all" and printed["tasks"]["preference"] == printed["tasks"]["qa"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="num"):
        synthesize(tmp_path, num=0)
    with pytest.raises(ValueError, match="frames"):
        synthesize(tmp_path, num=1, frames=2)
    with pytest.raises(SystemExit):
        main(["--num", "3"])  # --out is required
    with pytest.raises(ValueError, match="preference_pairs"):
        synthesize(tmp_path, num=1, preference_pairs="every")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num", "3", "--preference-pairs", "every"])


@pytest.mark.parametrize("args, named", [(["--num", "0"], "num"), (["--num", "2", "--objects", "3", "2"], "objects"),
                                         (["--num", "2", "--size", "16"], "size")])
def test_command_line_names_bad_arguments_without_a_traceback(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tpo data synth: error:" in err and named in err and "Traceback" not in err


def test_objects_sets_the_shapes_in_a_scene(tmp_path):
    """``objects`` bounds the number of shapes (the default, 2 to 4, is the benchmark: its scenes are the same
    with and without the argument); one shape a scene has no order questions and still checks out."""
    assert {len(make_scene(i, 0).shapes) for i in range(60)} == {2, 3, 4}
    assert all(make_scene(i, 0).labels.tobytes() == make_scene(i, 0, objects=(2, 4)).labels.tobytes()
               for i in range(10))
    assert {len(make_scene(i, 0, objects=(3, 3)).shapes) for i in range(20)} == {3}
    summary = synthesize(tmp_path, num=40, seed=4, objects=(1, 1), preference_pairs="all")
    assert summary["objects"] == [1, 1] and "order" not in summary["question_types"]
    assert {"color", "shape", "count", "position", "event"} <= set(summary["question_types"])
    assert sum(len(load_samples(tmp_path / f"{s}.jsonl")) for s in ("train", "val", "test")) == summary["num_samples"]
    for i in range(40):
        scene = make_scene(i, 4, objects=(1, 1))
        assert len(scene.shapes) == 1 and set(np.unique(scene.labels)) <= {0, 1}
        assert describe(scene)[0].startswith(f"The {'video' if scene.is_video else 'image'} shows one shape on a ")
    assert main(["--out", str(tmp_path / "cli"), "--num", "3", "--objects", "1", "2"]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["objects"] == [1, 2]


def test_max_speed_sets_how_fast_shapes_move(tmp_path):
    """The default is the benchmark (its scenes are the same with and without the argument); a faster setting
    changes the movers' speeds and nothing else drawn before them; the text follows the pixels."""
    assert all(make_scene(i, 0, frames=8, size=32).labels.tobytes()
               == make_scene(i, 0, frames=8, size=32, max_speed=2).labels.tobytes() for i in range(10))
    speeds = {s.speed for i in range(80) for s in make_scene(i, 0, frames=8, size=32, max_speed=6).shapes if s.moves}
    assert speeds == {2, 3, 4, 5, 6}
    for i in range(30):  # what moves, where and how far: the rendered pixels agree
        scene = make_scene(i, 1, frames=4, size=32, max_speed=6)
        for k, shape in enumerate(scene.shapes):
            if shape.moves and shape.present(shape.move_first - 1) and shape.present(shape.move_first):
                before, after = (np.argwhere(scene.visible(k, t)).mean(0)
                                 for t in (shape.move_first - 1, shape.move_first))
                assert abs(np.abs(after - before).max() - shape.speed) < 1.0
    summary = synthesize(tmp_path, num=3, frames=4, size=32, max_speed=5)
    assert summary["max_speed"] == 5
    assert synthesize(tmp_path / "default", num=3, frames=4, size=32)["max_speed"] == 2
    for bad in (1, 9, 2.5, True):
        with pytest.raises(ValueError, match=r"max_speed .* from 2 to size // 4 = 8"):
            synthesize(tmp_path / "bad", num=1, size=32, max_speed=bad)


@pytest.mark.parametrize("objects", [(0, 2), (3, 2), (1, 9), (1,), (1.0, 2), (True, 2)])
def test_bad_objects_are_named(tmp_path, objects):
    with pytest.raises(ValueError, match="objects"):
        synthesize(tmp_path, num=1, objects=objects)


def test_at_least_1000_samples_a_minute(tmp_path):
    summary = synthesize(tmp_path, num=60, seed=0)
    assert summary["samples_per_second"] * 60 >= 1000, summary
