"""A run stopped mid-epoch and resumed gives the per-step losses of a run that
was never stopped: model, optimiser, scheduler, RNG states and the position in
the data are all restored."""
import json

import pytest
import torch
from engine_testkit import losses_of, model_config, qa_items, train_config

import tpo.engine.trainer as trainer_module
from tpo.engine import Trainer
from tpo.engine.checkpoint import list_checkpoints, read_state


class Stop(Exception):
    pass


def _trainer(work_dir, data, resume=False, **sections):
    sections = {"train": {"max_steps": 7, "micro_batch_size": 2, "batch_size": 4},
                "checkpoint": {"interval": 3, "keep_last": 3, "save_final": True}, **sections}
    # attention dropout draws from torch's RNG every step: the RNG state must be restored too
    model = model_config(**{"llm.config.attention_dropout": 0.2})
    return Trainer(train_config(work_dir, model=model, **sections), resume=resume, train_dataset=data)


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    data = qa_items(18)  # 4 steps an epoch: the run crosses an epoch, the checkpoint at step 3 is mid-epoch
    full = _trainer(tmp_path / "full", data)
    full.fit()
    expected = losses_of(tmp_path / "full")
    assert sorted(expected) == list(range(1, 8))

    # the same run, killed during step 5 (after the checkpoint of step 3)
    from tpo.algorithms.sft import SFT

    original = SFT.on_step

    def crash(self, step, total):
        if step == 4:
            raise Stop("killed")
        return original(self, step, total)

    monkeypatch.setattr(SFT, "on_step", crash)
    with pytest.raises(Stop):
        _trainer(tmp_path / "cut", data).fit()
    monkeypatch.setattr(SFT, "on_step", original)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    state = read_state(tmp_path / "cut" / "checkpoints" / "step_00000003")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    assert sorted(losses_of(tmp_path / "cut")) == [1, 2, 3, 4]  # step 4 was logged before the crash

    report = _trainer(tmp_path / "cut", data, resume=True).fit()
    resumed = losses_of(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 8))  # the log after step 3 was replaced, not duplicated
    for step in range(1, 8):
        assert resumed[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    assert report["resumed_from"].endswith("step_00000003")

    # the final weights agree too
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step_00000007" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step_00000007" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _trainer(tmp_path / "empty", qa_items(8), resume=True).fit()


def test_resume_with_another_global_batch_seed_or_data_is_an_error(tmp_path, monkeypatch):
    """The rest of the epoch's data order depends on the global batch, train.seed and the training
    set's length: a resume that changes one is refused, before any model is built."""
    data = qa_items(12)
    _trainer(tmp_path / "run", data, train={"max_steps": 3, "batch_size": 4, "micro_batch_size": 2}).fit()

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the resume was refused")

    monkeypatch.setattr(trainer_module, "build_model", forbidden)
    for train, items, pattern in [
        ({"batch_size": 2}, data, r"train\.batch_size: 2, but the checkpoint .* with 4"),
        ({"seed": 1}, data, r"train\.seed: 1, but the checkpoint .* with 0; resuming needs the same seed"),
        ({}, qa_items(13), r"data\.train: 13 samples, but the checkpoint .* with 12 samples"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            _trainer(tmp_path / "run", items, resume=True,
                     train={"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, **train}).fit()
    # the checkpoint's trainer state is plain JSON
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["global_batch_size"] == 4


def test_resume_with_another_micro_batch_size(tmp_path):
    """A checkpoint is taken between optimiser steps: a run resumed with another micro-batch size for the
    same global batch (another accumulation count) continues it."""
    data = qa_items(12)

    def run(work_dir, micro, steps, resume=False):
        cfg = train_config(work_dir, train={"batch_size": 6, "micro_batch_size": micro, "max_steps": steps},
                           checkpoint={"interval": 1})
        Trainer(cfg, train_dataset=data, resume=resume).fit()

    run(tmp_path / "full", 3, 2)
    run(tmp_path / "cut", 3, 1)  # 2 micro-batches a step
    run(tmp_path / "cut", 2, 2, resume=True)  # 3 micro-batches a step
    assert losses_of(tmp_path / "cut") == pytest.approx(losses_of(tmp_path / "full"), rel=0, abs=1e-5)


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """Resumed from step 1 of a run that went on to step 3, the new run's checkpoints are the latest (not
    pruned as older than the abandoned ones, and what the next --resume takes); the abandoned ones are
    kept, out of the way."""
    from tpo.engine.checkpoint import list_checkpoints, read_state

    data = qa_items(12)
    cfg = train_config(tmp_path, train={"batch_size": 4, "max_steps": 3, "progress_bar": False},
                       checkpoint={"interval": 1, "keep_last": 2})
    Trainer(cfg, train_dataset=data).fit()
    root = tmp_path / "checkpoints"
    first = {at: read_state(path)["time"] for at, path in list_checkpoints(root)}
    assert sorted(first) == [2, 3]
    Trainer(dict(cfg, train=dict(cfg["train"], max_steps=2)), train_dataset=data, resume=str(root / "step_00000002")
            ).fit()  # nothing after step 2 to redo: but step 3 is set aside
    assert "moved to" in capsys.readouterr().err
    assert [at for at, _ in list_checkpoints(root)] == [2]
    assert [at for at, _ in list_checkpoints(root / "abandoned-after-step_00000002")] == [3]
    Trainer(dict(cfg, train=dict(cfg["train"], max_steps=4)), train_dataset=data, resume=True).fit()
    kept = {at: read_state(path)["time"] for at, path in list_checkpoints(root)}
    assert sorted(kept) == [3, 4] and kept[3] > first[3]  # the new run's own step 3, not the abandoned one


def test_resume_takes_the_configured_optimiser_settings(tmp_path, capsys):
    """A run resumed with another optim.lr or weight_decay (what NonFiniteLossError advises) trains
    with them on this run's schedule, not with the checkpoint's, and says so."""
    data = qa_items(12)

    def trainer(steps, optim, resume=False):
        cfg = train_config(tmp_path, train={"batch_size": 4, "max_steps": steps, "progress_bar": False},
                           optim=optim, schedule={"type": "linear", "warmup_steps": 0},
                           checkpoint={"interval": 1, "save_final": True})
        return Trainer(cfg, train_dataset=data, resume=resume)

    trainer(1, {"lr": 1e-2}).fit()
    resumed = trainer(3, {"lr": 1e-3, "weight_decay": 0.1}, resume=True)
    resumed.fit()
    rates = [r["lr/default"] for r in resumed.history if r["split"] == "train"]
    assert rates == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3])  # steps 2 and 3 of 3
    groups = torch.load(tmp_path / "checkpoints" / "step_00000003" / "optimizer.bin", weights_only=True)
    assert {g["name"]: g["weight_decay"] for g in groups["param_groups"]}["default"] == 0.1
    err = capsys.readouterr().err
    assert "not the checkpoint's: default: lr 0.01 -> 0.001; default: weight_decay 0.0 -> 0.1" in err


def test_resuming_a_finished_run_repeats_nothing(tmp_path):
    """--resume of a run that has ended neither validates nor saves its last step again."""
    data, val = qa_items(8), qa_items(4, seed=1, prefix="v")
    # its last checkpoint is an interval one, taken after the last step's validation
    cfg = train_config(tmp_path, train={"max_steps": 2}, checkpoint={"interval": 2, "save_final": True},
                       evaluation={"at_end": True})
    Trainer(cfg, train_dataset=data, val_dataset=val).fit()
    final = tmp_path / "checkpoints" / "step_00000002"
    saved = (final / "trainer_state.json").stat().st_mtime_ns
    report = Trainer(cfg, train_dataset=data, val_dataset=val, resume=True).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "val")]
    assert (final / "trainer_state.json").stat().st_mtime_ns == saved
    assert report["final_checkpoint"] == str(final) and "loss" in report["val"]


def test_max_epochs_and_the_epoch_boundary(tmp_path):
    """max_epochs counts whole epochs of full global batches; a checkpoint at
    the end of an epoch records the start of the next one, and resuming from it
    continues the run."""
    data = qa_items(9)  # 2 steps of 4 an epoch, one sample left over each epoch
    cfg = {"train": {"max_steps": None, "max_epochs": 2, "batch_size": 4},
           "checkpoint": {"interval": 2, "keep_last": 3, "save_final": True}}
    report = _trainer(tmp_path / "full", data, **cfg).fit()
    assert report["steps"] == 4 and report["epochs"] == 2
    state = read_state(tmp_path / "full" / "checkpoints" / "step_00000002")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    cfg["train"]["max_epochs"] = 3
    report = _trainer(tmp_path / "full", data, resume=True, **cfg).fit()
    assert report["steps"] == 6 and sorted(losses_of(tmp_path / "full")) == [1, 2, 3, 4, 5, 6]
