"""``tpo experiment CONFIG``: a complete, small TPO experiment.

It writes a synthetic benchmark, trains an SFT-only baseline and a TPO model
(its three stages) with the same number of optimiser steps, evaluates both on
the held-out split (QA accuracy, box Acc@0.5, temporal R@0.5, mask IoU) next to
answers that look at nothing (the ``no-input`` row: option A, the whole frame,
the whole clip; a run's number means something where it beats that row), and
prints the table and the paths of the plots. Every scored answer is in
``<work_dir>/predictions/<run>.jsonl`` (question, the run's text, target, score).

The config names the benchmark (``synth=dict(num=..., seed=..., frames=...,
size=...)``), the runs (``runs=dict(sft=dict(config=..., cfg_options=...),
tpo=dict(config=...))``: training configs, staged or not, whose data paths
under ``data_root`` are re-rooted to the benchmark written here) and the
evaluation (``evaluation=dict(split="test", limit=..., max_new_tokens=...)``); optionally
``threads``, torch's intra-op threads for the whole experiment (tiny models run
fastest on one: on a machine busy with other jobs, several threads spin
against each other and take many times longer). Finished parts are not run
again: the experiment resumes where it stopped. ``<work_dir>/experiment.json``
records the benchmark's settings (with the generator's version) and each run's
resolved config; a rerun whose benchmark or a started run's config differs is
refused, naming what changed, rather than mixing old results into the table.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from tpo.errors import CONFIG_ERRORS, is_setup_error, print_config_error
from tpo.registry import load_config

from .checkpoint import latest_checkpoint
from .config import as_json, describe_differences, differences

METRICS = [("qa/accuracy", "QA acc"), ("box/acc@0.5", "box Acc@0.5"), ("temporal/R@0.5", "temporal R@0.5"),
           ("mask/miou", "mask IoU"), ("track/auc", "track AUC"), ("assign/accuracy", "task assign")]
NO_INPUT = "no-input"  # the table's reference row: option (A), the whole frame as box and mask, the whole clip


def reroot(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` moved under ``new``."""
    if isinstance(value, Mapping):
        return {k: reroot(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(reroot(v, old, new) for v in value)
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


def _run_config(run: Mapping[str, Any], data_root: str, synth_dir: Path) -> tuple[dict, str]:
    from .stages import training_keys

    path = str(run["config"])
    cfg = training_keys(load_config(path, run.get("cfg_options")).to_dict(), path, run.get("cfg_options"))
    return reroot(cfg, data_root, str(synth_dir)), path


def _check_runs(runs: Mapping[str, tuple[dict, str]], given: Mapping[str, Any], root: Path) -> None:
    """What `tpo train` checks of each run's config (keys, values, components, data files, stages),
    as read from its file with its cfg_options (``given``: the experiment's ``runs``)."""
    from .config import validate
    from .stages import check_stage_plan

    for name, (run_cfg, path) in runs.items():
        options = given[name].get("cfg_options")
        try:
            if "stages" in run_cfg:
                check_stage_plan(run_cfg, root / name, path, options)
            else:
                validate(run_cfg, source=path, cfg_options=options)
        except CONFIG_ERRORS as err:
            raise type(err)(f"runs.{name}: {err.args[0] if err.args else err}") from None


def _train(name: str, cfg: dict, work_dir: Path, resume: bool) -> str:
    from .stages import run_stages
    from .trainer import Trainer

    done = work_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())["final_checkpoint"]
    if "stages" in cfg:
        final = run_stages(cfg, work_dir=str(work_dir), resume=True)["final_checkpoint"]
    else:
        has_ckpt = latest_checkpoint(work_dir / "checkpoints") is not None
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        final = Trainer(dict(cfg, work_dir=str(work_dir)), resume=resume and has_ckpt).fit()["final_checkpoint"]
    done.write_text(json.dumps({"final_checkpoint": final}))
    return final


def _steps(cfg: Mapping[str, Any]) -> int:
    from .stages import merge

    if "stages" in cfg:
        return sum(merge(cfg, s).get("train", {}).get("max_steps") or 0 for s in cfg["stages"])
    return cfg.get("train", {}).get("max_steps") or 0


RECORD_FILE = "experiment.json"  # in the work dir: the benchmark and each run's config, as trained


def _benchmark_params(synth_cfg: Mapping[str, Any]) -> dict:
    """What ``synthesize(**synth_cfg)`` records about its benchmark in ``summary.json`` (the
    generator's version and every setting that changes its files, defaults filled in)."""
    import inspect

    from tpo.data import synth

    params = inspect.signature(synth.synthesize).parameters
    unknown = sorted(set(synth_cfg) - set(params) - {"out_dir"})
    if unknown or "out_dir" in synth_cfg:
        key = unknown[0] if unknown else "out_dir"
        raise KeyError(f"synth.{key}: {'unknown key' if unknown else 'set by the experiment (<work_dir>/synth)'}; "
                       f"synth takes {', '.join(p for p in params if p != 'out_dir')}")
    if "num" not in synth_cfg:
        raise KeyError("synth.num: the number of scenes is required (synth=dict(num=100, seed=0, ...))")
    given = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    given.update(synth_cfg)
    return as_json({
        "version": synth.VERSION, "seed": given["seed"], "frames": given["frames"], "size": given["size"],
        "image_fraction": given["image_fraction"], "objects": list(given["objects"]),
        "max_speed": synth.default_max_speed(given["size"]) if given["max_speed"] is None else given["max_speed"],
        "num_scenes": given["num"],
        "split_fractions": [float(f) for f in given["splits"]], "preference_pairs": given["preference_pairs"],
    })


def _check_work_dir(root: Path, benchmark: dict, runs: Mapping[str, dict]) -> dict:
    """Refuse to reuse a work dir whose benchmark or finished runs came from other settings
    (the table would mix them silently); returns the record to write. A run is compared once it
    has started training (its folder exists)."""
    record_file = root / RECORD_FILE
    fix = f"use another --work-dir, or delete {str(root)!r} to start over"
    if not record_file.is_file():
        left = [p for p in [root / "synth" / "summary.json", *(root / name for name in runs)] if p.exists()]
        if left:
            raise ValueError(f"work_dir {str(root)!r} holds an experiment without {RECORD_FILE} (written by an "
                             f"earlier version of tpo: {str(left[0])!r}), whose settings cannot be checked; {fix}")
        return {"benchmark": benchmark, "runs": dict(runs)}
    record = json.loads(record_file.read_text())
    diffs = differences(record.get("benchmark"), benchmark)
    if diffs:
        raise ValueError(f"work_dir {str(root)!r} holds an experiment on another benchmark "
                         f"({describe_differences(diffs)}); "
                         f"its finished runs would be scored on, and trained from, the wrong data: {fix}")
    trained = dict(record.get("runs") or {})
    for name, cfg in runs.items():
        if name in trained and (root / name).exists():
            diffs = differences(trained[name], cfg)
            if diffs:
                raise ValueError(f"runs.{name}: its config changed since it trained in {str(root / name)!r} "
                                 f"({describe_differences(diffs)}); {fix}")
        trained[name] = cfg
    return {"benchmark": benchmark, "runs": trained}


def _check_budgets(runs: Mapping[str, tuple[dict, str]], split_file: Path, eval_cfg: Mapping[str, Any]) -> None:
    """Each run's tokenizer can write the scored part of every reference answer
    of the evaluated split within ``max_new_tokens``: checked from the
    annotations before any run trains, not after."""
    from tpo.data.datasets import SampleDataset
    from tpo.evaluation import check_answer_budget
    from tpo.registry import build_tokenizer

    if not split_file.is_file():
        raise FileNotFoundError(f"evaluation.split: {str(split_file)!r} does not exist; the benchmark writes "
                                f"{', '.join(sorted(p.stem for p in split_file.parent.glob('*.jsonl')))}")
    dataset = SampleDataset(str(split_file), check_media=False)
    for name, (run_cfg, _) in runs.items():
        tokenizer_cfg = (run_cfg.get("model") or {}).get("tokenizer")
        if tokenizer_cfg is None:
            continue
        try:
            check_answer_budget(build_tokenizer(tokenizer_cfg), dataset, eval_cfg.get("max_new_tokens", 48),
                                eval_cfg.get("limit"))
        except ValueError as err:
            raise ValueError(f"evaluation.max_new_tokens (run {name!r}): {err}") from None


def run_experiment(config, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None) -> dict:
    """Check the experiment's config and write its benchmark (:func:`prepare_experiment`), then
    train and evaluate every run; returns the summary (also ``<work_dir>/results.json``)."""
    return execute_experiment(prepare_experiment(config, cfg_options, work_dir))


def prepare_experiment(config, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None) -> dict:
    """Everything that can be wrong with the config, found before any training: the runs and
    their budgets, the evaluation keys, the benchmark's settings, the work dir's earlier
    settings, each run's training config (as `tpo train` checks it, on the written benchmark)
    and the answer budget against the written benchmark. Returns the plan that
    :func:`execute_experiment` runs."""
    from tpo.data.synth import synthesize

    cfg = load_config(config, cfg_options)
    if work_dir:
        cfg["work_dir"] = work_dir
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: torch's intra-op threads, a positive int (or None for torch's default), "
                         f"got {threads!r}")
    root = Path(cfg.get("work_dir") or Path("work_dirs") / Path(str(config)).stem)
    synth_cfg = dict(cfg.get("synth", {}))
    data_root = cfg.get("data_root", "work_dirs/synth")
    synth_dir = root / "synth"
    if not cfg.get("runs") or NO_INPUT in cfg["runs"]:
        raise ValueError(f"runs: name at least one run (dict(name=dict(config=...))), none called {NO_INPUT!r} "
                         f"(the table's row of answers that look at nothing), got {list(cfg.get('runs') or [])}")
    runs = {name: _run_config(run, data_root, synth_dir) for name, run in cfg["runs"].items()}
    steps = {name: _steps(run_cfg) for name, (run_cfg, _) in runs.items()}
    if cfg.get("same_budget", True) and len(set(steps.values())) > 1:
        raise ValueError(f"runs: the optimiser steps differ ({steps}); give every run the same budget, "
                         "or set same_budget=False")
    eval_cfg = dict(cfg.get("evaluation", {}))
    unknown = sorted(set(eval_cfg) - {"split", "limit", "max_new_tokens"})
    if unknown:
        raise KeyError(f"evaluation.{unknown[0]}: unknown key; it takes split, limit, max_new_tokens")
    split = eval_cfg.pop("split", "test")
    benchmark = _benchmark_params(synth_cfg)
    as_trained = {name: as_json(reroot(run_cfg, str(synth_dir), "<work_dir>/synth"))
                  for name, (run_cfg, _) in runs.items()}
    record = _check_work_dir(root, benchmark, as_trained)
    started = time.time()
    from .checkpoint import write_json

    root.mkdir(parents=True, exist_ok=True)
    write_json(root / RECORD_FILE, record)
    if not (synth_dir / "summary.json").is_file():
        print(f"[experiment] writing the synthetic benchmark to {synth_dir}", flush=True)
        synthesize(synth_dir, **synth_cfg)
    _check_runs(runs, cfg["runs"], root)  # once the benchmark, their data, is written
    _check_budgets(runs, synth_dir / f"{split}.jsonl", eval_cfg)  # before any training
    return dict(root=root, synth_dir=synth_dir, runs=runs, steps=steps, split=split, eval_cfg=eval_cfg,
                threads=threads, started=started)


def execute_experiment(plan: Mapping[str, Any]) -> dict:
    """Train (or reuse) and evaluate every run of a :func:`prepare_experiment` plan."""
    plan = dict(plan)
    threads, before = plan.pop("threads"), torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _execute(**plan)
    finally:
        torch.set_num_threads(before)


def _execute(root: Path, synth_dir: Path, runs, steps, split: str, eval_cfg, started: float) -> dict:
    from tpo.data.datasets import SampleDataset
    from tpo.evaluation import evaluate, evaluate_trivial
    from tpo.models.utils import load_model_weights
    from tpo.registry import build_model

    results: dict[str, Any] = {}
    for name, (run_cfg, path) in runs.items():
        finished = (root / name / "done.json").is_file()
        print(f"[experiment] {'reusing' if finished else 'training'} {name} ({path}, {steps[name]} steps"
              f"{', finished earlier in this work dir' if finished else ''})", flush=True)
        final = _train(name, run_cfg, root / name, resume=True)
        model = build_model(run_cfg["model"])
        load_model_weights(model, final)
        dataset = SampleDataset(str(synth_dir / f"{split}.jsonl"), num_frames=getattr(model.processor, "num_frames"))
        print(f"[experiment] evaluating {name} on {split}", flush=True)
        results[name] = evaluate(model, dataset, predictions=root / "predictions" / f"{name}.jsonl", **eval_cfg)
        results[name]["final_checkpoint"] = final
    results[NO_INPUT] = evaluate_trivial(dataset, limit=eval_cfg.get("limit"),
                                         predictions=root / "predictions" / f"{NO_INPUT}.jsonl")
    table = format_table(results)
    plots = plot_results(results, root)
    summary = {"results": results, "steps": steps, "wall_time_s": round(time.time() - started, 1),
               "table": table, "plots": plots, "work_dir": str(root),
               "predictions": {name: str(root / "predictions" / f"{name}.jsonl") for name in results}}
    (root / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (root / "results.md").write_text(table + "\n")
    return summary


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    header = "| run | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for name, res in results.items():
        cells = ["n/a" if res.get(key) is None else f"{res[key]:.3f}" for key, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: Mapping[str, Mapping[str, Any]], root: Path) -> list[str]:
    """A bar chart of the metrics per run, plus each run's own training plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(results), 1)
    for i, (name, res) in enumerate(results.items()):
        values = [res.get(key) or 0.0 for key, _ in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], values, width=width, label=name)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(METRICS))])
    ax.set_xticklabels([label for _, label in METRICS])
    ax.set_ylim(0, 1)
    ax.set_title("held-out results")
    ax.legend()
    fig.tight_layout()
    out = root / "results.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    plots = [str(out)]
    for name in results:  # each run's (or stage's) training curves
        plots += sorted(str(p) for p in (root / name).rglob("*.png"))
    return plots


def experiment_main(argv=None) -> int:
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(prog="tpo experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE")
    parser.add_argument("--work-dir")
    args = parser.parse_args(argv)
    try:  # config errors are one line, found before any training
        plan = prepare_experiment(args.config, args.cfg_options, args.work_dir)
    except CONFIG_ERRORS as err:
        return print_config_error(parser.prog, err)
    try:
        summary = execute_experiment(plan)
    except CONFIG_ERRORS as err:
        if not is_setup_error(err):  # not the config's: a bug, with its traceback
            raise
        return print_config_error(parser.prog, err)
    print(summary["table"])
    print(f"wall time: {summary['wall_time_s']:.0f} s (writing the benchmark, training, evaluating)")
    print(f"results: {os.path.join(summary['work_dir'], 'results.json')}")
    print(f"answers: {os.path.join(summary['work_dir'], 'predictions', '<run>.jsonl')}")
    print("plots:\n  " + "\n  ".join(summary["plots"]))
    return 0
