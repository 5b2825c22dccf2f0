"""Checkpoints are written atomically: a crash in the middle of a save leaves
the previous checkpoints intact and resumable; only the last K are kept."""
import os

import pytest
import torch
from engine_testkit import losses_of, qa_items, train_config

from tpo.engine import Trainer
from tpo.engine import checkpoint as ckpt


def _trainer(work_dir, resume=False, max_steps=4):
    cfg = train_config(work_dir, train={"max_steps": max_steps, "batch_size": 2},
                       checkpoint={"interval": 1, "keep_last": 2, "save_final": True})
    return Trainer(cfg, resume=resume, train_dataset=qa_items(12))


def test_keep_last_k(tmp_path):
    _trainer(tmp_path).fit()
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    folder = root / "step_00000004"
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                 "trainer_state.json", "algorithm_state.pt"):
        assert (folder / name).is_file(), name
    # model.safetensors holds the model under its own names: what `tpo chat --checkpoint` loads
    from engine_testkit import model_config
    from tpo.registry import build_model

    from tpo.models.utils import load_model_weights

    model = build_model(model_config())
    load_model_weights(model, folder)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt.fsync_tree
    calls = []

    def crash_on_step_3(path):
        calls.append(path)
        if os.path.basename(path) == ".tmp-step_00000003":
            # the state is half on disk: make it look torn, then die
            with open(os.path.join(path, "model.safetensors"), "r+b") as handle:
                handle.truncate(100)
            raise OSError("No space left on device")
        return real(path)

    monkeypatch.setattr(ckpt, "fsync_tree", crash_on_step_3)
    with pytest.raises(OSError, match="No space left"):
        _trainer(tmp_path).fit()
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1, 2]  # step 3 never became a checkpoint
    assert (root / ".tmp-step_00000003").is_dir()
    assert ckpt.latest_checkpoint(root) == root / "step_00000002"
    # the previous checkpoint is complete and loads
    from safetensors.torch import load_file

    weights = load_file(root / "step_00000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())

    monkeypatch.setattr(ckpt, "fsync_tree", real)
    _trainer(tmp_path, resume=True).fit()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    assert not (root / ".tmp-step_00000003").exists()  # the torn folder was cleaned away
    assert sorted(losses_of(tmp_path)) == [1, 2, 3, 4]


def test_a_new_run_in_a_work_dir_with_checkpoints_is_refused(tmp_path):
    """A new run in a work dir holding an earlier run's checkpoints would prune its own final checkpoint
    (older than theirs) and a later --resume would continue theirs: refused before it trains."""
    _trainer(tmp_path, max_steps=3).fit()
    with pytest.raises(ValueError, match=r"work_dir: .* holds the checkpoints of an earlier run \(the latest "
                                         r"step_00000003\); pass --resume"):
        _trainer(tmp_path, max_steps=2).fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 3]


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    ckpt.write_json(path, {"step": 1})

    def fail(*args, **kwargs):
        raise OSError("crash before the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        ckpt.write_json(path, {"step": 2})
    assert '"step": 1' in path.read_text()


def test_resume_from_an_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "torn").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _trainer(tmp_path / "run", resume=str(tmp_path / "torn")).fit()
