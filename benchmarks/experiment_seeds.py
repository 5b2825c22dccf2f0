"""An experiment of ``tpo experiment`` over several training seeds: the same benchmark, each run trained
with ``train.seed`` = 0, 1, 2, ... (every run of the config, staged or not), one after another; the
scores of each seed and their mean.

    python benchmarks/experiment_seeds.py configs/experiments/small_cpu.py [--seeds 0 1 2]
        [--work-dir work_dirs/<name>_seeds] [--note TEXT] [--out DIR]

Run from the repository root (the experiment configs name their runs' configs from there). Each seed
trains in ``<work-dir>/seed<s>`` (finished seeds are reused, as ``tpo experiment`` reuses finished runs).
Writes ``benchmarks/results/<machine>/<name>_seeds.json`` (``<name>``: the name of the config's work dir):
the command, the commit, the machine, each seed's scores and wall time, and their mean; the mean a file
there already held moves to its ``before`` list, with ``--note`` saying what changed since.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

SCORES = ["qa/accuracy", "box/acc@0.5", "box/miou", "temporal/R@0.5", "mask/miou", "track/auc", "assign/accuracy"]


def commit() -> str:
    """The checkout's commit, ``+changes`` when the tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def mean_of(seeds: dict) -> dict:
    runs = [run for run in next(iter(seeds.values())) if run != "wall_time_s"]
    out = {}
    for run in runs:
        out[run] = {}
        for key in SCORES:
            values = [s[run].get(key) for s in seeds.values()]
            out[run][key] = None if any(v is None for v in values) else round(sum(values) / len(values), 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", default=None, help="default: work_dirs/<name>_seeds")
    parser.add_argument("--note", default="", help="what changed since the mean a results file already holds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<machine>)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if not Path(args.config).is_file():
        parser.error(f"config {args.config!r} does not exist")

    import torch
    from benchkit import RESULTS, cpu_name, machine_name
    from tpo.registry import load_config

    from tpo.engine.experiment import run_experiment

    base = load_config(args.config).to_dict()
    name = Path(base.get("work_dir") or Path(args.config).stem).name
    work_dir = Path(args.work_dir or f"work_dirs/{name}_seeds")
    seeds = {}
    for seed in args.seeds:
        cfg = copy.deepcopy(base)
        for run in cfg["runs"].values():
            run["cfg_options"] = {**(run.get("cfg_options") or {}), "train.seed": seed}
        summary = run_experiment(cfg, work_dir=str(work_dir / f"seed{seed}"))
        seeds[str(seed)] = {run: {k: scores.get(k) for k in SCORES} for run, scores in summary["results"].items()}
        seeds[str(seed)]["wall_time_s"] = summary["wall_time_s"]
    threads = base.get("threads") or torch.get_num_threads()
    record = {
        "command": f"python benchmarks/experiment_seeds.py {args.config} --seeds {' '.join(map(str, args.seeds))}",
        "commit": commit(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread(s), the seeds one after another",
        "seeds": seeds,
        "mean": mean_of(seeds),
    }
    path = (args.out or RESULTS / machine_name()) / f"{name}_seeds.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        record["before"] = [{"commit": old.get("commit"), "note": args.note, "mean": old.get("mean")},
                            *old.get("before", [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    for run, scores in record["mean"].items():
        print(run, json.dumps(scores))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
