"""Benchmark: DPO's ranking of held-out preference pairs (``rewards/accuracies``:
the fraction of pairs whose chosen answer gets the higher implicit reward
``beta * (log pi - log pi_ref)``), before and after training, for two data sets
whose chosen answers are correct and rejected ones wrong:

* ``colour``: one coloured square per image, "What colour is the shape?", the
  right colour chosen over a wrong one (the data of
  ``tests/algorithms/test_dpo.py::test_dpo_ranks_held_out_pairs``, same
  settings: 128 training pairs, 48 held-out, 8 pairs a step, lr 5e-3, beta
  0.5; ``--colour-steps``), over several seeds;
* ``synth``: the preference pairs of the synthetic benchmark (``tpo data
  synth``: one per scene, the correct option of a question about colour, shape,
  position, counts, motion or order chosen over a wrong option), trained with
  ``configs/dpo/timm_mlp_llama.py`` from the random initialisation.

    python benchmarks/bench_dpo_heldout.py [--seeds 0 1 2 3 4] [--scenes 400] [--steps 300]

Rows go to ``benchmarks/results/<machine>/dpo_heldout.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the colour pairs of the tests
sys.path.insert(0, str(ROOT / "benchmarks"))


def _val_records(history):
    return [r for r in history if r["split"] == "val"]


def colour_run(seed: int, work_dir: Path, steps: int = 45) -> dict:
    from engine_testkit import pair_items, train_config

    from tpo.engine import Trainer

    cfg = train_config(
        work_dir, algorithm={"type": "DPO", "loss": {"type": "DPOLoss", "beta": 0.5}},
        train={"batch_size": 8, "max_steps": steps, "seed": seed}, optim={"lr": 5e-3},
        schedule={"type": "cosine", "warmup_steps": 2},
        evaluation={"interval": max(1, steps // 3), "at_end": True, "metrics": [{"type": "PairwiseAccuracy"}],
                    "batch_size": 16},
    )
    tic = time.perf_counter()
    trainer = Trainer(cfg, train_dataset=pair_items(128), val_dataset=pair_items(48, seed=1, prefix="v"))
    trainer.fit()
    val = _val_records(trainer.history)
    return {"data": "colour", "seed": seed, "train_pairs": 128, "val_pairs": 48, "steps": steps,
            "accuracy_by_step": json.dumps({r["step"]: round(r["rewards/accuracies"], 4) for r in val}),
            "final_accuracy": round(val[-1]["rewards/accuracies"], 4),
            "final_margin": round(val[-1]["rewards/margins"], 4), "seconds": round(time.perf_counter() - tic, 1)}


def synth_run(scenes: int, steps: int, seed: int, work_dir: Path) -> dict:
    from tpo.data import synthesize
    from tpo.engine import Trainer

    data = work_dir / "synth"
    summary = synthesize(data, num=scenes, seed=seed)
    options = {"data.train.ann_file": str(data / "train.jsonl"), "data.val.ann_file": str(data / "val.jsonl"),
               "train.max_steps": steps, "train.seed": seed, "train.progress_bar": False,
               "train.tensorboard": False, "evaluation.interval": max(1, steps // 6),
               "checkpoint.interval": None, "checkpoint.save_final": False}
    tic = time.perf_counter()
    trainer = Trainer(str(ROOT / "configs" / "dpo" / "timm_mlp_llama.py"), cfg_options=options,
                      work_dir=str(work_dir / "run"))
    trainer.fit()
    val = _val_records(trainer.history)
    pairs = summary["tasks"]["preference"]
    return {"data": f"synth[{scenes} scenes]", "seed": seed, "train_pairs": summary["splits"]["train"]["scenes"],
            "val_pairs": summary["splits"]["val"]["scenes"], "steps": steps,
            "accuracy_by_step": json.dumps({r["step"]: round(r["rewards/accuracies"], 4) for r in val}),
            "final_accuracy": round(val[-1]["rewards/accuracies"], 4),
            "final_margin": round(val[-1]["rewards/margins"], 4), "seconds": round(time.perf_counter() - tic, 1),
            "note": f"{pairs} preference samples in all splits"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300, help="steps of the synth run")
    parser.add_argument("--colour-steps", type=int, default=90, help="steps of the colour runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench_train_step import RESULTS, machine_name

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(colour_run(seed, Path(tmp) / f"colour{seed}", args.colour_steps))
            print(json.dumps(rows[-1]), flush=True)
        rows.append(synth_run(args.scenes, args.steps, 0, Path(tmp) / "synth"))
        print(json.dumps(rows[-1]), flush=True)
    folder = args.out or RESULTS / machine_name()
    folder.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r)) + ["torch_threads", "load_avg_1m"]
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with open(folder / "dpo_heldout.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "torch_threads": args.threads, "load_avg_1m": load})
    print(f"wrote {folder / 'dpo_heldout.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
