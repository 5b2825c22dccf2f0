"""`tpo rlaif generate`: preference samples from the policy's answers and the
judge, their format, the summary (agreement with and without context, ties),
and interruption: a resumed run writes exactly what an uninterrupted one does."""
import json

import pytest
from rlaif_testkit import GEN_CONFIG, ROOT, generation_options

from tpo.rlaif import generate, main

LM_CONFIG = str(ROOT / "configs" / "rlaif" / "generate_lm_timm_mlp_llama.py")
CLIP_CONFIG = str(ROOT / "configs" / "rlaif" / "generate_clip_captions_timm_mlp_llama.py")


def read(path):
    return path.read_text(encoding="utf-8")


def test_preference_samples_load_and_collate(synth, sft_checkpoint, tmp_path):
    from tpo.registry import build_model

    from tpo.data import PreferenceCollator, SampleDataset

    out = tmp_path / "pairs.jsonl"
    summary = generate(GEN_CONFIG, cfg_options=generation_options(synth, sft_checkpoint, "val", 8), out=str(out),
                       log=lambda m: None)
    assert summary["complete"] and summary["prompts"] == 8 and summary["answers"] == 32
    judgments = [json.loads(line) for line in read(tmp_path / "pairs.judgments.jsonl").splitlines()]
    assert len(judgments) == 8
    assert summary["pairs_judged"] == sum(len(j["pairs"]) for j in judgments)
    assert summary["pairs_judged"] + summary["identical_pairs_skipped"] == 8 * 6
    assert summary["preferences_written"] + summary["ties"] == summary["pairs_judged"]
    assert set(summary["agreement"]) >= {"accuracy", "informative_pairs", "ties"}
    assert "agreement_no_context" in summary and all("no_context" in p for j in judgments for p in j["pairs"])
    ds = SampleDataset(str(out))
    assert len(ds) == summary["preferences_written"] > 0
    item = ds[0]
    judge = item["preference"]["judge"]
    assert judge["name"] == "RuleJudge" and judge["context"] == "sample_description"
    assert judge["rationale"] and 0.5 <= judge["confidence"] <= 1
    assert item["meta"]["source_id"] in {j["id"] for j in judgments}
    model = build_model("configs/mllm/timm_mlp_llama.py", cfg_options={"model.num_frames": 2})
    batch = PreferenceCollator(model.processor)([ds[i] for i in range(min(3, len(ds)))])
    assert batch["num_pairs"] == min(3, len(ds))


def test_interrupted_and_resumed_run_loses_and_duplicates_nothing(synth, sft_checkpoint, tmp_path):
    opts = generation_options(synth, sft_checkpoint, "val", 6)
    whole = tmp_path / "whole" / "pairs.jsonl"
    generate(GEN_CONFIG, cfg_options=opts, out=str(whole), log=lambda m: None)

    part = tmp_path / "part" / "pairs.jsonl"
    first = generate(GEN_CONFIG, cfg_options=opts, out=str(part), stop_after=2, log=lambda m: None)
    assert first["prompts"] == 2 and not first["complete"]
    # a crash in the middle of the third prompt: its preference lines are out, its judgments line is torn
    lines = read(whole).splitlines(keepends=True)
    done = {json.loads(line)["id"] for line in read(part.with_name("pairs.judgments.jsonl")).splitlines()}
    third = next(json.loads(line)["id"] for line in read(whole.with_name("pairs.judgments.jsonl")).splitlines()
                 if json.loads(line)["id"] not in done)
    with open(part, "a", encoding="utf-8") as handle:
        handle.writelines(line for line in lines if json.loads(line)["meta"]["source_id"] == third)
    with open(part.with_name("pairs.judgments.jsonl"), "a", encoding="utf-8") as handle:
        handle.write('{"id": "' + third + '", "answers": ["B", ')
    messages = []
    resumed = generate(GEN_CONFIG, cfg_options=opts, out=str(part), log=messages.append)
    assert resumed["complete"] and resumed["recovered"]["dropped_judgment_lines"] == 1
    assert any("recovered from an interruption" in m for m in messages)
    assert read(part) == read(whole)
    assert read(part.with_name("pairs.judgments.jsonl")) == read(whole.with_name("pairs.judgments.jsonl"))
    again = generate(GEN_CONFIG, cfg_options=opts, out=str(part), log=lambda m: None)  # nothing left to do
    assert read(part) == read(whole) and again["prompts"] == 6


def test_policy_judges_its_own_answers(synth, sft_checkpoint, tmp_path):
    """The paper's setting: the policy is the judge (configs/rlaif/generate_lm_*.py)."""
    opts = generation_options(synth, sft_checkpoint, "val", 2, **{"sampling.num_samples": 3})
    out = tmp_path / "lm.jsonl"
    summary = generate(LM_CONFIG, cfg_options=opts, out=str(out), log=lambda m: None)
    judgments = [json.loads(line) for line in read(tmp_path / "lm.judgments.jsonl").splitlines()]
    assert summary["judge"] == "LMJudge" and len(judgments) == 2 and summary["pairs_judged"] > 0
    for j in judgments:
        for p in j["pairs"]:
            assert len(p["orders"]) == 2 and "P(A)=" in p["rationale"]
            assert p["p_first"] == pytest.approx(0.5 * (p["orders"][0]["p_first"] + 1 - p["orders"][1]["p_first"]))


def test_clip_caption_context_config(synth, sft_checkpoint, tmp_path):
    """configs/rlaif/generate_clip_captions_*.py: the policy captions the video's segments and judges with them."""
    opts = generation_options(synth, sft_checkpoint, "val", 1, **{"sampling.num_samples": 2,
                                                                   "context.max_new_tokens": 3})
    summary = generate(CLIP_CONFIG, cfg_options=opts, out=str(tmp_path / "clip.jsonl"), log=lambda m: None)
    (judgment,) = [json.loads(line) for line in read(tmp_path / "clip.judgments.jsonl").splitlines()]
    assert summary["context"] == "clip_captions" and judgment["context"].startswith("From 0.00 to ")


def test_command_line(synth, sft_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = main(["generate", GEN_CONFIG, "--out", str(out), "--cfg-options", f"policy.checkpoint={sft_checkpoint}",
                 "policy.config=configs/mllm/timm_mlp_llama.py", f"data.ann_file={synth / 'val.jsonl'}",
                 "data.limit=2", "sampling.num_samples=2", "ablation.no_context=False"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompts"] == 2 and out.exists()


@pytest.mark.parametrize("options, error, match", [
    ({"sampling.num_samples": 1}, ValueError, "sampling.num_samples"),
    ({"sampling.top_p": 0}, ValueError, "sampling.top_p"),
    ({"data.ann_file": "missing.jsonl"}, FileNotFoundError, "data.ann_file"),
    ({"context": None}, ValueError, "ablation.no_context"),
    ({"sampling.temprature": 1.0}, KeyError, "sampling.temprature"),
    ({"judges": {"type": "RuleJudge"}}, KeyError, "did you mean 'judge'"),
])
def test_config_errors(synth, tmp_path, options, error, match):
    opts = {"data.ann_file": str(synth / "val.jsonl"), **options}
    with pytest.raises(error, match=match):
        generate(GEN_CONFIG, cfg_options=opts, out=str(tmp_path / "x.jsonl"), log=lambda m: None)


def test_several_processes_are_refused(synth, tmp_path, monkeypatch):
    """Launched by torchrun as one of several processes, generation stops
    before writing anything (every process would append the same prompts)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "x.jsonl"
    with pytest.raises(RuntimeError, match="runs as one process.*WORLD_SIZE=2"):
        generate(GEN_CONFIG, cfg_options={"data.ann_file": str(synth / "val.jsonl")}, out=str(out), log=lambda m: None)
    assert not out.exists()


def test_the_command_reports_config_errors_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    code = main(["generate", GEN_CONFIG, "--out", str(tmp_path / "p.jsonl"), "--cfg-options",
                 f"data.ann_file={missing}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tpo rlaif generate: error: data.ann_file:") and str(missing) in err
    assert len(err.splitlines()) == 1  # not a traceback
