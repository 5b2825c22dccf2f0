"""Staged training (TPO's recipe) and the small experiment of the main job."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tpo.data.synth import synthesize
from tpo.engine.experiment import format_table, reroot, run_experiment
from tpo.engine.stages import merge, run_stages, stage_configs

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tpo" / "recipes" / "tiny_cpu.py"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 6, seed=2, frames=4, size=32)
    return out


def _short(synth_dir):
    """The recipe's stages at 2 steps each, on the test's benchmark."""
    return {
        "data.train.ann_file": str(synth_dir / "train.jsonl"),
        "train.batch_size": 4,
        "stages": [
            dict(name="assign", algorithm=dict(type="TPO", losses=["^lm$", "^assign$"]),
                 data=dict(train=dict(tasks=["grounding", "segmentation"])), train=dict(max_steps=2)),
            dict(name="heads", algorithm=dict(type="TPO", losses=[r"^(region|mask)\."], trainable=[r"^heads\."]),
                 data=dict(train=dict(tasks=["grounding", "segmentation"])), train=dict(max_steps=2)),
        ],
    }


def test_merge_and_stage_plans(tmp_path):
    base = {"train": {"batch_size": 8, "max_steps": 5}, "data": {"train": {"type": "A", "x": 1}}}
    merged = merge(base, {"train": {"max_steps": 2}, "data": {"train": {"_delete_": True, "type": "B"}}})
    assert merged == {"train": {"batch_size": 8, "max_steps": 2}, "data": {"train": {"type": "B"}}}
    plan = stage_configs(dict(base, stages=[dict(name="a"), dict(name="b", train=dict(max_steps=1))]), tmp_path)
    assert [p[1].name for p in plan] == ["1_a", "2_b"] and plan[1][2]["train"]["max_steps"] == 1
    with pytest.raises(ValueError, match="used twice"):
        stage_configs(dict(base, stages=[dict(name="a"), dict(name="a")]), tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        stage_configs(dict(base, stages=[]), tmp_path)


def test_stages_chain_weights_and_skip_finished_ones(synth_dir, tmp_path):
    summary = run_stages(RECIPE, cfg_options=_short(synth_dir), work_dir=str(tmp_path))
    first, second = summary["stages"]
    assert first["steps"] == 2 and second["steps"] == 2
    config = json.loads((tmp_path / "2_heads" / "config.json").read_text())
    assert config["load_from"] == first["final_checkpoint"]  # stage 2 starts from stage 1's weights
    assert summary["final_checkpoint"] == second["final_checkpoint"]
    mtime = (tmp_path / "1_assign" / "report.json").stat().st_mtime
    again = run_stages(RECIPE, cfg_options=_short(synth_dir), work_dir=str(tmp_path))
    assert (tmp_path / "1_assign" / "report.json").stat().st_mtime == mtime  # not trained again
    assert again["final_checkpoint"] == summary["final_checkpoint"]


def test_a_bad_stage_is_reported_before_any_training(synth_dir, tmp_path):
    options = _short(synth_dir)
    options["stages"][1]["optim"] = dict(lrr=1.0)
    with pytest.raises(KeyError, match="stage 'heads'.*optim.lrr"):
        run_stages(RECIPE, cfg_options=options, work_dir=str(tmp_path))
    assert not (tmp_path / "1_assign").exists()


@pytest.fixture
def recipe_data(tmp_path, monkeypatch):
    """A folder to run from where the recipe's own data path (work_dirs/synth/train.jsonl) exists (the
    checks read no more than that)."""
    (tmp_path / "work_dirs" / "synth").mkdir(parents=True)
    (tmp_path / "work_dirs" / "synth" / "train.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_option_a_stage_overrides_is_refused(recipe_data):
    from tpo.engine.stages import check_stages

    with pytest.raises(ValueError, match=r"--cfg-options train\.max_steps: stage 'assign' sets stages\.0\.train\."
                                         r"max_steps, stage 'heads' .*, stage 'cotrain' sets stages\.2\.train\.max_steps, "
                                         r"and a stage's own value wins .*stages\.0\.train\.max_steps=\.\.\."):
        check_stages(RECIPE, {"train.max_steps": 2})
    with pytest.raises(ValueError, match=r"data\.train\.ann_file: stage 'cotrain' sets stages\.2\.data\.train,"):
        check_stages(RECIPE, {"data.train.ann_file": "work_dirs/synth/train.jsonl"})  # cotrain's data is its own
    _, _, plan = check_stages(RECIPE, {"train.batch_size": 4, "stages.0.train.max_steps": 2})  # what no stage sets
    assert [(c["train"]["batch_size"], c["train"]["max_steps"]) for _, _, c in plan] == [(4, 2), (4, 40), (4, 70)]
    with pytest.raises(KeyError, match="stage 'assign': eval: unknown key"):  # an option's unknown key: not dropped
        check_stages(RECIPE, {"eval": {"interval": 1}})


def test_a_missing_file_inside_a_stages_dataset_is_reported_before_any_training(recipe_data):
    from tpo.engine.stages import check_stages

    with pytest.raises(FileNotFoundError, match=r"stage 'cotrain': data\.train\.datasets\.1\.ann_file: 'chat\.jsonl'"):
        check_stages(RECIPE, {"stages.2.data.train.datasets.1.ann_file": "chat.jsonl"})


def test_the_first_stage_starts_from_its_own_load_from(synth_dir, tmp_path, monkeypatch):
    from tpo.engine.trainer import Trainer

    weights = tmp_path / "pretrained"
    weights.mkdir()
    started_from = []

    def fit(self):  # what each stage would train from
        started_from.append(self.cfg["load_from"])
        (self.work_dir / "final").mkdir(parents=True)
        return {"final_checkpoint": str(self.work_dir / "final")}

    monkeypatch.setattr(Trainer, "fit", fit)
    options = _short(synth_dir)
    options["stages"][0]["load_from"] = str(weights)
    run_stages(RECIPE, cfg_options=options, work_dir=str(tmp_path / "run"))
    assert started_from == [str(weights), str(tmp_path / "run" / "1_assign" / "final")]


def test_experiment_checks_every_run_before_any_training(tmp_path):
    from tpo.engine.experiment import prepare_experiment

    unknown = tmp_path / "sft_eval.py"  # a key of no section: refused as `tpo train` refuses it
    unknown.write_text(f"_base_ = [{str(ROOT / 'configs/sft/tiny_cpu.py')!r}]\neval = dict(interval=5)\n")
    config = {"synth": {"num": 4, "seed": 1, "frames": 4, "size": 32}, "evaluation": {"max_new_tokens": 40},
              "runs": {"sft": {"config": str(ROOT / "configs/sft/tiny_cpu.py")},
                       "typo": {"config": str(ROOT / "configs/sft/tiny_cpu.py"), "cfg_options": {"optim.lrr": 1.0}}}}
    with pytest.raises(KeyError, match=r"runs\.typo: optim\.lrr: unknown key"):
        prepare_experiment(config, work_dir=str(tmp_path / "a"))
    config["runs"] = {"sft": {"config": str(unknown)}}
    with pytest.raises(KeyError, match=r"runs\.sft: eval: unknown key.*sft_eval\.py"):
        prepare_experiment(config, work_dir=str(tmp_path / "a"))
    config["runs"] = {"tpo": {"config": str(RECIPE), "cfg_options": {"train.max_steps": 3}}}
    with pytest.raises(ValueError, match=r"runs\.tpo: --cfg-options train\.max_steps: stage 'assign'"):
        prepare_experiment(config, work_dir=str(tmp_path / "a"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["experiment.json", "synth"]  # nothing trained


def test_reroot_and_table():
    cfg = {"data": {"train": {"ann_file": "work_dirs/synth/train.jsonl"}, "other": "work_dirs/synthetic/x"}}
    moved = reroot(cfg, "work_dirs/synth", "/tmp/s")
    assert moved["data"]["train"]["ann_file"] == "/tmp/s/train.jsonl" and moved["data"]["other"] == "work_dirs/synthetic/x"
    table = format_table({"sft": {"qa/accuracy": 0.5}, "tpo": {"qa/accuracy": 0.25, "mask/miou": 0.75}})
    assert "| sft | 0.500 | n/a | n/a | n/a |" in table and "| tpo | 0.250 | n/a | n/a | 0.750 |" in table


def test_experiment_end_to_end(tmp_path, capsys):
    config = tmp_path / "exp.py"
    config.write_text(
        "data_root = 'work_dirs/synth'\n"
        "synth = dict(num=4, seed=1, frames=4, size=32)\n"
        f"runs = dict(sft=dict(config={str(ROOT / 'configs/sft/tiny_cpu.py')!r}, cfg_options={{'train.max_steps': 3}}),\n"
        f"            tpo=dict(config={str(RECIPE)!r}, cfg_options={{'stages': [dict(name='all', train=dict(max_steps=3))]}}))\n"
        "evaluation = dict(split='test', max_new_tokens=40, limit=6)\n"
        "threads = 1\n"
    )
    torch.set_num_threads(2)  # the experiment runs on one thread, then gives the caller's setting back
    summary = run_experiment(config, work_dir=str(tmp_path / "run"))
    assert torch.get_num_threads() == 2
    assert set(summary["results"]) == {"sft", "tpo", "no-input"} and summary["steps"] == {"sft": 3, "tpo": 3}
    assert (tmp_path / "run" / "results.json").is_file() and Path(summary["plots"][0]).is_file()
    assert "| tpo |" in summary["table"] and "| no-input |" in summary["table"]
    assert set(summary["results"]["no-input"]) >= {"qa/accuracy", "temporal/R@0.5", "count/qa"}
    for name, res in summary["results"].items():  # every scored answer, one line each
        lines = [json.loads(line) for line in Path(summary["predictions"][name]).read_text().splitlines()]
        counted = sum(res[f"count/{kind}"] for kind in ("qa", "box", "temporal", "mask"))
        assert len(lines) == counted > 0, name
        qa = [line["score"] for line in lines if line["task"] == "qa"]
        assert np.mean(qa) == pytest.approx(res["qa/accuracy"]), name
    # a rerun reuses what finished; one with another benchmark or a changed run config is refused
    again = run_experiment(config, work_dir=str(tmp_path / "run"))
    assert again["results"]["sft"]["final_checkpoint"] == summary["results"]["sft"]["final_checkpoint"]
    assert again["table"] == summary["table"]
    with pytest.raises(ValueError, match=r"another benchmark \(seed: 1 before, 2 now\).*another --work-dir"):
        run_experiment(config, cfg_options={"synth.seed": 2}, work_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"runs.sft: its config changed .*optim.lr: .* before, 0.5 now"):
        run_experiment(config, cfg_options={"runs.sft.cfg_options": {"train.max_steps": 3, "optim.lr": 0.5}},
                       work_dir=str(tmp_path / "run"))
    from tpo.engine.experiment import experiment_main

    assert experiment_main([str(config), "--work-dir", str(tmp_path / "run"), "--cfg-options", "synth.seed=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo experiment: error: work_dir") and "seed: 1 before, 2 now" in err
    assert len(err.strip().splitlines()) == 1  # one line, not a traceback
    broken = tmp_path / "broken.py"  # a model its constructor refuses: one line too, when the run starts
    broken.write_text(config.read_text().replace("{'train.max_steps': 3}",
                                                 "{'train.max_steps': 3, 'model.llm.config.hidden_size': 30}"))
    assert experiment_main([str(broken), "--work-dir", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpo experiment: error: model.llm.config: not a valid") and len(err.splitlines()) == 1
    record = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert record["benchmark"]["version"] >= 2 and record["benchmark"]["seed"] == 1
    (tmp_path / "run" / "experiment.json").unlink()  # as an earlier tpo left it
    with pytest.raises(ValueError, match="without experiment.json"):
        run_experiment(config, work_dir=str(tmp_path / "run"))
    with pytest.raises(KeyError, match="synth.seeds: unknown key"):
        run_experiment(config, cfg_options={"synth.seeds": 2}, work_dir=str(tmp_path / "typo_synth"))
    bad = tmp_path / "bad.py"
    bad.write_text(config.read_text().replace("'train.max_steps': 3", "'train.max_steps': 4"))
    with pytest.raises(ValueError, match="same budget"):
        run_experiment(bad, work_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="none called 'no-input'"):
        run_experiment(config, cfg_options={"runs.no-input": {"config": "x.py"}}, work_dir=str(tmp_path / "named"))
    with pytest.raises(ValueError, match=r"evaluation.max_new_tokens \(run 'sft'\).*at least"):
        run_experiment(config, cfg_options={"evaluation.max_new_tokens": 8}, work_dir=str(tmp_path / "short"))
    assert not (tmp_path / "short" / "sft").exists()  # refused before any training
    with pytest.raises(KeyError, match="evaluation.max_tokens: unknown key"):
        run_experiment(config, cfg_options={"evaluation.max_tokens": 8}, work_dir=str(tmp_path / "typo"))
    for threads in (0, "2", True):
        with pytest.raises(ValueError, match="threads: torch's intra-op threads"):
            run_experiment(config, cfg_options={"threads": threads}, work_dir=str(tmp_path / "threads"))
    assert not (tmp_path / "threads").exists()  # refused before the benchmark is written


def test_the_scaled_experiment_gives_each_run_900_steps(monkeypatch, tmp_path):
    """configs/experiments/small_cpu.py scales the main job through its runs' cfg_options (list items of the
    TPO stages included); checked without training."""
    from tpo.engine.experiment import _run_config, _steps
    from tpo.registry import load_config

    monkeypatch.chdir(ROOT)  # the experiment configs name their runs' configs from the repository root
    cfg = load_config("configs/experiments/small_cpu.py")
    runs = {name: _run_config(run, cfg["data_root"], tmp_path) for name, run in cfg["runs"].items()}
    assert {name: _steps(run_cfg) for name, (run_cfg, _) in runs.items()} == {"sft": 900, "tpo": 900}
    assert cfg["synth"]["num"] == 300 and cfg["threads"] == 1


def test_tpo_train_runs_a_staged_recipe(synth_dir, tmp_path, capsys):
    from tpo.engine.main import train_main

    config = tmp_path / "recipe.py"
    options = _short(synth_dir)
    config.write_text(
        f"_base_ = [{str(RECIPE)!r}]\n"
        f"data = dict(train=dict(ann_file={options['data.train.ann_file']!r}))\n"
        "train = dict(batch_size=4)\n"
        f"stages = {options['stages']!r}\n"
    )
    assert train_main([str(config), "--work-dir", str(tmp_path / "run")]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in brief["stages"]] == ["assign", "heads"] and [s["steps"] for s in brief["stages"]] == [2, 2]
    assert brief["final_checkpoint"] == brief["stages"][1]["final_checkpoint"]
    assert json.loads((tmp_path / "run" / "2_heads" / "config.json").read_text())["load_from"] == (
        brief["stages"][0]["final_checkpoint"])
    with pytest.raises(SystemExit):  # a checkpoint path means nothing across stages
        train_main([str(config), "--work-dir", str(tmp_path / "run"), "--resume", "some/checkpoint"])
    assert "give --resume without a path" in capsys.readouterr().err
    # run again: the finished stages are reused, also with other logging; with another stage config, refused
    mtime = (tmp_path / "run" / "2_heads" / "report.json").stat().st_mtime_ns
    assert train_main([str(config), "--work-dir", str(tmp_path / "run"), "--cfg-options", "train.log_interval=7"]) == 0
    assert json.loads(capsys.readouterr().out)["final_checkpoint"] == brief["final_checkpoint"]
    assert (tmp_path / "run" / "2_heads" / "report.json").stat().st_mtime_ns == mtime
    changed = config.read_text().replace("train = dict(batch_size=4)",
                                         "train = dict(batch_size=4)\noptim = dict(lr=0.5)")
    config.write_text(changed)
    assert train_main([str(config), "--work-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stage 'assign': finished in" in err and "optim.lr:" in err and "0.5 now" in err, err


def test_tpo_train_reports_config_errors_in_one_line(synth_dir, tmp_path, capsys):
    from tpo.engine.main import train_main

    config = tmp_path / "recipe.py"
    options = _short(synth_dir)
    options["stages"][1]["optim"] = dict(lrr=1.0)
    config.write_text(f"_base_ = [{str(RECIPE)!r}]\n"
                      f"data = dict(train=dict(ann_file={options['data.train.ann_file']!r}))\n"
                      f"stages = {options['stages']!r}\n")
    assert train_main([str(config), "--work-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpo train: error: stage 'heads': optim.lrr") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert train_main([str(ROOT / "configs" / "sft" / "tiny_cpu.py"), "--cfg-options", "train.max_stepz=3"]) == 2
    assert "train.max_stepz: unknown key; did you mean 'max_steps'?" in capsys.readouterr().err
