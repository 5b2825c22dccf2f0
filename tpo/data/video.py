"""Loading images and videos as uint8 arrays, and uniform frame sampling.

Frames come from an image folder, a list of image files or a ``.npy`` array
``[T, H, W, 3]`` uint8 with nothing but numpy and Pillow; video files
(``.mp4``, ``.avi``, ...) are decoded with PyAV (``pip install av``), or with
``torchvision.io.read_video`` on the torchvision versions that still have it.

Time convention (the whole package keeps to it): a video of ``T`` frames
covers ``[0, 1]``; frame ``i`` covers ``[i / T, (i + 1) / T)`` and its
timestamp is its centre ``(i + 0.5) / T``. A span ``(start, end)`` holds frame
``i`` exactly when ``start <= (i + 0.5) / T <= end``, so the span of frames
``a..b`` is ``(a / T, (b + 1) / T)`` and maps back to exactly ``a..b``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")

#: Media kinds: one image, or a video given as a list of frame files, a frame
#: folder, a ``.npy`` array or a video file.
MEDIA_KINDS = ("image", "frames", "folder", "npy", "video_file")
VIDEO_KINDS = ("frames", "folder", "npy", "video_file")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def media_kind(path: str) -> str:
    """The kind of one media path: ``image``, ``folder``, ``npy`` or
    ``video_file`` (from its extension, or ``folder`` for a directory)."""
    if os.path.isdir(path):
        return "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext == ".npy":
        return "npy"
    if ext in VIDEO_EXTENSIONS:
        return "video_file"
    raise ValueError(
        f"{path!r}: unknown media type {ext or '(no extension)'!r}; expected an image "
        f"({', '.join(IMAGE_EXTENSIONS)}), a frame folder, a .npy array or a video file ({', '.join(VIDEO_EXTENSIONS)})"
    )


def list_frame_files(folder: str) -> list[str]:
    """The image files of a frame folder, in natural order (``2.jpg`` before ``10.jpg``)."""
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if not names:
        raise ValueError(f"frame folder {folder!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def load_image(path: str) -> np.ndarray:
    """One image as ``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path!r} does not exist") from None
    except OSError as err:
        ext = os.path.splitext(str(path))[1].lower()
        hint = "; it is a video (frames): give it as a video (--video in `tpo chat`)" if (
            ext == ".npy" or ext in VIDEO_EXTENSIONS or os.path.isdir(path)) else ""
        raise ValueError(f"image {path!r} cannot be read: {err}{hint}") from err


def image_size(path: str) -> tuple[int, int]:
    """``(H, W)`` of an image file, reading only its header."""
    from PIL import Image

    with Image.open(path) as img:
        return img.height, img.width


def open_npy_frames(path: str) -> np.ndarray:
    """A ``.npy`` video ``[T, H, W, 3]`` uint8, memory-mapped, its shape checked."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"frame array {path!r} does not exist") from None
    except ValueError as err:
        raise ValueError(f"frame array {path!r} cannot be read as .npy: {err}") from err
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ValueError(
            f"frame array {path!r} must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {list(arr.shape)}"
        )
    return arr


def _import_av():
    try:
        import av  # noqa: F401
    except ImportError:
        return None
    return av


def _torchvision_read_video():
    try:
        import torchvision.io as tvio
    except ImportError:
        return None
    return getattr(tvio, "read_video", None)


def _no_video_backend(path: str) -> ImportError:
    return ImportError(
        f"reading the video file {path!r} needs PyAV, which is not installed: run `pip install av` "
        f"(or `pip install 'tpo[video]'`), or give the video as a frame folder or a .npy array"
    )


def _decode_av(av, path: str, keep: set[int] | None) -> tuple[list[np.ndarray], int]:
    frames, count = [], 0
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"video file {path!r} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if keep is None or i in keep:
                frames.append(frame.to_ndarray(format="rgb24"))
            count = i + 1
    return frames, count


def count_video_file_frames(path: str, decode: bool = True) -> int | None:
    """The number of frames of a video file: from the container, else by
    decoding it (``decode=False``: ``None`` when the container does not say)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    av = _import_av()
    if av is not None:
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError(f"video file {path!r} has no video stream")
                n = container.streams.video[0].frames
        except av.error.FFmpegError as err:
            raise ValueError(f"video file {path!r} cannot be opened: {err}") from err
        if n > 0:
            return int(n)
        return _decode_av(av, path, set())[1] if decode else None
    if not decode:
        return None
    read_video = _torchvision_read_video()
    if read_video is not None:
        return int(read_video(path, pts_unit="sec", output_format="THWC")[0].shape[0])
    raise _no_video_backend(path)


def read_video_file(path: str, num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode a video file: ``(frames [n, H, W, 3] uint8, indices, total)``,
    the ``num_frames`` frames of :func:`uniform_indices` (all when ``None``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    av = _import_av()
    if av is not None:
        try:
            if num_frames is None:
                frames, total = _decode_av(av, path, None)
                indices = np.arange(total)
            else:
                with av.open(path) as container:
                    total = int(container.streams.video[0].frames) if container.streams.video else 0
                if total <= 0:
                    total = _decode_av(av, path, set())[1]
                indices = uniform_indices(total, num_frames)
                frames, decoded = _decode_av(av, path, set(indices.tolist()))
                if decoded != total:  # the container's frame count was wrong: sample again
                    total = decoded
                    indices = uniform_indices(total, num_frames)
                    frames, _ = _decode_av(av, path, set(indices.tolist()))
        except av.error.FFmpegError as err:
            raise ValueError(f"video file {path!r} cannot be decoded: {err}") from err
        if not frames:
            raise ValueError(f"video file {path!r} has no video frames")
        return np.stack(frames), indices, total
    read_video = _torchvision_read_video()
    if read_video is not None:
        video = read_video(path, pts_unit="sec", output_format="THWC")[0].numpy()
        total = video.shape[0]
        if total == 0:
            raise ValueError(f"video file {path!r} has no video frames")
        indices = np.arange(total) if num_frames is None else uniform_indices(total, num_frames)
        return np.ascontiguousarray(video[indices]), indices, total
    raise _no_video_backend(path)


# ---------------------------------------------------------------- time


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` frame indices spread uniformly over ``total`` frames:
    the frame under the centre of each of ``num_frames`` equal segments
    (every frame, once, when ``num_frames >= total``)."""
    if total <= 0:
        raise ValueError(f"cannot sample frames from a video of {total} frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_frames >= total:
        return np.arange(total, dtype=np.int64)
    return np.floor((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)


def frame_timestamps(indices: Sequence[int] | np.ndarray, total: int) -> np.ndarray:
    """Normalised timestamps (frame centres, ``(i + 0.5) / total``) of frame ``indices``."""
    return (np.asarray(indices, dtype=np.float64) + 0.5) / float(total)


def uniform_sample(total: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, timestamps)`` of :func:`uniform_indices` and :func:`frame_timestamps`."""
    indices = uniform_indices(total, num_frames)
    return indices, frame_timestamps(indices, total)


def frames_to_span(first: int, last: int, total: int) -> tuple[float, float]:
    """The normalised span covering frames ``first..last`` (inclusive) of ``total``."""
    if not 0 <= first <= last < total:
        raise ValueError(f"frames {first}..{last} are not a range within a video of {total} frames")
    return first / total, (last + 1) / total


def span_frame_mask(span: Sequence[float], timestamps: np.ndarray) -> np.ndarray:
    """Which of the frames at normalised ``timestamps`` lie in ``span`` (bool)."""
    start, end = float(span[0]), float(span[1])
    ts = np.asarray(timestamps, dtype=np.float64)
    return (ts >= start) & (ts <= end)


# ---------------------------------------------------------------- whole clips


@dataclass
class Clip:
    """Frames of a video: ``frames`` ``[n, H, W, 3]`` uint8, their ``indices``
    in the source video of ``total`` frames and their normalised ``timestamps``."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    total: int


def video_frame_count(kind: str, paths: Sequence[str], decode: bool = True) -> int | None:
    """The number of frames of a video medium without decoding its pixels,
    except for a video file whose container does not say (``decode=False``:
    ``None`` then, and ``None`` for a video file without a decoder installed)."""
    if kind == "frames":
        return len(paths)
    if kind == "folder":
        return len(list_frame_files(paths[0]))
    if kind == "npy":
        return int(open_npy_frames(paths[0]).shape[0])
    if kind == "video_file":
        return count_video_file_frames(paths[0], decode)
    raise ValueError(f"media kind {kind!r} is not a video; video kinds are {', '.join(VIDEO_KINDS)}")


def _stack_images(files: Sequence[str]) -> np.ndarray:
    images = [load_image(f) for f in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"frames of one video differ in size: {sorted(shapes)} (first frame {files[0]!r})")
    return np.stack(images)


def load_clip(kind: str, paths: Sequence[str], num_frames: int | None = None) -> Clip:
    """Load a video medium (``kind`` of :data:`VIDEO_KINDS`; ``paths`` the frame
    files, or one folder / ``.npy`` / video file), ``num_frames`` of its frames
    sampled uniformly (all when ``None``), with their indices and timestamps."""
    if kind == "video_file":
        frames, indices, total = read_video_file(paths[0], num_frames)
        return Clip(frames, indices, frame_timestamps(indices, total), total)
    if kind in ("frames", "folder"):
        files = list(paths) if kind == "frames" else list_frame_files(paths[0])
        total = len(files)
        indices = np.arange(total) if num_frames is None else uniform_indices(total, num_frames)
        frames = _stack_images([files[i] for i in indices])
    elif kind == "npy":
        arr = open_npy_frames(paths[0])
        total = int(arr.shape[0])
        indices = np.arange(total) if num_frames is None else uniform_indices(total, num_frames)
        frames = np.ascontiguousarray(arr[indices])
    else:
        raise ValueError(f"media kind {kind!r} is not a video; video kinds are {', '.join(VIDEO_KINDS)}")
    return Clip(frames, indices.astype(np.int64), frame_timestamps(indices, total), total)


def media_size(kind: str, paths: Sequence[str]) -> tuple[int, int] | None:
    """``(H, W)`` of a medium read from headers only, or ``None`` for a video file."""
    if kind in ("image", "frames"):
        return image_size(paths[0])
    if kind == "folder":
        return image_size(list_frame_files(paths[0])[0])
    if kind == "npy":
        shape = open_npy_frames(paths[0]).shape
        return int(shape[1]), int(shape[2])
    return None
