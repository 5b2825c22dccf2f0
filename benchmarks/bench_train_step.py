"""Benchmark: one training step (the algorithm's step, backward, AdamW step) of
SFT, DPO and TPO on the tiny timm + MLP + Llama configs, with the fused log-prob
kernel (``logprob="fused"``: the LM head applied tile by tile, no
``[tokens, vocab]`` logits) and without it (``logprob="eager"``: materialised
logits, then ``F.cross_entropy`` for SFT and ``log_softmax`` + gather for DPO).

    python benchmarks/bench_train_step.py [--repeats 5] [--threads 1] [--vocab 512 32000]

Batches come from the synthetic benchmark through SampleDataset and the real
collators: SFT 8 conversations, DPO 8 pairs (16 rows, the reference a frozen
copy). ``vocab`` 512 is the tiny config itself; larger values set
``model.llm.config.vocab_size`` (the logits grow with it, the rest of the model
does not). Reported per case: the median and minimum step time, samples (pairs)
and answer tokens per second, and the peak memory of the step: on CUDA
``torch.cuda.max_memory_allocated`` above the memory before the step, on CPU the
peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) above the RSS before
the step. Rows go to ``benchmarks/results/<machine>/train_step.csv`` with the
machine described in ``train_step_machine.json``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "mllm" / "timm_mlp_llama.py"
TPO_CONFIG = ROOT / "configs" / "tpo" / "timm_mlp_llama.py"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    short = " ".join(cpu_name().split()[:2])  # "AMD EPYC 7B13" -> "AMD EPYC"
    return re.sub(r"[^a-z0-9]+", "-", f"cpu-{short}-{os.cpu_count()}c".lower()).strip("-")


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the memory in use now."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    return _status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


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


def run_case(model_cfg, algorithm: str, logprob: str, batch, device, repeats: int) -> dict:
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
    items = algo.num_items(batch)
    samples = batch.get("num_pairs") or batch["input_ids"].shape[0]

    def step():
        out = algo(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"].item()

    for _ in range(2):  # warm-up: optimiser state allocated, kernels chosen
        step()
    times, peaks = [], []
    for _ in range(repeats):
        before = _reset_peak(device)
        tic = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
        peaks.append(_peak(device) - before)
    median = statistics.median(times)
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    return {
        "algorithm": algorithm, "logprob": logprob, "rows": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]), "samples": int(samples), "items": int(items),
        "answer_tokens": answer_tokens, "median_s": round(median, 5), "min_s": round(min(times), 5),
        "samples_per_s": round(samples / median, 2), "answer_tokens_per_s": round(answer_tokens / median, 1),
        "peak_mem_mib": round(max(peaks) / 2**20, 1), "loss": round(loss, 5), "repeats": repeats,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 32000])
    parser.add_argument("--batch", type=int, default=8, help="conversations (SFT) and pairs (DPO) per step")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<machine>)")
    args = parser.parse_args(argv)

    from tpo.registry import build_model, load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    base_cfg = load_config(str(CONFIG)).to_dict()["model"]
    tpo_cfg = load_config(str(TPO_CONFIG)).to_dict()["model"]
    with tempfile.TemporaryDirectory() as tmp:
        sft_batch, dpo_batch = make_batches(Path(tmp), build_model(copy.deepcopy(base_cfg)).processor, args.batch)
        tpo_model = build_model(copy.deepcopy(tpo_cfg))
        tpo_batch = make_task_batch(Path(tmp), tpo_model.processor, tpo_model.tasks, args.batch)
    rows = []
    for vocab in args.vocab:
        cfg, task_cfg = copy.deepcopy(base_cfg), copy.deepcopy(tpo_cfg)
        if vocab != 512:
            cfg["llm"]["config"]["vocab_size"] = vocab
            task_cfg["llm"]["config"]["vocab_size"] = vocab
        for algorithm, batch in (("SFT", sft_batch), ("DPO", dpo_batch), ("TPO", tpo_batch)):
            for logprob in ("fused", "eager"):
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                row = {"case": f"{algorithm.lower()}[{logprob},V={vocab}]", "vocab": vocab,
                       **run_case(task_cfg if algorithm == "TPO" else cfg, algorithm, logprob, batch, device,
                                  args.repeats),
                       "device": device.type, "torch_threads": torch.get_num_threads() if device.type == "cpu" else "",
                       "load_avg_1m": None if load is None else round(load, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    folder = args.out or RESULTS / machine_name()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train_step.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = {
        "machine": machine_name(), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch_threads": args.threads if device.type == "cpu" else None,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "model": "configs/mllm/timm_mlp_llama.py (hidden 64, 2 layers; vision timm ViT 32x32, 4 frames)",
        "batch": f"SFT {args.batch} conversations, DPO {args.batch} pairs, TPO {args.batch} task samples "
                 "(configs/tpo/timm_mlp_llama.py: region, temporal, mask, track heads; synthetic benchmark, "
                 "max_length 512)",
        "memory": "CUDA: max_memory_allocated above the step's start; CPU: peak RSS (VmHWM reset via "
                  "/proc/self/clear_refs) above the RSS at the step's start",
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv if argv is None else ["bench_train_step.py", *argv]),
    }
    (folder / "train_step_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    print(f"wrote {folder / 'train_step.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
