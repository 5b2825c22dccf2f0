"""Benchmark: one training step (the algorithm's step, backward, AdamW step) of
SFT, DPO and TPO on the tiny timm + MLP + Llama configs, with the fused log-prob
kernel (``logprob="fused"``: the LM head applied tile by tile, no
``[tokens, vocab]`` logits) and without it (``logprob="eager"``: materialised
logits, then ``F.cross_entropy`` for SFT and ``log_softmax`` + gather for DPO).

    python benchmarks/bench_train_step.py [--repeats 5] [--threads 1] [--vocab 512 32000]   # CSV with peak memory
    pytest benchmarks/bench_train_step.py --benchmark-enable                                # pytest-benchmark timings

Batches come from the synthetic benchmark through SampleDataset and the real
collators: SFT 8 conversations, DPO 8 pairs (16 rows, the reference a frozen
copy), TPO 8 task samples. ``vocab`` 512 is the tiny config itself; larger values
set ``model.llm.config.vocab_size`` (the logits grow with it, the rest of the
model does not). Both modes run on one torch thread on CPU (``--threads``).

The script runs each case in a fresh process (the batches made once and handed
over in a file) and reports the median and minimum step time, samples (pairs)
and answer tokens per second, and the peak memory of the step: on CUDA
``torch.cuda.max_memory_allocated`` above the memory before the step; on CPU,
after the timed steps, with glibc told to serve every allocation above 64 KiB by
``mmap`` and freed memory trimmed (``malloc_trim``) before each step, the peak
RSS (VmHWM, reset through ``/proc/self/clear_refs``) above the RSS before the
step (so no earlier step's or case's freed memory hides the peak; the method of
``run_kernel_benchmarks.py``). Rows go to
``benchmarks/results/<machine>/train_step.csv`` with the machine described in
``train_step_machine.json``. The pytest mode times the same steps (without
timings, ``--benchmark-disable``, each case runs one step as a smoke test).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchkit import (  # noqa: E402  (RESULTS and machine_name: also bench_dpo_heldout.py's)
    RESULTS,
    cpu_name,
    cpu_peak_supported,
    load_avg_1m,
    machine_name,
    mmap_large_allocations,
    peak,
    ram_gib,
    reset_peak,
    run_worker,
    write_csv,
)

ROOT = HERE.parent
CONFIG = ROOT / "configs" / "mllm" / "timm_mlp_llama.py"
TPO_CONFIG = ROOT / "configs" / "tpo" / "timm_mlp_llama.py"
ALGORITHMS = ("SFT", "DPO", "TPO")
LOGPROBS = ("fused", "eager")
VOCABS = (512, 32000)
BATCH = 8
MEMORY_METHOD = ("CUDA: max_memory_allocated above the step's start; CPU: each case in a fresh process, after its "
                 "timed steps, MALLOC_MMAP_THRESHOLD 65536 (mallopt) and malloc_trim before each step, peak RSS "
                 "(VmHWM reset via /proc/self/clear_refs) above the RSS at the step's start, max over the repeats")


def case_name(algorithm: str, logprob: str, vocab: int) -> str:
    return f"{algorithm.lower()}[{logprob},V={vocab}]"


def model_config(algorithm: str, vocab: int) -> dict:
    """The tiny config's model (TPO: with its task heads), ``vocab_size`` set where not 512."""
    from tpo.registry import load_config

    cfg = load_config(str(TPO_CONFIG if algorithm == "TPO" else CONFIG)).to_dict()["model"]
    if vocab != 512:
        cfg["llm"]["config"]["vocab_size"] = vocab
    return cfg


def make_batches(out_dir: Path, processor, size: int):
    """One SFT batch (``size`` conversations) and one DPO batch (``size`` pairs)
    from a freshly written synthetic benchmark."""
    from tpo.data import SampleDataset, synthesize
    from tpo.data.collate import ConversationCollator, PreferenceCollator

    synthesize(out_dir, num=48, seed=0, frames=8, size=64)
    qa = SampleDataset(str(out_dir / "train.jsonl"), num_frames=8, tasks=["qa"])
    pref = SampleDataset(str(out_dir / "train.jsonl"), num_frames=8, tasks=["preference"])
    sft = ConversationCollator(processor, max_length=512)([qa[i] for i in range(size)])
    dpo = PreferenceCollator(processor, max_length=512)([pref[i] for i in range(size)])
    return sft, dpo


def make_task_batch(out_dir: Path, processor, tasks, size: int):
    """One TPO batch: ``size`` samples of the grounding, temporal, mask and track tasks."""
    from tpo.data import SampleDataset
    from tpo.data.collate import ConversationCollator

    task = SampleDataset(str(out_dir / "train.jsonl"), num_frames=8,
                         tasks=["grounding", "temporal_grounding", "segmentation", "tracking"])
    return ConversationCollator(processor, max_length=512, tasks=tasks)([task[i] for i in range(size)])


def make_all_batches(out_dir: Path, size: int = BATCH) -> dict:
    """The batch of each algorithm: SFT conversations, DPO pairs, TPO task samples."""
    from tpo.registry import build_model

    sft, dpo = make_batches(out_dir, build_model(model_config("SFT", 512)).processor, size)
    tpo_model = build_model(model_config("TPO", 512))
    return {"SFT": sft, "DPO": dpo, "TPO": make_task_batch(out_dir, tpo_model.processor, tpo_model.tasks, size)}


def build_step(model_cfg: dict, algorithm: str, logprob: str, batch: dict, device: torch.device):
    """The model, algorithm and AdamW of one case; returns ``step`` (one training step,
    returning the loss) and what the batch holds (rows, tokens, samples)."""
    from accelerate.utils import send_to_device
    from tpo.registry import build_algorithm, build_model

    torch.manual_seed(0)
    model_cfg = copy.deepcopy(model_cfg)
    if algorithm == "TPO":  # the TPO model's LM losses: the fused kernel, or materialised logits
        model_cfg["kernel_backend"] = "auto" if logprob == "fused" else "eager"
        algo_cfg = {"type": "TPO"}
    else:
        algo_cfg = {"type": algorithm, "logprob": logprob}
    model = build_model(model_cfg)
    algo = build_algorithm(algo_cfg, default_args={"model": model}).to(device)
    algo.train()
    params = [p for p in algo.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = send_to_device(batch, device)

    def step() -> float:
        out = algo(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"].item()  # waits for the device

    info = {"rows": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1]),
            "samples": int(batch.get("num_pairs") or batch["input_ids"].shape[0]), "items": int(algo.num_items(batch)),
            "answer_tokens": int((batch["labels"][:, 1:] != -100).sum())}
    return step, info


def run_case(model_cfg, algorithm: str, logprob: str, batch, device, repeats: int) -> dict:
    """Two warm-up steps (optimiser state allocated, kernels chosen), ``repeats`` timed
    steps, then ``repeats`` steps for peak memory (see the module's docstring)."""
    step, info = build_step(model_cfg, algorithm, logprob, batch, device)
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        gc.collect()
        tic = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - tic)
    peaks = []
    if device.type == "cuda" or cpu_peak_supported():
        if device.type == "cpu":
            mmap_large_allocations()
        for _ in range(repeats):
            before = reset_peak(device.type)
            step()
            peaks.append(peak(device.type) - before)
    median = statistics.median(times)
    return {
        "algorithm": algorithm, "logprob": logprob, **info, "median_s": round(median, 5), "min_s": round(min(times), 5),
        "samples_per_s": round(info["samples"] / median, 2),
        "answer_tokens_per_s": round(info["answer_tokens"] / median, 1),
        "peak_mem_mib": round(max(peaks) / 2**20, 1) if peaks else None, "loss": round(loss, 5), "repeats": repeats,
    }


def worker(spec: dict) -> dict:
    """One case in this (fresh) process: the row of the CSV."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    batch = torch.load(spec["batches"], weights_only=False)[spec["algorithm"]]
    load = load_avg_1m()
    row = run_case(model_config(spec["algorithm"], spec["vocab"]), spec["algorithm"], spec["logprob"], batch, device,
                   spec["repeats"])
    return {"case": case_name(spec["algorithm"], spec["logprob"], spec["vocab"]), "vocab": spec["vocab"], **row,
            "device": device.type, "torch_threads": torch.get_num_threads() if device.type == "cpu" else "",
            "load_avg_1m": load}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--batch", type=int, default=BATCH, help="conversations (SFT) and pairs (DPO) per step")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<machine>)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(make_all_batches(Path(tmp), args.batch), Path(tmp) / "batches.pt")
        for vocab in args.vocab:
            for algorithm in ALGORITHMS:
                for logprob in LOGPROBS:
                    spec = {"algorithm": algorithm, "logprob": logprob, "vocab": vocab, "repeats": args.repeats,
                            "threads": args.threads, "batches": str(Path(tmp) / "batches.pt")}
                    rows.append(run_worker(Path(__file__), "--worker", spec))
                    print(json.dumps(rows[-1]), flush=True)

    folder = args.out or RESULTS / machine_name()
    write_csv(folder / "train_step.csv", rows)
    machine = {
        "machine": machine_name(), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch_threads": args.threads if device.type == "cpu" else None,
        "ram_gib": ram_gib(),
        "model": "configs/mllm/timm_mlp_llama.py (hidden 64, 2 layers; vision timm ViT 32x32, 4 frames)",
        "batch": f"SFT {args.batch} conversations, DPO {args.batch} pairs, TPO {args.batch} task samples "
                 "(configs/tpo/timm_mlp_llama.py: region, temporal, mask, track heads; synthetic benchmark, "
                 "max_length 512)",
        "memory": MEMORY_METHOD,
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv if argv is None else ["bench_train_step.py", *argv]),
    }
    (folder / "train_step_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    print(f"wrote {folder / 'train_step.csv'}")
    return 0


# ------------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    return make_all_batches(tmp_path_factory.mktemp("bench-train-step"))


@pytest.mark.parametrize("algorithm,logprob,vocab", [
    pytest.param(a, lp, v, id=f"{a.lower()}-{lp}-V{v}") for v in VOCABS for a in ALGORITHMS for lp in LOGPROBS])
def test_train_step(benchmark, batches, algorithm, logprob, vocab):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the script: one thread, steadier on a shared machine
    try:
        step, info = build_step(model_config(algorithm, vocab), algorithm, logprob, batches[algorithm], device)
        for _ in range(2):  # warm-up: optimiser state allocated, kernels chosen
            step()
        losses = []
        benchmark.pedantic(lambda: losses.append(step()), rounds=5, warmup_rounds=0, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert losses and all(math.isfinite(x) for x in losses), losses
    benchmark.group = f"train step V={vocab}"
    benchmark.extra_info.update(case=case_name(algorithm, logprob, vocab), vocab=vocab, **info)


if __name__ == "__main__":
    sys.exit(main())
