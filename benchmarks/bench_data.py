"""Benchmark: synthetic benchmark generation and dataset loading throughput.

Run (timings on; the project's pytest config disables them by default):

    pytest benchmarks/bench_data.py --benchmark-enable

Cases:
* ``synth[workers=1|2]``: :func:`tpo.data.synth.synthesize` of 200 scenes
  (64x64, 8 frames), files written; reported as samples (JSONL lines) per second.
  The project's target is at least 1000 samples a minute on 2 cores.
* ``dataset[num_frames=4]``: ``SampleDataset`` items (media loaded, masks
  decoded, annotations mapped to the sampled frames) per second.

With timings on, the rows are written to ``benchmarks/results/<machine>/data.csv``.
Without them (the default), each case runs once and checks the 1000/min target.
"""
from __future__ import annotations

import os
import shutil

import benchkit
import pytest

from tpo.data import SampleDataset, synthesize

TARGET_SAMPLES_PER_MINUTE = 1000
SCENES = 200


@pytest.fixture(scope="module")
def sink():
    yield from benchkit.csv_sink("data.csv")  # CPU-bound work: the CPU's folder even where a GPU is


@pytest.mark.parametrize("workers", [1, 2])
def test_synth_throughput(benchmark, sink, tmp_path, workers):
    out = tmp_path / "synth"
    summaries = []

    def once():
        shutil.rmtree(out, ignore_errors=True)
        summaries.append(synthesize(out, num=SCENES, seed=0, workers=workers))

    benchmark.pedantic(once, rounds=3, warmup_rounds=0, iterations=1)
    samples = summaries[-1]["num_samples"]
    if benchmark.stats is None:  # --benchmark-disable: ran once; check the target with its own timing
        assert summaries[-1]["samples_per_second"] * 60 >= TARGET_SAMPLES_PER_MINUTE, summaries[-1]
        return
    seconds = benchmark.stats.stats.median
    rate = samples / seconds
    benchmark.extra_info.update(samples=samples, samples_per_second=round(rate, 1))
    sink.append(dict(case=f"synth[workers={workers}]", cpu=benchkit.cpu_name(), cpu_cores=os.cpu_count(), scenes=SCENES,
                     items=samples, median_s=round(seconds, 4), items_per_second=round(rate, 1),
                     items_per_minute=round(60 * rate)))
    assert rate * 60 >= TARGET_SAMPLES_PER_MINUTE


def test_dataset_throughput(benchmark, sink, tmp_path):
    synthesize(tmp_path, num=60, seed=0)
    ds = SampleDataset(str(tmp_path / "train.jsonl"), num_frames=4)

    def once():
        for i in range(len(ds)):
            ds[i]

    benchmark.pedantic(once, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.median
    rate = len(ds) / seconds
    benchmark.extra_info.update(items=len(ds), items_per_second=round(rate, 1))
    sink.append(dict(case="dataset[num_frames=4]", cpu=benchkit.cpu_name(), cpu_cores=os.cpu_count(), scenes=60,
                     items=len(ds), median_s=round(seconds, 4), items_per_second=round(rate, 1),
                     items_per_minute=round(60 * rate)))
