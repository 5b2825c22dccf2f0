"""Benchmark: DPO's ranking of held-out preference pairs (``rewards/accuracies``:
the fraction of pairs whose chosen answer gets the higher implicit reward
``beta * (log pi - log pi_ref)``; a tie counts half), for two data sets whose
chosen answers are correct and rejected ones wrong:

* ``colour``: one coloured square per image, "What colour is the shape?", the
  right colour chosen over a wrong one (the data of
  ``tests/algorithms/test_dpo.py::test_dpo_ranks_held_out_pairs``, same
  settings: 128 training pairs, 48 held-out, 8 pairs a step, lr 5e-3, beta
  0.5; ``--colour-steps``), over several seeds;
* ``synth``: the preference pairs of the synthetic benchmark (``tpo data
  synth``, by default ``--preference-pairs all``: one pair per question, the
  correct option of a question about colour, shape, position, counts, motion,
  order or events chosen over a wrong option of the same question), trained
  with ``configs/dpo/timm_mlp_llama.py`` (optionally after an SFT stage of
  ``configs/sft/timm_mlp_llama.py`` on the training scenes' QA answers and
  the pairs' chosen answers, ``--sft-steps``; DPO then starts from it, as
  ``load_from`` does). Held-out
  accuracy is also given per question type, and each synth run has a
  **blind control**: the same run with every frame replaced by one black
  image, which can only learn the answers' text priors. The seeing run beats
  the blind one only where the model uses the pixels.

    python benchmarks/bench_dpo_heldout.py [--seeds 0 1 2 3 4] [--synth-seeds 0 1] [--scenes 400] [--steps 300]
        [--preference-pairs all] [--objects 2 4] [--sft-steps 0] [--synth-options KEY=VALUE ...] [--no-blind]
        [--skip-colour] [--colour-side 16 24] [--colour-pairs 128 48] [--colour-options KEY=VALUE ...] [--append]

Rows go to ``benchmarks/results/<machine>/dpo_heldout.csv``. The committed rows
of ``cpu-intel-r-xeon-r-processor-2c`` come from the default run (about 6
minutes on one thread), then ``--skip-colour --synth-seeds 0 --no-blind
--sft-steps 1500 --sft-tasks qa preference caption --synth-options
model.vision_encoder.model_kwargs.patch_size=4
model.vision_encoder.model_kwargs.embed_dim=64
model.vision_encoder.freeze=False data.collator.max_length=1024 --append``.
What they show: the colour pairs are learnt (0.98-1.0); on the synth pairs
the seeing runs (0.46-0.53; 0.51 after 1,500 SFT steps on QA and
descriptions with a trainable ViT of 4x4 patches) are no better than their
blind controls (0.49),
which are at chance since the benchmark's options stopped giving answers away
by their text: within this CPU budget the tiny model does not learn to read
the answers from the frames.

Then why, in rows of their own (the last ones; loads of 1-3: another run beside them):

* ``--seeds 0 1 2 --colour-steps 300 --colour-side 4 8 --colour-pairs 1024 96 --synth-seeds``, without and with
  ``--colour-options model.vision_encoder.model_kwargs.patch_size=4``: the colour pairs with squares of 4-8
  pixels (about the size of the benchmark's shapes once its 64-pixel frames are at the ViT's 32) instead of
  16-24 rank 0.47 / 0.77 / 0.91 over three seeds with
  the tiny ViT's 8x8 patches, 0.90 / 0.93 / 0.74 with 4x4 ones: a small object is what the tiny model does
  not reliably find in the frame, and finer patches help;
* ``--skip-colour --synth-seeds 0 --objects 1 1`` (one shape a scene, ``tpo data synth --objects 1 1``, the
  benchmark's easiest form): 300 steps 0.61 seeing vs 0.67 blind; 3,000 scenes and 3,000 steps 0.571 vs 0.575
  (colour questions 0.48: at chance); with lr 5e-3 and beta 0.5 (the colour runs' settings) 0.62 after 1,000
  steps, and with 4x4 patches too 0.61 (colour 0.54). Even one shape a scene, among six kinds of question over
  eight frames, is more than the tiny model learns to read in a CPU budget; the colour pairs' one question on
  one image is not.

What makes it read them, in the rows ``synth[1000 scenes, 1-1 shapes, images only, pairs=all]`` (``tpo data
synth --objects 1 1 --image-fraction 1``: one shape an image; its pairs ask for the shape's colour, its shape,
where it is, and how many shapes of a kind the image holds):

* without help (``--skip-colour --synth-seeds 0 --scenes 1000 --objects 1 1 --image-fraction 1 --steps 600
  --no-blind --synth-options optim.lr=5e-3 optim.param_groups.projector.lr=5e-3 algorithm.loss.beta=0.5``,
  also with ``model.vision_encoder.model_kwargs.patch_size=4`` and 1,200 steps): 0.60 and 0.615; colour, shape
  and position at chance, count at its text prior (0.91: most shapes asked about are absent);
* with a vision tower that sees the shapes and SFT before DPO: ``python benchmarks/synth_vision_tower.py --out
  work_dirs/vision_tower --threads 1`` (10.5 min; the tiny ViT at the benchmark's 64 pixels, trained on 20,000
  images of scenes of its own seed to tell each shape's colour, shape and region: held-out 0.995 / 0.94 / 0.98),
  then ``--skip-colour --scenes 1000 --objects 1 1 --image-fraction 1 --vision-tower
  work_dirs/vision_tower --sft-steps 6000 --sft-tasks qa preference caption --steps 1000 --synth-options
  optim.lr=2e-3 optim.param_groups.projector.lr=2e-3`` with ``--synth-seeds 0`` and, side by side,
  ``--synth-seeds 1 2 --no-blind`` (1 thread each; about 10 min a run, 7.5 of them SFT): held-out
  ``rewards/accuracies`` 0.965 / 0.9375 / 0.945 over three seeds (DPO starts at 0.5, the policy being its
  reference; colour, shape and position 0.96-1.0, counts 0.82-0.90), the blind control 0.6225 (counts 0.91,
  the others at chance). The tower is what the tiny random one lacks, as a pretrained one is in a real run;
  the SFT stage teaches the LLM to read it.
* the full benchmark with the tower (``--skip-colour --synth-seeds 0 --scenes 400 --vision-tower
  work_dirs/vision_tower --sft-steps 1500 --sft-tasks qa preference caption --steps 300 --no-blind
  --synth-options optim.lr=2e-3 optim.param_groups.projector.lr=2e-3 data.collator.max_length=1024``, the last
  row; 12 min): 0.52, shape questions 0.78 and the others at chance: videos of several shapes, their order,
  motion and events, need more of the LLM than a CPU budget trains.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the colour pairs of the tests
sys.path.insert(0, str(ROOT / "benchmarks"))

DPO_CONFIG = ROOT / "configs" / "dpo" / "timm_mlp_llama.py"
SFT_CONFIG = ROOT / "configs" / "sft" / "timm_mlp_llama.py"
QUIET = {"train.progress_bar": False, "train.tensorboard": False, "checkpoint.interval": None}


def _val_records(history):
    return [r for r in history if r["split"] == "val"]


def colour_run(seed: int, work_dir: Path, steps: int = 45, side: tuple[int, int] | None = None,
               pairs: tuple[int, int] = (128, 48), options: dict | None = None) -> dict:
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
    trainer = Trainer(cfg, cfg_options=options or None, train_dataset=pair_items(pairs[0], side=side),
                      val_dataset=pair_items(pairs[1], seed=1, prefix="v", side=side))
    trainer.fit()
    val = _val_records(trainer.history)
    name = "colour" if side is None else f"colour[squares of {side[0]}-{side[1]} px in 32]"
    return {"data": name, "seed": seed, "vision": "seeing", "train_pairs": pairs[0], "val_pairs": pairs[1],
            "steps": steps,
            "accuracy_by_step": json.dumps({r["step"]: round(r["rewards/accuracies"], 4) for r in val}),
            "final_accuracy": round(val[-1]["rewards/accuracies"], 4),
            "final_margin": round(val[-1]["rewards/margins"], 4), "seconds": round(time.perf_counter() - tic, 1)}


class BlindDataset(torch.utils.data.Dataset):
    """A dataset whose media are all black (same shape and type): the pixels carry nothing."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.samples = dataset.samples  # the engine's fingerprint reads the sample ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if item["media"] is not None:
            item["media"] = torch.zeros_like(item["media"])
        return item


def accuracy_by_type(trainer, dataset, batch_size: int = 16) -> tuple[dict, float]:
    """Held-out pairwise accuracy of the trained policy per ``meta.question_type``
    ({type: [accuracy, pairs]}) and over all pairs, from the algorithm's own evaluation."""
    from tpo.evaluation.metrics import pairwise_accuracy

    algo = trainer.accelerator.unwrap_model(trainer.accelerator._models[0])
    collate = algo.build_collator(**trainer.cfg["data"]["collator"])
    was_training = algo.training
    algo.eval()
    rewards = defaultdict(lambda: ([], []))
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            out = algo.evaluate(collate(items))
            for item, sample in zip(items, out["samples"]):
                if sample["id"] != item["id"]:
                    raise RuntimeError(f"evaluation order: sample {sample['id']!r} for item {item['id']!r}")
                for key in (item["meta"]["question_type"], "all"):
                    rewards[key][0].append(sample["chosen_reward"])
                    rewards[key][1].append(sample["rejected_reward"])
    algo.train(was_training)
    table = {k: [round(pairwise_accuracy(c, r), 4), len(c)] for k, (c, r) in sorted(rewards.items()) if k != "all"}
    return table, pairwise_accuracy(*rewards["all"])


def count_pairs(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(json.loads(line)["meta"]["task"] == "preference" for line in handle)


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--synth-options: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def sft_stage(data: Path, steps: int, seed: int, options: dict, work_dir: Path, blind: bool,
              tasks: list[str]) -> tuple[str, float]:
    """SFT on the training scenes' samples of ``tasks`` (QA: multiple-choice and open answers;
    preference: the pairs' chosen answers; caption: the detailed descriptions); returns the final
    checkpoint and the seconds it took."""
    from tpo.data import SampleDataset
    from tpo.engine import Trainer

    opts = {**QUIET, "data.val": None, "train.max_steps": steps, "train.seed": seed, "evaluation.interval": None,
            "evaluation.at_end": False, "checkpoint.save_final": True, **options}
    train_ds = SampleDataset(str(data / "train.jsonl"), num_frames=8, tasks=tasks)
    tic = time.perf_counter()
    trainer = Trainer(str(SFT_CONFIG), cfg_options=opts, work_dir=str(work_dir),
                      train_dataset=BlindDataset(train_ds) if blind else train_ds)
    trainer.fit()
    final = sorted((work_dir / "checkpoints").glob("step_*"))[-1]
    return str(final), time.perf_counter() - tic


def synth_run(data: Path, summary: dict, steps: int, seed: int, work_dir: Path, blind: bool, options: dict,
              load_from: str | None = None) -> dict:
    from tpo.data import SampleDataset
    from tpo.engine import Trainer

    opts = {**QUIET, "data.train.ann_file": str(data / "train.jsonl"), "data.val.ann_file": str(data / "val.jsonl"),
            "train.max_steps": steps, "train.seed": seed, "evaluation.interval": max(1, steps // 6),
            "checkpoint.save_final": False, **options}
    if load_from:
        opts["load_from"] = load_from
    kwargs = {}
    val_ds = SampleDataset(str(data / "val.jsonl"), num_frames=8, tasks=["preference"])
    if blind:
        train_ds = SampleDataset(str(data / "train.jsonl"), num_frames=8, tasks=["preference"])
        val_ds = BlindDataset(val_ds)
        kwargs = {"train_dataset": BlindDataset(train_ds), "val_dataset": val_ds}
    tic = time.perf_counter()
    trainer = Trainer(str(DPO_CONFIG), cfg_options=opts, work_dir=str(work_dir), **kwargs)
    trainer.fit()
    seconds = time.perf_counter() - tic
    val = _val_records(trainer.history)
    by_type, overall = accuracy_by_type(trainer, val_ds, trainer.cfg["evaluation"]["batch_size"] or 8)
    if abs(overall - val[-1]["rewards/accuracies"]) > 1e-6:
        raise RuntimeError(f"per-type evaluation gives {overall}, the engine's {val[-1]['rewards/accuracies']}")
    shapes = "" if summary["objects"] == [2, 4] else ", {}-{} shapes".format(*summary["objects"])
    if summary["image_fraction"] != 0.25:
        shapes += ", images only" if summary["image_fraction"] == 1 else f", {summary['image_fraction']:g} images"
    return {"data": f"synth[{summary['num_scenes']} scenes{shapes}, pairs={summary['preference_pairs']}]",
            "seed": seed,
            "vision": "blind" if blind else "seeing", "train_pairs": count_pairs(data / "train.jsonl"),
            "val_pairs": len(val_ds), "steps": steps,
            "accuracy_by_step": json.dumps({r["step"]: round(r["rewards/accuracies"], 4) for r in val}),
            "final_accuracy": round(val[-1]["rewards/accuracies"], 4),
            "final_margin": round(val[-1]["rewards/margins"], 4), "accuracy_by_type": json.dumps(by_type),
            "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="seeds of the colour runs")
    parser.add_argument("--colour-steps", type=int, default=90, help="steps of the colour runs")
    parser.add_argument("--colour-side", type=int, nargs=2, default=None, metavar=("LEAST", "MOST"),
                        help="the colour runs' squares: side in pixels of the 32-pixel image (default 16-24)")
    parser.add_argument("--colour-pairs", type=int, nargs=2, default=(128, 48), metavar=("TRAIN", "VAL"))
    parser.add_argument("--colour-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config options of the colour runs, e.g. model.vision_encoder.model_kwargs.patch_size=4")
    parser.add_argument("--synth-seeds", type=int, nargs="*", default=[0, 1],
                        help="seeds of the synth runs (benchmark data and training)")
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--preference-pairs", choices=("one", "all"), default="all")
    parser.add_argument("--objects", type=int, nargs=2, default=(2, 4), metavar=("LEAST", "MOST"),
                        help="shapes in a scene (tpo data synth --objects); 1 1: the benchmark's easiest form")
    parser.add_argument("--image-fraction", type=float, default=0.25,
                        help="share of the scenes that are images (tpo data synth --image-fraction); 1: images only")
    parser.add_argument("--steps", type=int, default=300, help="DPO steps of the synth runs")
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT steps before DPO (0: DPO from the random init)")
    parser.add_argument("--sft-tasks", nargs="+", default=["qa", "preference"],
                        help="the training scenes' samples the SFT stage learns (qa, preference, caption, ...)")
    parser.add_argument("--synth-options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config options of the synth runs' model and training (both stages), e.g. "
                             "model.vision_encoder.freeze=False model.vision_encoder.model_kwargs.patch_size=4")
    parser.add_argument("--vision-tower", type=Path, default=None, metavar="DIR",
                        help="a tower of synth_vision_tower.py (its tower.json and weights) for the synth runs; "
                             "--synth-options may still override its options")
    parser.add_argument("--no-blind", action="store_true", help="skip the blind control runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-colour", action="store_true", help="only the synth runs")
    parser.add_argument("--append", action="store_true", help="add the rows to the CSV's existing ones")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchkit import RESULTS, load_avg_1m, machine_name, write_csv

    from tpo.data import synthesize

    if args.colour_side and not 1 <= args.colour_side[0] <= args.colour_side[1] <= 32:
        parser.error(f"--colour-side: sides in pixels with 1 <= LEAST <= MOST <= 32, got {args.colour_side}")
    if not 0.0 <= args.image_fraction <= 1.0:
        parser.error(f"--image-fraction: a share of the scenes in [0, 1], got {args.image_fraction}")
    options, tower_note = _parse_options(args.synth_options), ""
    if args.vision_tower is not None:
        tower_file = args.vision_tower / "tower.json"
        if not tower_file.is_file():
            parser.error(f"--vision-tower: {str(tower_file)!r} does not exist; write it with "
                         f"python benchmarks/synth_vision_tower.py --out {args.vision_tower}")
        tower = json.loads(tower_file.read_text(encoding="utf-8"))
        options = {**tower["cfg_options"], **options}
        tower_note = (f"object-trained vision tower ({tower['train']['steps']} steps on {tower['train']['images']} "
                      f"images, {tower['seconds']:.0f} s on {tower['train']['torch_threads']} thread(s); "
                      f"held-out {tower['held_out_accuracy']})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [] if args.skip_colour else args.seeds:
            rows.append(colour_run(seed, Path(tmp) / f"colour{seed}", args.colour_steps,
                                   tuple(args.colour_side) if args.colour_side else None, tuple(args.colour_pairs),
                                   _parse_options(args.colour_options)))
            rows[-1]["note"] = " ".join(args.colour_options)
            print(json.dumps(rows[-1]), flush=True)
        for seed in args.synth_seeds:
            data = Path(tmp) / f"synth{seed}"
            summary = synthesize(data, num=args.scenes, seed=seed, preference_pairs=args.preference_pairs,
                                 objects=tuple(args.objects), image_fraction=args.image_fraction)
            for blind in ([False] if args.no_blind else [False, True]):
                load_from, sft = None, ""
                if args.sft_steps:  # the blind control's SFT stage is blind too
                    load_from, sft_seconds = sft_stage(data, args.sft_steps, seed, options,
                                                       Path(tmp) / f"sft{seed}-{int(blind)}", blind, args.sft_tasks)
                    sft = f"after {args.sft_steps} SFT steps on {'+'.join(args.sft_tasks)} ({sft_seconds:.0f} s)"
                row = synth_run(data, summary, args.steps, seed, Path(tmp) / f"synth{seed}-{int(blind)}", blind,
                                options, load_from)
                row["note"] = "; ".join(x for x in (tower_note, sft, " ".join(args.synth_options)) if x)
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    load = load_avg_1m()
    for row in rows:
        row.update(torch_threads=args.threads, load_avg_1m=load)
    path = (args.out or RESULTS / machine_name()) / "dpo_heldout.csv"
    if args.append and path.is_file():
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle)) + rows
    write_csv(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
