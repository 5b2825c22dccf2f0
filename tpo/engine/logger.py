"""Where the metrics go: a JSONL file and TensorBoard in the work dir, and a
tqdm progress bar (loss, learning rate, throughput). Only the main process
writes.

``metrics.jsonl`` holds one JSON object a line: ``{"step", "split": "train" |
"val", "time", <metric>: value, ...}``. A resumed run first drops the lines
after the step it resumes from (they are about to be trained again), so the
file always describes one continuous run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a truncated last line is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: nothing after it is trusted
    return records


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricLogger:
    """Appends metric records to ``<work_dir>/metrics.jsonl`` and TensorBoard.

    Args:
        work_dir: the run's folder.
        enabled: False on every process but the main one.
        resume_step: drop records after this step (a resumed run), or None.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, work_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(work_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as handle:
                for record in kept:
                    handle.write(json.dumps(record) + "\n")
            os.replace(tmp, self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    f"train.tensorboard=True needs the tensorboard package ({err}); pip install tensorboard, "
                    "or set train.tensorboard=False"
                ) from None

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(Path(work_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict[str, Any]:
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        if not self.enabled:
            return record
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key in ("step", "split", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self.writer.add_scalar(f"{split}/{key}", value, step)
        return record

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Progress:
    """A tqdm bar over optimiser steps (main process only), showing the loss,
    the learning rate and the throughput."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def update(self, loss: float, lr: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", samples_s=f"{samples_per_s:.3g}", refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
