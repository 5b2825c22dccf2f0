"""Gradient accumulation trains like one big batch: the loss is normalised by
the answer tokens of the whole global batch, whatever the micro-batch size."""
import pytest
import torch
from engine_testkit import losses_of, qa_items, train_config
from safetensors.torch import load_file

from tpo.engine import Trainer


def _run(work_dir, micro):
    cfg = train_config(work_dir, train={"batch_size": 4, "micro_batch_size": micro, "max_steps": 3},
                       checkpoint={"save_final": True})
    Trainer(cfg, train_dataset=qa_items(12)).fit()
    return losses_of(work_dir), load_file(work_dir / "checkpoints" / "step_00000003" / "model.safetensors")


def test_accumulation_matches_one_batch(tmp_path):
    whole, w_whole = _run(tmp_path / "m4", 4)
    for micro in (1, 2):
        split, w_split = _run(tmp_path / f"m{micro}", micro)
        for step in whole:
            assert split[step] == pytest.approx(whole[step], rel=1e-5), (micro, step)
        for key in w_whole:
            torch.testing.assert_close(w_split[key], w_whole[key], rtol=1e-3, atol=1e-4)
