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


def test_chat_with_a_tpo_model_prints_its_task_heads(tmp_path, capsys, monkeypatch):
    import json

    import torch

    from tpo.models.tpo_model import TPOModel

    tpo = str(ROOT / "configs" / "tpo" / "timm_mlp_llama.py")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    video = str(tmp_path / "v.npy")
    # a real (random) TPO model: its answer and whatever heads it ran
    assert main(["chat", tpo, "--video", video, "--prompt", "Where is it?", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prompt", "answer", "tasks"} and isinstance(out["tasks"], dict)
    # the printing of every kind of head result, and the box prompt handed to predict
    seen = {}

    def predict(self, prompt, image=None, video=None, input_box=None, head_inputs=None, **kwargs):
        seen.update(input_box=input_box, size=head_inputs["output_size"], kwargs=kwargs, frames=video.shape,
                    init_frames=head_inputs["init_frames"].tolist())
        return {"text": "here", "tasks": {
            "region": {"boxes": torch.tensor([[0.1, 0.2, 0.3, 0.4]])},
            "mask": {"masks": torch.zeros(1, 4, 32, 32, dtype=torch.bool).index_fill_(2, torch.tensor([0]), True)}}}

    monkeypatch.setattr(TPOModel, "predict", predict)
    saved = tmp_path / "heads.npz"
    assert main(["chat", tpo, "--video", video, "--prompt", "Track it.", "--input-box", "0.1,0.2,0.5,0.6",
                 "--input-frame", "2", "--save-tasks", str(saved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "here" and lines[1] == "[region] boxes: [[0.1, 0.2, 0.3, 0.4]]"
    assert lines[2] == "[mask] masks: {'shape': [1, 4, 32, 32], 'foreground': 0.0312}"
    assert seen["input_box"] == [0.1, 0.2, 0.5, 0.6] and seen["size"] == (32, 32) and seen["frames"][-3:] == (3, 32, 32)
    assert seen["kwargs"] == {"max_new_tokens": 32, "do_sample": False}  # greedy: no sampling settings
    assert seen["init_frames"] == [2]  # the frame the box prompt is on
    with np.load(saved) as arrays:
        assert arrays["region/boxes"].tolist() == [[np.float32(0.1), np.float32(0.2), np.float32(0.3),
                                                   np.float32(0.4)]] and arrays["mask/masks"].shape == (1, 4, 32, 32)
    # refused: a box that is not one, a box for a model without heads, a file that is not .npz
    assert main(["chat", tpo, "--video", video, "--prompt", "x", "--input-box", "0.5,0.5,0.1,0.9"]) == 2
    assert "--input-box: x1,y1,x2,y2" in capsys.readouterr().err
    assert main(["chat", tpo, "--video", video, "--prompt", "x", "--input-box", "0,0,1,1", "--input-frame", "4"]) == 2
    assert "--input-frame 4: the model samples 4 frame(s) of the video; give 0 to 3" in capsys.readouterr().err
    assert main(["chat", CONFIG, "--video", video, "--prompt", "x", "--input-box", "0,0,1,1"]) == 2
    assert "builds a MultimodalLLM" in capsys.readouterr().err
    assert main(["chat", tpo, "--video", video, "--prompt", "x", "--save-tasks", str(tmp_path / "h.npy")]) == 2
    assert "--save-tasks: a .npz path" in capsys.readouterr().err
