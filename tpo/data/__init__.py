"""Data: the sample schema and validator, the synthetic shapes benchmark,
video loading, readers of public formats and the dataset. Importing this
package registers the datasets in ``tpo.registry.DATASETS``."""
from . import datasets, readers, schema, synth, video  # noqa: F401
from .datasets import SampleDataset
from .readers import read_charades_sta, read_llava, read_refcoco, read_trl_preference
from .schema import (
    FrameBox,
    FrameMask,
    Media,
    Preference,
    Problem,
    Sample,
    Source,
    Track,
    Turn,
    decode_mask,
    encode_mask,
    load_samples,
    read_samples,
    validate_record,
    write_jsonl,
)
from .synth import synthesize
from .video import frame_timestamps, load_clip, load_image, uniform_indices, uniform_sample

__all__ = [
    "FrameBox", "FrameMask", "Media", "Preference", "Problem", "Sample", "SampleDataset", "Source", "Track", "Turn",
    "decode_mask", "encode_mask", "frame_timestamps", "load_clip", "load_image", "load_samples",
    "read_charades_sta", "read_llava", "read_refcoco", "read_samples", "read_trl_preference", "synthesize",
    "uniform_indices", "uniform_sample", "validate_record", "write_jsonl",
]
