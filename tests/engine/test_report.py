"""A run leaves metrics.jsonl, TensorBoard events, the resolved config, and a
final report: report.json and PNG curves of the loss and the eval metrics."""
import json

from engine_testkit import model_config, qa_items, train_config
from PIL import Image

from tpo.engine import Trainer


def test_report_files(tmp_path):
    cfg = train_config(tmp_path, train={"batch_size": 2, "max_steps": 4, "tensorboard": True},
                       evaluation={"interval": 2, "metrics": [{"type": "QAAccuracy"}], "batch_size": 4},
                       checkpoint={"save_final": True})
    report = Trainer(cfg, train_dataset=qa_items(8), val_dataset=qa_items(4, seed=3, prefix="v")).fit()
    for name in ("metrics.jsonl", "config.json", "report.json", "loss.png", "metrics.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    for png in ("loss.png", "metrics.png"):
        with Image.open(tmp_path / png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    for key in ("loss", "losses/lm", "lr/default", "grad_norm", "samples_per_s", "epoch", "num_items"):
        assert key in train[0], key
    assert {"loss", "qa/accuracy", "qa/accuracy/open", "qa/accuracy/color"} <= set(val[0])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["steps"] == 4 and on_disk["algorithm"] == "SFT"
    assert on_disk["train"]["loss"]["last"] == train[-1]["loss"]
    assert on_disk["val"]["loss"]["last_step"] == 4 and on_disk["val"]["qa/accuracy"]["last"] == val[-1]["qa/accuracy"]
    assert on_disk["final_checkpoint"].endswith("step_00000004")
    assert report["plots"] == ["loss.png", "metrics.png"]


def test_evaluation_does_not_change_training(tmp_path):
    """Evaluation runs in eval mode under a forked RNG and puts the model back in
    training mode: with or without it, the training losses (with dropout) are
    the same."""
    runs = {}
    model = model_config(**{"llm.config.attention_dropout": 0.2})
    for name, evaluation in (("plain", {"interval": None}), ("eval", {"interval": 1, "at_end": True})):
        cfg = train_config(tmp_path / name, model=model, train={"batch_size": 2, "max_steps": 3},
                           evaluation=evaluation)
        trainer = Trainer(cfg, train_dataset=qa_items(8), val_dataset=qa_items(4, seed=3, prefix="v"))
        trainer.fit()
        runs[name] = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert runs["eval"] == runs["plain"]


def test_bf16_mixed_precision_runs(tmp_path):
    cfg = train_config(tmp_path, train={"batch_size": 2, "max_steps": 2, "mixed_precision": "bf16"})
    report = Trainer(cfg, train_dataset=qa_items(4)).fit()
    assert report["mixed_precision"] == "bf16"
    assert 0 < report["train"]["loss"]["last"] < 20
