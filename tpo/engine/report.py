"""The final report of a run, from its ``metrics.jsonl``: ``report.json``
(the last and best values of every metric, timings, the config's gist) and
PNG curves (``loss.png``: train and validation loss; ``metrics.png``: every
other validation metric) drawn with matplotlib's Agg backend."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import write_json
from .logger import METRICS_FILE, read_metrics

REPORT_FILE = "report.json"
LOSS_PLOT = "loss.png"
METRICS_PLOT = "metrics.png"
_SKIP = {"step", "split", "time", "epoch"}


def _series(records: list[dict], split: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("split") != split:
            continue
        for key, value in r.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(r["step"]))
            values.append(float(value))
    return series


def _summary(series: Mapping[str, tuple[list[int], list[float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for key, (steps, values) in series.items():
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        entry: dict[str, Any] = {"last": values[-1], "last_step": steps[-1]}
        if finite:
            lo = min(finite, key=lambda sv: sv[1])
            hi = max(finite, key=lambda sv: sv[1])
            entry.update(min=lo[1], min_step=lo[0], max=hi[1], max_step=hi[0])
        out[key] = entry
    return out


def plot_curves(records: list[dict], work_dir: str | os.PathLike) -> list[str]:
    """Write ``loss.png`` and (when there are validation metrics) ``metrics.png``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    work_dir = Path(work_dir)
    train, val = _series(records, "train"), _series(records, "val")
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if "loss" in train:
        ax.plot(*train["loss"], label="train loss", lw=1)
    if "loss" in val:
        ax.plot(*val["loss"], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work_dir / LOSS_PLOT, dpi=100)
    plt.close(fig)
    written.append(LOSS_PLOT)

    others = sorted(k for k in val if k != "loss")
    if others:
        cols = min(3, len(others))
        rows = math.ceil(len(others) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, others):
            ax.plot(*val[key], "o-")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(others):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(work_dir / METRICS_PLOT, dpi=100)
        plt.close(fig)
        written.append(METRICS_PLOT)
    return written


def write_report(work_dir: str | os.PathLike, info: Mapping[str, Any]) -> dict[str, Any]:
    """``report.json`` and the plots, from ``<work_dir>/metrics.jsonl``; ``info``
    (config gist, steps, timings, checkpoints) is stored alongside."""
    work_dir = Path(work_dir)
    records = read_metrics(work_dir / METRICS_FILE)
    report = dict(info)
    report["train"] = _summary(_series(records, "train"))
    report["val"] = _summary(_series(records, "val"))
    report["plots"] = plot_curves(records, work_dir)
    write_json(work_dir / REPORT_FILE, report)
    return report
