"""Frames from folders, lists, .npy arrays and video files; uniform sampling
with timestamps that map spans to frames exactly."""
import numpy as np
import pytest
from PIL import Image

from tpo.data import video
from tpo.data.video import (
    frame_timestamps,
    frames_to_span,
    list_frame_files,
    load_clip,
    media_kind,
    span_frame_mask,
    uniform_indices,
    uniform_sample,
    video_frame_count,
)


def numbered_frames(n, h=12, w=10):
    """Frame i is filled with the value 10 * i (so it can be told apart)."""
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(n)])


def test_uniform_indices_hand_cases():
    assert uniform_indices(8, 4).tolist() == [1, 3, 5, 7]  # centres 1, 3, 5, 7 of segments of 2
    assert uniform_indices(10, 3).tolist() == [1, 5, 8]  # floor((0.5, 1.5, 2.5) * 10 / 3)
    assert uniform_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]  # never repeats a frame
    idx, ts = uniform_sample(4, 2)
    assert idx.tolist() == [1, 3] and ts.tolist() == [0.375, 0.875]
    with pytest.raises(ValueError, match="0 frames"):
        uniform_indices(0, 4)
    with pytest.raises(ValueError, match="num_frames"):
        uniform_indices(4, 0)


@pytest.mark.parametrize("total", [1, 5, 8, 13, 30])
def test_spans_map_to_frames_exactly(total):
    ts = frame_timestamps(np.arange(total), total)
    for first in range(total):
        for last in range(first, total):
            span = frames_to_span(first, last, total)
            assert np.flatnonzero(span_frame_mask(span, ts)).tolist() == list(range(first, last + 1))
    # after sampling, a span holds exactly the sampled frames inside it
    idx, sts = uniform_sample(total, 4)
    span = frames_to_span(total // 3, total - 1, total)
    assert [int(i) for i, keep in zip(idx, span_frame_mask(span, sts)) if keep] == [
        int(i) for i in idx if total // 3 <= i]


def test_frames_to_span_rejects_bad_ranges():
    with pytest.raises(ValueError, match="not a range"):
        frames_to_span(3, 2, 8)
    with pytest.raises(ValueError, match="not a range"):
        frames_to_span(0, 8, 8)


def test_folder_list_and_npy_give_the_same_frames(tmp_path):
    frames = numbered_frames(12)
    np.save(tmp_path / "v.npy", frames)
    (tmp_path / "f").mkdir()
    for i, f in enumerate(frames):  # natural order: 2.png before 10.png
        Image.fromarray(f).save(tmp_path / "f" / f"frame_{i}.png")
    files = list_frame_files(str(tmp_path / "f"))
    assert [p.rsplit("_", 1)[1] for p in files[:3]] == ["0.png", "1.png", "2.png"] and files[-1].endswith("_11.png")
    clips = [
        load_clip("npy", [str(tmp_path / "v.npy")], 4),
        load_clip("folder", [str(tmp_path / "f")], 4),
        load_clip("frames", files, 4),
    ]
    for clip in clips:
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == (4, 12, 10, 3)
        assert clip.indices.tolist() == [1, 4, 7, 10] and clip.total == 12
        assert clip.frames[:, 0, 0, 0].tolist() == [10, 40, 70, 100]
        assert np.allclose(clip.timestamps, (np.array([1, 4, 7, 10]) + 0.5) / 12)
    full = load_clip("npy", [str(tmp_path / "v.npy")])
    assert np.array_equal(full.frames, frames)
    assert video_frame_count("folder", [str(tmp_path / "f")]) == 12
    assert media_kind(str(tmp_path / "f")) == "folder" and media_kind(str(tmp_path / "v.npy")) == "npy"


def test_bad_media_get_clear_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"bad.npy.*uint8 \[T, H, W, 3\]"):
        load_clip("npy", [str(tmp_path / "bad.npy")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        load_clip("folder", [str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="unknown media type"):
        media_kind(str(tmp_path / "x.txt"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_clip("frames", [str(tmp_path / "a.png"), str(tmp_path / "b.png")])


def test_video_file_without_a_decoder_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setattr(video, "_import_av", lambda: None)
    monkeypatch.setattr(video, "_torchvision_read_video", lambda: None)
    with pytest.raises(ImportError, match=r"pip install av"):
        load_clip("video_file", [str(path)], 4)
    with pytest.raises(ImportError, match=r"clip.mp4.*PyAV"):
        video_frame_count("video_file", [str(path)])


def test_video_file_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    frames = np.stack([np.full((32, 32, 3), 20 * i + 10, np.uint8) for i in range(10)])
    path = tmp_path / "clip.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=5)  # lossless
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv444p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert video_frame_count("video_file", [str(path)]) == 10
    clip = load_clip("video_file", [str(path)], 5)
    assert clip.indices.tolist() == [1, 3, 5, 7, 9] and clip.total == 10
    assert clip.frames.shape == (5, 32, 32, 3)
    # yuv444 round trip: each grey frame comes back within a couple of levels
    assert np.abs(clip.frames[:, 0, 0, 0].astype(int) - frames[clip.indices, 0, 0, 0]).max() <= 2
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        load_clip("video_file", [str(tmp_path / "gone.mp4")])


def test_video_file_samples_validate_and_load(tmp_path):
    av = pytest.importorskip("av")
    import json

    from tpo.data import SampleDataset

    path = tmp_path / "clip.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv444p"
        for i in range(6):
            frame = np.full((16, 16, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    conv = [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "Then."}]
    ok = {"id": "ok", "media": "clip.mkv", "conversations": conv, "spans": [[0.5, 1.0]],
          "boxes": [{"frame": 3, "box": [0.1, 0.1, 0.5, 0.5]}]}
    late = {"id": "late", "media": "clip.mkv", "conversations": conv,
            "boxes": [{"frame": 6, "box": [0.1, 0.1, 0.5, 0.5]}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(late) + "\n")
    try:  # frame 6 of 6 frames: caught by the validator when the container says how many frames
        ds = SampleDataset(str(tmp_path / "s.jsonl"), num_frames=3)
    except ValueError as err:
        assert "s.jsonl:2: sample 'late': field 'boxes[0].frame'" in str(err)
        (tmp_path / "s.jsonl").write_text(json.dumps(ok) + "\n")
        ds = SampleDataset(str(tmp_path / "s.jsonl"), num_frames=3)
    else:  # otherwise when the sample is loaded
        with pytest.raises(ValueError, match=r"s.jsonl:2: sample 'late': .*frame 6, past the end"):
            ds[1]
    item = ds[0]
    assert item["media"].shape == (3, 3, 16, 16) and item["frame_indices"].tolist() == [1, 3, 5]
    assert item["span_frames"].tolist() == [[False, True, True]]
    assert item["box_frames"].tolist() == [1]


def test_a_video_given_as_an_image_is_named(tmp_path):
    from tpo.data.video import load_image

    frames = tmp_path / "clip.npy"
    np.save(frames, np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"clip.npy' cannot be read.*it is a video \(frames\)"):
        load_image(str(frames))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read") as info:
        load_image(str(broken))
    assert "it is a video" not in str(info.value)
