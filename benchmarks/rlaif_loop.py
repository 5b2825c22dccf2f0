"""The whole VLM-RLAIF loop on the synthetic benchmark, on CPU, from the configs
of ``configs/rlaif/``, with the numbers the paper's story needs:

1. SFT: the tiny timm ViT + MLP + Llama on the QA samples (``sft_timm_mlp_llama.py``);
2. AI feedback: the SFT policy samples 4 answers per training question; the
   context-aware rule judge (``generate_rule_timm_mlp_llama.py``) picks the
   better of each pair with the video's detailed description, and the same
   judge judges every pair without it (the paper's ablation); the policy as
   its own judge (``generate_lm_timm_mlp_llama.py``) on part of the validation
   questions, with and without context. Agreement = how often the judge picks
   the answer the benchmark says is right, over the pairs where exactly one
   answer is right (a tie counts half);
3. reward model (``reward_timm_mlp_llama.py``): Bradley-Terry + centring on the
   training pairs, pairwise accuracy on the held-out (validation) pairs;
4. PPO (``ppo_timm_mlp_llama.py``) from the SFT policy against the reward model;
5. evaluation of the SFT start and the PPO policy on the test questions
   (greedy answers): mean reward-model score (and after the penalties), QA
   accuracy, answer length, end-of-sequence rate.

    python benchmarks/rlaif_loop.py                       # the full run (~13 min on one CPU core)
    python benchmarks/rlaif_loop.py --quick               # a smoke run (~1 min)

Every stage is skipped when its output exists in ``--work`` (the run resumes);
results go to ``benchmarks/results/<machine>/rlaif_loop.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchkit import RESULTS, cpu_name, machine_name  # noqa: E402

CONFIGS = ROOT / "configs" / "rlaif"
MLLM = str(ROOT / "configs" / "mllm" / "timm_mlp_llama.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "work_dirs" / "rlaif_loop"))
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<this machine>)")
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--sft-steps", type=int, default=2000)
    p.add_argument("--train-prompts", type=int, default=3000, help="questions the policy answers for the RM pairs")
    p.add_argument("--lm-judge-prompts", type=int, default=120)
    p.add_argument("--rm-steps", type=int, default=1000)
    p.add_argument("--ppo-steps", type=int, default=300)
    p.add_argument("--eval-prompts", type=int, default=None, help="test questions scored (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for these tiny models)")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.sft_steps, args.train_prompts, args.lm_judge_prompts = 60, 40, 120, 10
        args.rm_steps, args.ppo_steps, args.eval_prompts = 40, 10, 40
    return args


def log(msg: str) -> None:
    print(f"[rlaif_loop {time.strftime('%H:%M:%S')}] {msg}", flush=True)


QUIET = {"train.progress_bar": False, "train.tensorboard": False}


def stage_sft(args, work: Path) -> str:
    from tpo.engine import latest_checkpoint, train

    ckpt = latest_checkpoint(work / "sft" / "checkpoints")
    if ckpt is not None and ckpt.name.endswith(f"{args.sft_steps:08d}"):
        return str(ckpt)
    report = train(str(CONFIGS / "sft_timm_mlp_llama.py"), work_dir=str(work / "sft"), cfg_options={
        **QUIET, "data.train.ann_file": str(work / "synth" / "train.jsonl"),
        "data.val.ann_file": str(work / "synth" / "val.jsonl"), "train.max_steps": args.sft_steps,
        "evaluation.max_batches": 8,
    }, resume=ckpt is not None)
    return report["final_checkpoint"]


def stage_pairs(args, work: Path, sft: str, config: str, split: str, limit, out: Path) -> dict:
    from tpo.rlaif import generate

    summary_path = out.with_name(out.name.replace(".jsonl", ".summary.json"))
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("complete"):
            return summary
    return generate(str(CONFIGS / config), out=str(out), log=log, cfg_options={
        "policy.config": MLLM, "policy.checkpoint": sft, "data.ann_file": str(work / "synth" / f"{split}.jsonl"),
        "data.limit": limit})


def stage_reward(args, work: Path, sft: str) -> dict:
    from tpo.engine import train

    report_path = work / "reward" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == args.rm_steps:
            return report
    return train(str(CONFIGS / "reward_timm_mlp_llama.py"), work_dir=str(work / "reward"), cfg_options={
        **QUIET, "model.init_from": sft, "data.train.ann_file": str(work / "pairs" / "train.jsonl"),
        "data.val.ann_file": str(work / "pairs" / "val.jsonl"), "train.max_steps": args.rm_steps,
        "evaluation.interval": max(1, args.rm_steps // 4),
    })


def stage_ppo(args, work: Path, sft: str, rm: str) -> dict:
    from tpo.engine import latest_checkpoint, train

    report_path = work / "ppo" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("steps") == args.ppo_steps:
            return report
    return train(str(CONFIGS / "ppo_timm_mlp_llama.py"), work_dir=str(work / "ppo"), cfg_options={
        **QUIET, "load_from": sft, "algorithm.reward_model.checkpoint": rm,
        "data.train.ann_file": str(work / "synth" / "train.jsonl"),
        "data.val.ann_file": str(work / "synth" / "val.jsonl"), "train.max_steps": args.ppo_steps,
        "evaluation.max_batches": 4,
    }, resume=latest_checkpoint(work / "ppo" / "checkpoints") is not None)


def evaluate_policy(checkpoint: str, rm: str, dataset, limit, batch_size: int = 16) -> dict:
    """Greedy answers to the test questions, scored by the reward model (the
    PPO algorithm's own evaluation, so SFT and PPO are scored alike)."""
    import torch
    from tpo.registry import build_algorithm, build_model, load_config

    from tpo.models.utils import load_model_weights

    ppo_cfg = load_config(str(CONFIGS / "ppo_timm_mlp_llama.py")).to_dict()
    policy = build_model(MLLM)
    load_model_weights(policy, checkpoint)
    algo_cfg = {**ppo_cfg["algorithm"], "reward_model": {"config": str(CONFIGS / "reward_timm_mlp_llama.py"),
                                                          "checkpoint": rm}}
    algo = build_algorithm(algo_cfg, default_args={"model": policy})
    algo.eval()
    collate = algo.build_collator()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    sums, count, samples = {}, 0, []
    from tpo.evaluation.metrics import qa_correct

    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
            out = algo.evaluate(batch)
            k = out["num_items"]
            for key, value in out["metrics"].items():
                sums[key] = sums.get(key, 0.0) + float(value) * k
            count += k
            samples += out["samples"]
    result = {key: value / count for key, value in sums.items()}
    result["qa/accuracy"] = sum(qa_correct(s["prediction"], s["answer"], s["answer_type"], s["options"])
                                for s in samples) / max(len(samples), 1)
    result["prompts"] = count
    result["examples"] = [{k: s[k] for k in ("id", "prediction", "answer")} for s in samples[:5]]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from tpo.data import SampleDataset, synthesize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.time()

    def timed(name, fn, *a):
        t = time.time()
        result = fn(*a)
        timings[name] = round(time.time() - t, 1)
        log(f"{name}: {timings[name]} s")
        return result

    if not (work / "synth" / "summary.json").exists():
        timed("synth", synthesize, work / "synth", args.scenes, 0)
    sft = timed("sft", stage_sft, args, work)
    pairs = {}
    for split, limit in (("train", args.train_prompts), ("val", None)):
        pairs[split] = timed(f"pairs_{split}", stage_pairs, args, work, sft, "generate_rule_timm_mlp_llama.py",
                             split, limit, work / "pairs" / f"{split}.jsonl")
    lm = timed("pairs_lm_judge", stage_pairs, args, work, sft, "generate_lm_timm_mlp_llama.py", "val",
               args.lm_judge_prompts, work / "pairs_lm" / "val.jsonl")
    reward = timed("reward_model", stage_reward, args, work, sft)
    rm_ckpt = reward["final_checkpoint"]
    ppo = timed("ppo", stage_ppo, args, work, sft, rm_ckpt)
    test = SampleDataset(str(work / "synth" / "test.jsonl"), tasks=["qa"])
    sft_eval = timed("eval_sft", evaluate_policy, sft, rm_ckpt, test, args.eval_prompts)
    ppo_eval = timed("eval_ppo", evaluate_policy, ppo["final_checkpoint"], rm_ckpt, test, args.eval_prompts)

    def agreement(summary, key):
        a = summary.get(key) or {}
        return {k: a.get(k) for k in ("accuracy", "accuracy_decided", "informative_pairs", "right", "wrong", "ties")}

    results = {
        "machine": {"name": machine_name(cuda=False), "cpu": cpu_name(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "torch_threads": args.threads, "python": sys.version.split()[0], "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "judges": {
            "rule_train": {"with_context": agreement(pairs["train"], "agreement"),
                           "without_context": agreement(pairs["train"], "agreement_no_context"),
                           "pairs_judged": pairs["train"]["pairs_judged"], "ties": pairs["train"]["ties"],
                           "ties_without_context": pairs["train"].get("ties_no_context"),
                           "preferences_written": pairs["train"]["preferences_written"],
                           "policy_answers_correct": pairs["train"]["answers_correct"]},
            "rule_val": {"with_context": agreement(pairs["val"], "agreement"),
                         "without_context": agreement(pairs["val"], "agreement_no_context"),
                         "preferences_written": pairs["val"]["preferences_written"]},
            "policy_self_judge_val": {"with_context": agreement(lm, "agreement"),
                                      "without_context": agreement(lm, "agreement_no_context"),
                                      "position_consistency": lm["position_consistency"], "ties": lm["ties"],
                                      "prompts": lm["prompts"]},
        },
        "reward_model": {"held_out_pairwise_accuracy": reward["val"]["rewards/accuracies"]["last"],
                         "held_out_pairs": pairs["val"]["preferences_written"],
                         "held_out_margin": reward["val"]["rewards/margins"]["last"],
                         "train_loss_last": reward["train"]["loss"]["last"], "steps": reward["steps"]},
        "ppo": {"steps": ppo["steps"],
                "train_last": {k: v["last"] for k, v in ppo["train"].items()
                               if k.startswith(("objective/", "policy/", "loss/", "val/", "response/"))}},
        "evaluation_test": {"sft": sft_eval, "ppo": ppo_eval},
        "timings_s": timings, "total_s": round(time.time() - started, 1),
    }
    out = Path(args.out or RESULTS / machine_name(cuda=False))
    out.mkdir(parents=True, exist_ok=True)
    name = "rlaif_loop_quick" if args.quick else "rlaif_loop"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    j = r["judges"]
    lines = [
        "# VLM-RLAIF loop on the synthetic benchmark (CPU)",
        "",
        f"Settings: {json.dumps(r['settings'])}; torch threads {r['machine']['torch_threads']}; "
        f"total {r['total_s']} s.",
        "",
        "## Judges: agreement with the benchmark's answers (pairs with exactly one right answer; a tie counts half)",
        "",
        "| judge | split | pairs | with context | without context |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("rule_train", "rule (context-aware)"), ("rule_val", "rule (context-aware)"),
                       ("policy_self_judge_val", "SFT policy as judge")):
        split = "train" if key.endswith("train") else "val"
        a, b = j[key]["with_context"], j[key]["without_context"]
        lines.append(f"| {label} | {split} | {a['informative_pairs']} | {pct(a['accuracy'])} "
                     f"(ties {a['ties']}) | {pct(b['accuracy'])} (ties {b['ties']}) |")
    rm = r["reward_model"]
    e = r["evaluation_test"]
    lines += [
        "",
        f"Reward model: held-out pairwise accuracy {pct(rm['held_out_pairwise_accuracy'])} over "
        f"{rm['held_out_pairs']} validation pairs after {rm['steps']} steps (chance 50%).",
        "",
        f"## SFT start vs PPO ({r['ppo']['steps']} steps), greedy answers to {e['sft']['prompts']} test questions",
        "",
        "| policy | mean RM score | score after penalties | QA accuracy | length | EOS rate |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("sft", "ppo"):
        m = e[name]
        lines.append(f"| {name.upper()} | {m['eval/rm_scores']:.3f} | {m['eval/scores']:.3f} | "
                     f"{pct(m['qa/accuracy'])} | {m['eval/length']:.2f} | {pct(m['eval/num_eos_tokens'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
