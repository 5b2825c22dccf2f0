"""The `tpo` command, run in-process."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mllm" / "timm_mlp_llama.py")


def test_registry_lists_components(capsys):
    assert main(["registry", "projectors"]) == 0
    out = capsys.readouterr().out
    assert "MLPProjector" in out and "LinearProjector" in out
    assert main(["registry", "nope"]) == 2


def test_config_applies_overrides(capsys):
    assert main(["config", CONFIG, "--cfg-options", "model.llm.config.num_hidden_layers=3"]) == 0
    assert "num_hidden_layers=3" in capsys.readouterr().out


def test_build_prints_parameters(capsys):
    assert main(["build", CONFIG]) == 0
    out = capsys.readouterr().out
    for part in ("vision_encoder", "projector", "llm", "total"):
        assert part in out


def test_chat_on_image_and_video(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "v.npy", rng.integers(0, 255, (5, 24, 24, 3), dtype=np.uint8))
    assert main(["chat", CONFIG, "--image", str(tmp_path / "a.png"), "--prompt", "hi", "--max-new-tokens", "3",
                 "--json"]) == 0
    assert '"answer"' in capsys.readouterr().out
    assert main(["chat", CONFIG, "--video", str(tmp_path / "v.npy"), "--prompt", "hi", "--max-new-tokens", "3"]) == 0


def test_chat_errors_are_reported(tmp_path, capsys):
    assert main(["chat", CONFIG, "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["chat", CONFIG, "--prompt", "x"]) == 2
    assert main(["build", CONFIG, "--cfg-options", "model.projector.type=Nope"]) == 2
    assert "model.projector.type" in capsys.readouterr().err


def test_data_synth(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num", "2", "--seed", "1"]) == 0
    assert (tmp_path / "s" / "train.jsonl").is_file()


def test_missing_subcommand_exits():
    with pytest.raises(SystemExit):
        main([])


def test_eval_scores_a_model_on_a_dataset(tmp_path, capsys):
    import json

    from tpo.data.synth import synthesize

    synthesize(tmp_path / "s", 3, seed=2, frames=4, size=32)
    data = str(tmp_path / "s" / "test.jsonl")
    tpo = str(ROOT / "configs" / "tpo" / "timm_mlp_llama.py")
    answers = tmp_path / "answers.jsonl"
    assert main(["eval", tpo, "--data", data, "--limit", "8", "--max-new-tokens", "40", "--json",
                 "--predictions", str(answers)]) == 0
    report = json.loads(capsys.readouterr().out)
    scored = sum(report[f"count/{k}"] for k in ("qa", "box", "temporal", "mask"))
    assert 0 < scored == len(answers.read_text().splitlines())
    assert report["assign/accuracy"] is not None  # a TPO model: task assignment is scored
    assert main(["eval", CONFIG, "--data", data, "--limit", "4", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "qa/accuracy" in out and "random initialisation" in out and "assign/accuracy" not in out
    # refused with the reason, before anything is answered
    assert main(["eval", CONFIG, "--data", data, "--predictions", str(tmp_path / "a.json")]) == 2
    assert "--predictions: a .jsonl path" in capsys.readouterr().err
    assert main(["eval", CONFIG, "--data", data, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", CONFIG, "--data", data, "--max-new-tokens", "5"]) == 2
    assert "cannot hold the reference answer" in capsys.readouterr().err
    assert main(["eval", CONFIG, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
