"""`tpo train` end to end on the synthetic benchmark: the shipped SFT and DPO
configs, SampleDataset, the real collators, checkpoints, --resume and the
report; config errors from the command line name the key."""
import json
import re
from pathlib import Path

import pytest

from tpo.data.synth import synthesize
from tpo.engine import train_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num=10, seed=0, frames=4, size=32)
    return out


def _options(synth, steps, **extra):
    options = {"data.train.ann_file": str(synth / "train.jsonl"), "data.val.ann_file": str(synth / "val.jsonl"),
               "train.max_steps": steps, "train.batch_size": 4, "train.micro_batch_size": 2,
               "train.progress_bar": False, "train.tensorboard": False, "checkpoint.interval": 2,
               "evaluation.interval": None, "evaluation.max_batches": 1, **extra}
    return [f"{k}={v}" for k, v in options.items()]


@pytest.mark.parametrize("recipe", ["sft/timm_mlp_llama.py", "dpo/timm_mlp_llama.py"])
def test_train_and_resume(tmp_path, synth, recipe, capsys):
    config = str(ROOT / "configs" / recipe)
    assert train_main([config, "--work-dir", str(tmp_path), "--cfg-options", *_options(synth, 2)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["steps"] == 2 and first["final_checkpoint"].endswith("step_00000002")
    # a new run there (no --resume) would mix its checkpoints with these: refused in one line
    assert train_main([config, "--work-dir", str(tmp_path), "--cfg-options", *_options(synth, 3)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpo train: error: work_dir:") and "pass --resume" in err and len(err.splitlines()) == 1
    assert train_main([config, "--work-dir", str(tmp_path), "--resume", "--cfg-options", *_options(synth, 3)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 3 and report["resumed_from"].endswith("step_00000002")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3]
    val = report["val"]
    key = "qa/accuracy" if recipe.startswith("sft") else "rewards/accuracies"
    assert key in val and "loss" in val


def test_command_line_errors_name_the_key(tmp_path, synth, capsys):
    config = str(ROOT / "configs" / "dpo" / "timm_mlp_llama.py")
    assert train_main([config, "--work-dir", str(tmp_path), "--cfg-options", *_options(synth, 1),
                       "algorithm.loss.type=DPOLos"]) == 2
    assert re.search(r"^tpo train: error: algorithm\.loss\.type: 'DPOLos'", capsys.readouterr().err)
    assert train_main([config, "--work-dir", str(tmp_path), "--cfg-options", *_options(synth, 1),
                       f"data.val.ann_file={tmp_path / 'missing.jsonl'}"]) == 2
    assert "data.val.ann_file" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


def test_errors_of_building_what_the_config_names_are_one_line(tmp_path, synth, capsys):
    """Past the config check, the model's own constructor (transformers' config rules) and the weights of
    load_from can still refuse: one line naming the key, not a traceback; the error keeps its type for callers."""
    config = str(ROOT / "configs" / "sft" / "timm_mlp_llama.py")
    assert train_main([config, "--work-dir", str(tmp_path / "a"), "--cfg-options", *_options(synth, 1),
                       "model.llm.config.hidden_size=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tpo train: error: model.llm.config: not a valid 'llama' config") and "(30)" in err
    assert len(err.splitlines()) == 1
    assert train_main([config, "--work-dir", str(tmp_path / "b"), "--cfg-options", *_options(synth, 1),
                       f"load_from={tmp_path}"]) == 2
    assert "tpo train: error: checkpoint" in capsys.readouterr().err
    from tpo.engine import Trainer

    options = {"data.train.ann_file": str(synth / "train.jsonl"), "data.val.ann_file": str(synth / "val.jsonl"),
               "train.max_steps": 1, "train.batch_size": 4, "train.progress_bar": False, "train.tensorboard": False,
               "model.llm.config.hidden_size": 30}
    trainer = Trainer(config, cfg_options=options, work_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="not a multiple of the number of attention heads"):
        trainer.fit()


def test_tpo_train_destroys_the_process_group_it_ran_in(tmp_path, synth, capsys):
    """A launched process that exits with its process group alive can abort in interpreter shutdown
    (gloo; pytorch/pytorch#190489): `tpo train` destroys it when done (here a one-process gloo group)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = str(ROOT / "configs" / "sft" / "timm_mlp_llama.py")
        assert train_main([config, "--work-dir", str(tmp_path / "run"), "--cfg-options", *_options(synth, 1)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
