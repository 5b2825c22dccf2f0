"""Task heads: the LLM's hidden state at a task token -> boxes, spans, masks,
tracks. Importing this package registers them all in ``tpo.registry.TASK_HEADS``
(``RegionHead``, ``RegionDecoderHead``, ``SpanHead``, ``MomentDETRHead``, ``MaskDecoderHead``,
``Sam2MaskHead``, ``TrackHead``, and the prompt encoder ``BoxEncoder``)."""

from .base import TaskHead
from .box_encoder import BoxEncoder
from .mask import MaskDecoderHead, Sam2MaskHead
from .region import RegionDecoderHead, RegionHead
from .temporal import MomentDETRHead, SpanHead
from .track import TrackHead

__all__ = [
    "BoxEncoder",
    "MaskDecoderHead",
    "MomentDETRHead",
    "RegionDecoderHead",
    "RegionHead",
    "Sam2MaskHead",
    "SpanHead",
    "TaskHead",
    "TrackHead",
]
