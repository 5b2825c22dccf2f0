"""The whole VLM-RLAIF loop on the synthetic benchmark, on CPU, from the
configs of configs/rlaif/: SFT policy -> AI-feedback pairs (context-aware rule
judge) -> reward model, whose held-out pairwise accuracy must beat chance
clearly -> PPO from the SFT policy against it -> evaluation."""
import json

import pytest
from rlaif_testkit import NUM_FRAMES, PPO_CONFIG, QUIET


def test_judge_summary_reports_agreement_with_and_without_context(pairs):
    for split in ("train", "val"):
        path, summary = pairs[split]
        assert summary["complete"] and summary["preferences_written"] > 0
        assert summary["agreement"]["informative_pairs"] > 0
        with_ctx, without = summary["agreement"]["accuracy"], summary["agreement_no_context"]["accuracy"]
        assert with_ctx >= without  # the description can only help the rule judge
        assert summary["ties_no_context"] >= summary["ties"]


def test_reward_model_beats_chance_on_held_out_pairs(reward_run, pairs):
    held_out = pairs["val"][1]["preferences_written"]
    assert held_out >= 60
    accuracy = reward_run["val"]["rewards/accuracies"]["last"]
    # chance is 0.5; 0.65 over >= 60 pairs is more than 2.3 standard errors above it
    assert accuracy >= 0.65, accuracy


def test_ppo_from_the_sft_policy_against_the_reward_model(reward_run, sft_checkpoint, synth, tmp_path):
    from tpo.engine import train

    report = train(PPO_CONFIG, work_dir=str(tmp_path / "ppo"), cfg_options={
        **QUIET, "load_from": sft_checkpoint, "model.num_frames": NUM_FRAMES,
        "algorithm.reward_model.checkpoint": reward_run["final_checkpoint"],
        "algorithm.reward_model.cfg_options": {"model.num_frames": NUM_FRAMES},
        "algorithm.max_new_tokens": 6, "train.batch_size": 8, "train.max_steps": 6, "train.log_interval": 1,
        "data.train.ann_file": str(synth / "train.jsonl"), "data.val.ann_file": str(synth / "val.jsonl"),
        "evaluation.max_batches": 2, "checkpoint.interval": None,
    })
    train_metrics, val = report["train"], report["val"]
    for name in ("objective/scores", "objective/kl", "objective/entropy", "policy/clipfrac_avg", "loss/value_avg",
                 "response/length"):
        assert name in train_metrics
    assert {"eval/scores", "eval/qa_accuracy", "qa/accuracy"} <= set(val)
    lines = (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == pytest.approx(r["loss"]) for r in records if r["split"] == "train")  # finite
