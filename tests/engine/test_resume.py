"""A run stopped mid-epoch and resumed gives the per-step losses of a run that
was never stopped: model, optimiser, scheduler, RNG states and the position in
the data are all restored."""
import json

import pytest
import torch
from engine_testkit import losses_of, model_config, qa_items, train_config

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


def test_resume_with_another_global_batch_is_an_error(tmp_path):
    data = qa_items(12)
    _trainer(tmp_path / "run", data, train={"max_steps": 3, "batch_size": 4, "micro_batch_size": 2}).fit()
    with pytest.raises(ValueError, match="train.batch_size"):
        _trainer(tmp_path / "run", data, resume=True,
                 train={"max_steps": 4, "batch_size": 2, "micro_batch_size": 2}).fit()
    # the checkpoint's trainer state is plain JSON
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["global_batch_size"] == 4


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
