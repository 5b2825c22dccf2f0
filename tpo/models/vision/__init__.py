"""Vision encoders: images ``[B, 3, H, W]`` -> ``[B, 1, N, C]``, videos
``[B, T, 3, H, W]`` -> ``[B, T, N, C]``, from timm, open_clip or transformers.

Importing this package registers every encoder in ``VISION_ENCODERS``; the
backend libraries themselves are imported when an encoder is built.
"""
from .base import VisionEncoder, find_weights_file, resolve_weights
from .hf_encoder import CLIPVisionEncoder, HFVisionEncoder, SiglipVisionEncoder
from .open_clip_encoder import OpenCLIPVisionEncoder
from .timm_encoder import TimmVisionEncoder

__all__ = [
    "CLIPVisionEncoder",
    "HFVisionEncoder",
    "OpenCLIPVisionEncoder",
    "SiglipVisionEncoder",
    "TimmVisionEncoder",
    "VisionEncoder",
    "find_weights_file",
    "resolve_weights",
]
