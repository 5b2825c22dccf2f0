"""The engine hook for several optimiser updates on each batch
(``Algorithm.updates_per_batch``, PPO's epochs) and the per-process
algorithm state of checkpoints: the updates of a step see the same batch,
the schedule steps once a step, and a run killed mid-way and resumed gives
the uninterrupted run's losses, weights and per-process state."""
import pytest
import torch
from engine_testkit import losses_of, qa_items, train_config
from safetensors.torch import load_file

from tpo.algorithms.sft import SFT
from tpo.engine import Trainer
from tpo.engine.checkpoint import load_process_state
from tpo.registry import ALGORITHMS


@ALGORITHMS.register_module(force=True)
class RepeatedSFT(SFT):
    """SFT, ``updates`` optimiser updates on each batch; records what the
    engine hands it and counts its updates as per-process state."""

    def __init__(self, model, updates: int = 3):
        super().__init__(model)
        self.updates_per_batch = updates
        self.seen: list[tuple[int, int, tuple, float]] = []  # (step, update, ids, loss)
        self.count = 0
        self._step = self._update = 0

    def on_step(self, step, total_steps):
        self._step = step

    def on_update(self, index, updates):
        self._update = index
        self.count += 1

    def step(self, batch):
        out = super().step(batch)
        self.seen.append((self._step, self._update, tuple(batch["ids"]), float(out["loss"].detach())))
        return out

    def process_state(self):
        return {"count": self.count}

    def load_process_state(self, state):
        self.count = int(state["count"])


class Stop(Exception):
    pass


def _trainer(work_dir, resume=False):
    cfg = train_config(work_dir, algorithm={"type": "RepeatedSFT", "updates": 3},
                       train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 4},
                       checkpoint={"interval": 2, "keep_last": 3, "save_final": True})
    return Trainer(cfg, train_dataset=qa_items(12), resume=resume)


def test_updates_per_batch_and_exact_resume(tmp_path, monkeypatch):
    full = _trainer(tmp_path / "full")
    full.fit()
    algo = full.accelerator._models[0]
    assert [(s, k) for s, k, _, _ in algo.seen] == [(s, k) for s in range(4) for k in range(3)]
    for s in range(4):
        updates = [u for u in algo.seen if u[0] == s]
        assert len({ids for _, _, ids, _ in updates}) == 1  # the same batch three times
        assert updates[0][3] > updates[1][3] > updates[2][3]  # each update learns from it
    # the logged loss of a step is the mean of its updates' losses
    logged = losses_of(tmp_path / "full")
    for s in range(4):
        assert logged[s + 1] == pytest.approx(sum(u[3] for u in algo.seen if u[0] == s) / 3, rel=1e-6)
    final = tmp_path / "full" / "checkpoints" / "step_00000004"
    optimizer = torch.load(final / "optimizer.bin", weights_only=False)
    assert {float(v["step"]) for v in optimizer["state"].values()} == {12.0}  # 4 steps x 3 updates
    assert torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)["last_epoch"] == 4  # the schedule
    assert torch.load(final / "process_state_0.pt", weights_only=True) == {"count": 12}

    original = RepeatedSFT.on_step

    def crash(self, step, total):
        if step == 2:
            raise Stop("killed")
        return original(self, step, total)

    monkeypatch.setattr(RepeatedSFT, "on_step", crash)
    with pytest.raises(Stop):
        _trainer(tmp_path / "cut").fit()
    monkeypatch.setattr(RepeatedSFT, "on_step", original)
    resumed = _trainer(tmp_path / "cut", resume=True)
    resumed.fit()
    assert resumed.accelerator._models[0].count == 12  # 6 restored from the checkpoint of step 2, then 6 more
    got = losses_of(tmp_path / "cut")
    assert sorted(got) == [1, 2, 3, 4]
    for step in logged:
        assert got[step] == pytest.approx(logged[step], rel=0, abs=1e-6), step
    a = load_file(final / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step_00000004" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_process_state_needs_the_same_number_of_processes(tmp_path):
    for rank in (0, 1):
        torch.save({"count": rank}, tmp_path / f"process_state_{rank}.pt")
    assert load_process_state(tmp_path, 1, 2, 2) == {"count": 1}
    with pytest.raises(ValueError, match="per-process state of 2 process.*this run has 1; resume it with 2"):
        load_process_state(tmp_path, 0, 1, 2)
    (tmp_path / "process_state_1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="process_state_1.pt is missing"):
        load_process_state(tmp_path, 1, 2, 2)
    assert load_process_state(tmp_path / "none", 0, 1, 1) is None  # an algorithm without per-process state
