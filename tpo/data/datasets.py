"""The dataset of samples: a validated JSONL file whose items carry their
loaded media, conversation, annotations and frame timestamps."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tpo.registry import DATASETS

from .schema import Sample, load_samples
from .video import load_clip, load_image, span_frame_mask


@DATASETS.register_module()
class SampleDataset(Dataset):
    """Samples of a JSONL file (see ``docs/data_format.md``), validated when
    built: a bad file raises one ``ValueError`` listing every problem.

    Args:
        ann_file: the JSONL file; media paths are relative to its folder.
        num_frames: frames sampled uniformly from each video (all when ``None``).
        tasks: keep only samples whose ``meta.task`` is one of these.
        check_media: open media headers while validating (frame counts, sizes).

    An item is a dict:

    * ``id`` (str), ``source`` (``"file:line"``)
    * ``media_type``: ``"image"``, ``"video"`` or ``None``
    * ``media``: uint8 ``[3, H, W]`` (image) or ``[T, 3, H, W]`` (video), or ``None``
    * ``frame_indices`` (int64 ``[T]``, in the source video), ``timestamps``
      (float64 ``[T]``, normalised frame centres), ``num_source_frames`` (int):
      videos only
    * ``conversations``: ``[{"from": "human"|"gpt", "value": str}, ...]``
    * ``boxes``: float32 ``[N, 4]`` normalised xyxy; ``box_frames``: int64
      ``[N]``, the position of each box's frame in ``media`` (0 for an image);
      boxes on frames that were not sampled are left out; videos also
      ``source_boxes`` float32 ``[M, 4]`` and ``source_box_frames`` int64
      ``[M]``: every box, sampled or not, with its frame in the source video
    * ``spans``: float32 ``[S, 2]``; ``span_frames``: bool ``[S, T]``, which
      sampled frames lie in each span
    * ``masks``: bool ``[H, W]`` (image) or ``[T, H, W]`` (video), with
      ``mask_valid`` bool ``[T]`` (the frames that have a mask annotation); or ``None``
    * ``tracks``: ``[{"object", "init_frame" (source index), "init_box"
      float32 [4], "boxes" float32 [T, 4], "valid" bool [T]}]`` on the sampled frames
    * ``preference``: ``{"prompt", "chosen", "rejected", "judge"}`` or ``None``
    * ``description``: list of sentences or ``None``; ``meta``: dict
    """

    def __init__(
        self,
        ann_file: str,
        num_frames: int | None = None,
        tasks: Sequence[str] | None = None,
        check_media: bool = True,
    ):
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
        self.ann_file = os.fspath(ann_file)
        self.num_frames = num_frames
        samples = load_samples(self.ann_file, check_media=check_media)
        if tasks is not None:
            tasks = set(tasks)
            samples = [s for s in samples if s.meta.get("task") in tasks]
            if not samples:
                raise ValueError(f"{self.ann_file}: no sample has a meta.task in {sorted(tasks)}")
        self.samples: list[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            return self._load(sample)
        except (OSError, ValueError, ImportError) as err:
            raise type(err)(f"{sample.source}: sample {sample.id!r}: {err}") from err

    def _load(self, s: Sample) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": s.id,
            "source": str(s.source),
            "media_type": None,
            "media": None,
            "conversations": [t.to_dict() for t in s.conversations],
            "boxes": torch.zeros(0, 4),
            "box_frames": torch.zeros(0, dtype=torch.long),
            "spans": torch.zeros(0, 2),
            "span_frames": torch.zeros(0, 0, dtype=torch.bool),
            "masks": None,
            "tracks": [],
            "preference": None,
            "description": s.description,
            "meta": s.meta,
        }
        if s.preference is not None:
            p = s.preference
            item["preference"] = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "judge": p.judge}
        if s.media is None:
            return item
        if not s.media.is_video:
            image = load_image(s.media.paths[0])
            item["media_type"] = "image"
            item["media"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            if s.boxes:
                item["boxes"] = torch.tensor([b.box for b in s.boxes], dtype=torch.float32)
                item["box_frames"] = torch.zeros(len(s.boxes), dtype=torch.long)
            if s.masks:
                item["masks"] = self._mask(s.masks[0], image.shape[:2], "masks")
            return item

        clip = load_clip(s.media.kind, s.media.paths, self.num_frames)
        T = len(clip.indices)
        position = {int(f): i for i, f in enumerate(clip.indices)}
        hw = clip.frames.shape[1:3]
        item.update(
            media_type="video",
            media=torch.from_numpy(np.ascontiguousarray(clip.frames.transpose(0, 3, 1, 2))),
            frame_indices=torch.from_numpy(clip.indices.astype(np.int64)),
            timestamps=torch.from_numpy(clip.timestamps),
            num_source_frames=clip.total,
        )
        self._check_frames(s, clip.total)
        if s.boxes:  # all of them: a text answer says which frame its box is on ("frame 3: [...]")
            item["source_boxes"] = torch.tensor([b.box for b in s.boxes], dtype=torch.float32)
            item["source_box_frames"] = torch.tensor([b.frame for b in s.boxes], dtype=torch.long)
        kept = [b for b in s.boxes if b.frame in position]
        if kept:
            item["boxes"] = torch.tensor([b.box for b in kept], dtype=torch.float32)
            item["box_frames"] = torch.tensor([position[b.frame] for b in kept], dtype=torch.long)
        if s.spans:
            item["spans"] = torch.tensor(s.spans, dtype=torch.float32)
            item["span_frames"] = torch.from_numpy(np.stack([span_frame_mask(sp, clip.timestamps) for sp in s.spans]))
        if s.masks:
            masks = torch.zeros(T, *hw, dtype=torch.bool)
            valid = torch.zeros(T, dtype=torch.bool)
            for m in s.masks:
                if m.frame in position:
                    masks[position[m.frame]] = self._mask(m, hw, f"masks (frame {m.frame})")
                    valid[position[m.frame]] = True
            item["masks"], item["mask_valid"] = masks, valid
        for track in s.tracks:
            boxes = torch.zeros(T, 4)
            valid = torch.zeros(T, dtype=torch.bool)
            for b in track.boxes:
                if b.box is not None and b.frame in position:
                    boxes[position[b.frame]] = torch.tensor(b.box)
                    valid[position[b.frame]] = True
            item["tracks"].append({
                "object": track.object, "init_frame": track.init_frame,
                "init_box": torch.tensor(track.init_box, dtype=torch.float32), "boxes": boxes, "valid": valid,
            })
        return item

    @staticmethod
    def _mask(mask, hw, what: str) -> torch.Tensor:
        arr = mask.decode()
        if arr.shape != tuple(hw):
            raise ValueError(f"{what}: the mask is {arr.shape[0]}x{arr.shape[1]}, the media {hw[0]}x{hw[1]}")
        return torch.from_numpy(arr)

    @staticmethod
    def _check_frames(s: Sample, total: int) -> None:
        """Frame annotations past the video's end (only knowable here for video files)."""
        frames = [b.frame for b in s.boxes] + [m.frame for m in s.masks]
        frames += [b.frame for t in s.tracks for b in t.boxes] + [t.init_frame for t in s.tracks]
        late = [f for f in frames if f is not None and f >= total]
        if late:
            raise ValueError(f"an annotation is on frame {max(late)}, past the end of the video ({total} frames)")
