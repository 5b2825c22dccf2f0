"""Evaluation: metrics (plain functions and ``METRICS``-registered classes).
Importing this package registers the metrics in ``tpo.registry.METRICS``."""
from . import metrics  # noqa: F401
from .evaluate import check_answer_budget, evaluate, evaluate_trivial, parse_box, parse_span  # noqa: F401
from .metrics import (
    BoxMetric,
    MaskMetric,
    PairwiseAccuracy,
    QAAccuracy,
    TemporalMetric,
    TrackingSuccess,
    boundary_f,
    box_iou,
    box_metrics,
    extract_choice,
    j_and_f,
    mask_iou,
    normalize_answer,
    pairwise_accuracy,
    qa_accuracy,
    qa_correct,
    span_iou,
    success_auc,
    success_curve,
    temporal_metrics,
)

__all__ = [
    "BoxMetric", "MaskMetric", "PairwiseAccuracy", "QAAccuracy", "TemporalMetric", "TrackingSuccess",
    "box_iou", "box_metrics", "boundary_f", "extract_choice", "j_and_f", "mask_iou", "normalize_answer",
    "pairwise_accuracy", "qa_accuracy", "qa_correct", "span_iou", "success_auc", "success_curve",
    "temporal_metrics", "check_answer_budget", "evaluate", "evaluate_trivial", "parse_box", "parse_span",
]
