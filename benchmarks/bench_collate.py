"""Benchmark: collation throughput (samples per second) of the collators.

Run (timings on; the project's pytest config disables them by default):

    pytest benchmarks/bench_collate.py --benchmark-enable

Cases, on the train split of a 40-scene synthetic benchmark (64x64, 8-frame
videos and images, items loaded beforehand with all frames) and the processor
of ``configs/mllm/timm_mlp_llama.py`` (4 frames sampled, 16 tokens a frame,
32x32 encoder input), in batches of 8:

* ``conversation[tasks=none]``: :class:`ConversationCollator` without task tokens;
* ``conversation[tasks=4]``: with the region, temporal, mask and track tasks
  (task tokens, targets, masks stacked);
* ``preference``: :class:`PreferenceCollator` (a sample is a pair, two rows).

Each at ``threads=1`` (what a DataLoader worker runs with) and at torch's
default thread count (on a shared machine the default's intra-op threads on
these small tensors mostly wait on busy cores: ``load_avg_1m`` is recorded with
each row). Only the collator is timed (the dataset's loading is in
``bench_data.py``). With timings on, the rows are written to
``benchmarks/results/<machine>/collate.csv``; without them each case runs once
and checks its batches.
"""
from __future__ import annotations

import os

import benchkit
import pytest
import torch
from tpo.registry import build_model

from tpo.data import ConversationCollator, PreferenceCollator, SampleDataset, synthesize
from tpo.data.collate import add_task_tokens

SCENES = 40
BATCH = 8
TASKS = ["region", "temporal", "mask", "track"]


@pytest.fixture(scope="module")
def sink():
    yield from benchkit.csv_sink("collate.csv")  # CPU-bound work: the CPU's folder even where a GPU is


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_model("configs/mllm/timm_mlp_llama.py")
    add_task_tokens(model.processor.tokenizer, TASKS)  # no forward here: the embeddings need no resize
    out = tmp_path_factory.mktemp("bench-collate")
    synthesize(out, num=SCENES, seed=0)
    ds = SampleDataset(str(out / "train.jsonl"))
    items = [ds[i] for i in range(len(ds))]
    return model.processor, items


@pytest.mark.parametrize("threads", [1, None], ids=["threads=1", "threads=default"])
@pytest.mark.parametrize("case", ["conversation[tasks=none]", "conversation[tasks=4]", "preference"])
def test_collate_throughput(benchmark, sink, setup, case, threads):
    processor, items = setup
    if case == "preference":
        chosen = [i for i in items if i["preference"] is not None]
        collate = PreferenceCollator(processor, max_length=2048)
    else:
        chosen = [i for i in items if i["preference"] is None]
        collate = ConversationCollator(processor, max_length=2048, tasks=TASKS if "tasks=4" in case else None)
    batches = [chosen[i : i + BATCH] for i in range(0, len(chosen), BATCH)]
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        outputs = []

        def once():
            outputs[:] = [collate(b) for b in batches]

        benchmark.pedantic(once, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(default_threads)
    rows_per_sample = 2 if case == "preference" else 1
    assert [o["input_ids"].shape[0] for o in outputs] == [rows_per_sample * len(b) for b in batches]
    assert all(o["num_tokens"] > 0 for o in outputs)
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.median
    rate = len(chosen) / seconds
    benchmark.extra_info.update(samples=len(chosen), samples_per_second=round(rate, 1))
    tokens = sum(int(o["attention_mask"].sum()) for o in outputs) / sum(o["input_ids"].shape[0] for o in outputs)
    sink.append({"case": case, "cpu": benchkit.cpu_name(), "cpu_cores": os.cpu_count(),
                 "torch_threads": threads or default_threads, "batch_size": BATCH, "samples": len(chosen),
                 "median_s": round(seconds, 4), "samples_per_second": round(rate, 1),
                 "load_avg_1m": benchkit.load_avg_1m(), "mean_tokens_per_row": round(tokens, 1)})
