"""Time and peak memory of the fused linear log-prob and preference-loss kernels
against eager torch and Liger-Kernel; writes CSV and PNG plots to
``benchmarks/results/<machine>/``.

    python benchmarks/run_kernel_benchmarks.py                     # the set of this machine (GPU if any)
    python benchmarks/run_kernel_benchmarks.py --ops logprob --ns 1024,4096 --repeats 5

What is measured (each case in fresh subprocesses, so no measurement sees another's memory):

* time: one process per (op, size) builds the inputs once, warms every provider up (Triton
  and torch.compile compilation), then runs ``repeats`` rounds, each round every provider
  and mode in turn (interleaved, so a noisy neighbour hits all of them alike); reports the
  minimum and the median of the wall time, and of the process's CPU time (all its threads,
  ``time.process_time``: less sensitive to other processes sharing the cores, though
  threads spinning at barriers count). Modes: ``fwd`` (forward, building the autograd
  graph), ``bwd`` (backward alone, after an untimed forward), ``fwd+bwd``.
* peak memory: one process per (op, size, provider). On CUDA: ``torch.cuda`` peak allocated
  bytes above what was allocated before the call. On CPU (torch has no CPU allocator
  statistics; tracemalloc does not see torch's allocations): the process's peak resident set
  (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``) above its
  resident set just before the call, with glibc told to serve every allocation above 64 KiB by
  ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``) and trimmed (``malloc_trim``) before the call, so
  that freed memory leaves the resident set at once and cached free memory cannot hide a
  peak. Inputs exist before the call and are not counted; everything the call creates is
  (outputs, saved tensors, gradients of hidden and weight, temporaries).

Targets reported (not asserted): CPU fused log-prob ``fwd+bwd`` peak memory <= 1/8 of eager's
and time <= 1.1x eager's; fused DPO with a reference model at least as fast as Liger's
``LigerFusedLinearDPOLoss`` with no more peak memory.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchkit  # noqa: E402


# ------------------------------------------------------------------------------- the ops
def _module(op: str):
    if op == "logprob":
        import bench_fused_linear_logprob as module
    else:
        import bench_preference_loss as module
    return module


def _inputs(op: str, case: dict):
    import torch

    module = _module(op)
    dtype = getattr(torch, case["dtype"])
    if op == "logprob":
        return module.make_inputs(case["N"], case["H"], case["V"], dtype, case["device"])
    return module.make_inputs(case["H"], case["V"], dtype, case["device"], case["prompt"])


# ------------------------------------------------------------------------------- workers
def worker_time(spec: dict) -> dict:
    module = _module(spec["op"])
    case = spec["case"]
    inputs = _inputs(spec["op"], case)
    sync = benchkit.synchronizer(case["device"])
    providers = spec["providers"]
    for provider in providers:  # warm-up: compilation, first-touch of buffers
        benchkit.time_call(module.PROVIDERS[provider], "fwd+bwd", inputs, sync)
    times = {(p, m): [] for p in providers for m in spec["modes"]}
    load_before = os.getloadavg()
    for _ in range(spec["repeats"]):
        for provider in providers:
            for mode in spec["modes"]:
                gc.collect()
                times[(provider, mode)].append(benchkit.time_call(module.PROVIDERS[provider], mode, inputs, sync))
    load_after = os.getloadavg()
    return dict(times={f"{p}|{m}": v for (p, m), v in times.items()},
                load=[round(load_before[0], 2), round(load_after[0], 2)])


def worker_memory(spec: dict) -> dict:
    module = _module(spec["op"])
    case = spec["case"]
    provider = spec["provider"]
    inputs = _inputs(spec["op"], case)
    cuda = case["device"] == "cuda"
    sync = benchkit.synchronizer(case["device"])
    fn = module.PROVIDERS[provider]
    benchkit.time_call(module.PROVIDERS[provider], "fwd+bwd", inputs, sync)  # warm-up
    peaks = {}
    for mode in ("fwd", "fwd+bwd"):
        benchkit.clear_grads(inputs)
        base = benchkit.reset_peak(case["device"])  # CPU: malloc_trim, VmRSS, VmHWM reset through /proc/self/clear_refs
        out = fn(**inputs)
        if mode == "fwd+bwd":
            out.backward()
        sync()
        peaks[mode] = benchkit.peak(case["device"]) - base
        del out
    method = ("torch.cuda.max_memory_allocated above the allocated bytes before the call" if cuda else
              "peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS before the call; "
              "MALLOC_MMAP_THRESHOLD_=65536, malloc_trim before")
    return dict(peaks=peaks, method=method)


def _spawn(kind: str, spec: dict) -> dict:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if kind == "memory" else None
    return benchkit.run_worker(Path(__file__), f"--worker-{kind}", spec, env)


# ------------------------------------------------------------------------------- driver
def _cases(op: str, device: str, ns):
    module = _module(op)
    cfg = module.GPU_SET if device == "cuda" else module.CPU_SET
    base = dict(H=cfg["H"], V=cfg["V"], dtype=str(cfg["dtype"]).replace("torch.", ""), device=device)
    if op == "logprob":
        return [dict(base, N=n) for n in (ns or cfg["Ns"])]
    tokens = 2 * module.PAIRS * module.TOKENS
    return [dict(base, prompt=p, N=tokens, pairs=module.PAIRS, tokens=module.TOKENS) for p in cfg["prompts"]]


def run_op(op: str, device: str, ns, repeats: int, log) -> list[dict]:
    module = _module(op)
    rows = []
    for case in _cases(op, device, ns):
        providers, skipped = [], {}
        for provider in module.PROVIDERS:
            ok, why = module.available(provider, device)
            (providers.append(provider) if ok else skipped.__setitem__(provider, why))
        log(f"[{op}] {case} providers={providers} skipped={list(skipped)}")
        timing = _spawn("time", dict(op=op, case=case, providers=providers, modes=list(module.MODES), repeats=repeats))
        memory = {p: _spawn("memory", dict(op=op, case=case, provider=p)) for p in providers}
        for provider in module.PROVIDERS:
            for mode in module.MODES:
                row = dict(op=op, **case, provider=provider, mode=mode)
                if provider in skipped:
                    row.update(status=f"skipped: {skipped[provider]}")
                else:
                    pairs = timing["times"][f"{provider}|{mode}"]
                    ts, cs = [w for w, _ in pairs], [c for _, c in pairs]
                    row.update(status="ok", time_min_s=round(min(ts), 4), time_median_s=round(statistics.median(ts), 4),
                               cpu_min_s=round(min(cs), 4), cpu_median_s=round(statistics.median(cs), 4),
                               repeats=len(ts), load_avg_1min=f"{timing['load'][0]}->{timing['load'][1]}")
                    peak = memory[provider]["peaks"].get(mode)
                    if peak is not None:
                        row.update(peak_mem_mib=round(peak / 2**20, 1), mem_method=memory[provider]["method"])
                rows.append(row)
                log("   " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("mem_method", "op", "device")))
    return rows


def _plot(path: Path, rows: list[dict], op: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    xkey = "N" if op == "logprob" else "prompt"
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    panels = [("fwd", "time_min_s", "forward, wall (s)"), ("bwd", "time_min_s", "backward, wall (s)"),
              ("fwd+bwd", "time_min_s", "forward + backward, wall (s)"),
              ("fwd+bwd", "cpu_min_s", "forward + backward, process CPU (s)"),
              ("fwd+bwd", "peak_mem_mib", "peak memory fwd+bwd (MiB)")]
    for ax, (mode, key, label) in zip(axes, panels):
        for provider in providers:
            pts = sorted((float(r[xkey]), float(r[key])) for r in ok
                         if r["provider"] == provider and r["mode"] == mode and r.get(key) not in (None, ""))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xlabel("tokens N" if op == "logprob" else "prompt share (masked)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _title(title, device, desc, rows, repeats) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    case = ok[0] if ok else {}
    return (f"{title} | {device} {desc.get('gpu', desc['cpu'])}, {desc['cpu_cores']} cores, torch {desc['torch']} | "
            f"H={case.get('H')} V={case.get('V')} {case.get('dtype')} | min of {repeats}")


def _ratios(a: dict, b: dict) -> dict:
    """Row ``a`` over row ``b``: peak memory, wall time by min and by median, CPU time by min."""
    cols = {"mem": "peak_mem_mib", "min": "time_min_s", "median": "time_median_s", "cpu": "cpu_min_s"}
    return {k: a[c] / b[c] for k, c in cols.items()}


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _targets(op: str, rows: list[dict]) -> list[str]:
    get = {(r["provider"], r["mode"], r.get("N") if op == "logprob" else r.get("prompt")): r for r in rows if r["status"] == "ok"}
    lines = []
    keys = sorted({k[2] for k in get})
    for key in keys:
        fused = get.get(("fused", "fwd+bwd", key))
        if op == "logprob":
            eager = get.get(("eager", "fwd+bwd", key))
            seq = get.get(("fused_seq", "fwd+bwd", key))
            if seq and eager:
                r = _ratios(seq, eager)
                lines.append(f"logprob N={key}: fused_seq (recomputing backward)/eager peak memory {r['mem']:.3f}; "
                             f"time {r['min']:.2f}x by min, {r['median']:.2f}x by median, {r['cpu']:.2f}x by min CPU time")
            if fused and eager:
                r = _ratios(fused, eager)
                lines.append(f"logprob N={key}: fused/eager peak memory {r['mem']:.3f} (target <= 0.125: "
                             f"{_met(r['mem'] <= 0.125)}); time {r['min']:.2f}x by min, {r['median']:.2f}x by median, "
                             f"{r['cpu']:.2f}x by min CPU time (target <= 1.1: {_met(r['min'] <= 1.1)})")
            matmul = get.get(("matmul", "fwd+bwd", key))
            gpu = (matmul or {}).get("device") == "cuda"
            for name, row in (("fused", fused), ("fused_seq", seq)):
                if row and matmul:  # the GPU target: within 1.5x of the same matmul passes in cuBLAS
                    t = row["time_min_s"] / matmul["time_min_s"]
                    target = f" (target <= 1.5: {_met(t <= 1.5)})" if gpu else ""
                    lines.append(f"logprob N={key}: {name}/matmul passes (4 matmuls alone) time {t:.2f}x by min{target}")
            liger = get.get(("liger", "fwd+bwd", key))
            if fused and liger:  # the GPU target: faster than Liger's fused linear cross-entropy, with less memory
                r = _ratios(fused, liger)
                lines.append(f"logprob N={key}: fused/liger time {r['min']:.2f}x by min (target < 1: "
                             f"{_met(r['min'] < 1)}); peak memory {r['mem']:.3f} (target < 1: {_met(r['mem'] < 1)})")
        else:
            liger = get.get(("liger", "fwd+bwd", key))
            if fused and liger:
                r = _ratios(fused, liger)
                lines.append(f"dpo prompt={key}: fused/liger time {r['min']:.2f}x by min, {r['median']:.2f}x by median, "
                             f"{r['cpu']:.2f}x by min CPU time (target <= 1: {_met(r['min'] <= 1.0)}); "
                             f"peak memory {r['mem']:.3f} (target <= 1: {_met(r['mem'] <= 1)})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--ops", default="logprob,dpo", help="comma list of: logprob, dpo")
    parser.add_argument("--ns", default="", help="token counts for logprob (default: the set's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="results folder (default benchmarks/results/<machine>)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from the CSVs in the results folder")
    parser.add_argument("--worker-time", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_time or args.worker_memory:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        result = worker_time(json.loads(args.worker_time)) if args.worker_time else worker_memory(json.loads(args.worker_memory))
        print(json.dumps(result))
        return

    import torch

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = "cuda" if cuda else "cpu"
    out = Path(args.out) if args.out else benchkit.RESULTS / benchkit.machine_name(cuda)
    out.mkdir(parents=True, exist_ok=True)
    ns = [int(x) for x in args.ns.split(",") if x]
    names = {"logprob": ("fused_linear_logprob", "fused_linear_logprob: sum of label log-probs"),
             "dpo": ("preference_loss", "DPO with reference model, 4 pairs x 512 tokens")}
    if args.replot:
        desc = json.loads((out / "fused_linear_kernels_machine.json").read_text())
        for op in [o for o in args.ops.split(",") if o]:
            stem, title = names[op]
            with open(out / f"{stem}.csv", newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            _plot(out / f"{stem}.png", rows, op, _title(title, device, desc, rows, desc.get("repeats")))
        return
    desc = benchkit.machine_description(cuda)
    desc.update(date=dt.datetime.now().isoformat(timespec="seconds"), device=device, repeats=args.repeats)
    log_lines = [f"machine: {json.dumps(desc)}"]

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    log(log_lines[0])
    summary = []
    for op in [o for o in args.ops.split(",") if o]:
        started = time.time()
        rows = run_op(op, device, ns, args.repeats, log)
        stem, title = names[op]
        for row in rows:
            row.update(machine=benchkit.machine_name(cuda), cpu=desc["cpu"], cpu_cores=desc["cpu_cores"],
                       torch=desc["torch"])
        benchkit.write_csv(out / f"{stem}.csv", rows)
        _plot(out / f"{stem}.png", rows, op, _title(title, device, desc, rows, args.repeats))
        summary += _targets(op, rows)
        log(f"[{op}] done in {time.time() - started:.0f} s -> {out / (stem + '.csv')}")
    for line in summary:
        log(line)
    (out / "fused_linear_kernels_machine.json").write_text(json.dumps(desc, indent=2) + "\n")
    (out / "fused_linear_kernels_log.txt").write_text("\n".join(log_lines + ["", *summary]) + "\n")


if __name__ == "__main__":
    main()
