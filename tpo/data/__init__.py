"""Data: the sample schema and validator, the synthetic shapes benchmark,
video loading, readers of public formats and the dataset. Importing this
package registers the datasets in ``tpo.registry.DATASETS``."""
from . import collate, datasets, mixed, readers, schema, synth, video  # noqa: F401
from .collate import BOX_TOKEN, ConversationCollator, PreferenceCollator, build_collator, task_tokens
from .datasets import SampleDataset
from .mixed import MixedDataset
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
    "BOX_TOKEN", "ConversationCollator", "FrameBox", "FrameMask", "Media", "Preference", "PreferenceCollator",
    "MixedDataset", "Problem", "Sample", "SampleDataset", "Source", "Track", "Turn", "build_collator", "decode_mask", "encode_mask",
    "frame_timestamps", "load_clip", "load_image", "load_samples", "read_charades_sta", "read_llava",
    "read_refcoco", "read_samples", "read_trl_preference", "synthesize", "task_tokens", "uniform_indices",
    "uniform_sample", "validate_record", "write_jsonl"
]
