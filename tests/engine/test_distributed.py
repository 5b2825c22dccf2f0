"""Two CPU processes (gloo, launched by torchrun) train the same loss curve as
one process with the same global batch: the global batch is split across
processes and accumulation rounds, and the loss is normalised by the answer
tokens of the whole global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_testkit import losses_of, qa_items, train_config
from safetensors.torch import load_file

from tpo.engine import Trainer

KIT = Path(__file__).resolve().parent
DRIVER = """
import sys
sys.path.insert(0, {kit!r})
from engine_testkit import qa_items, train_config
from tpo.engine import Trainer
cfg = train_config({work_dir!r}, train={train!r}, checkpoint={{"save_final": True}}, evaluation={{"at_end": True}})
trainer = Trainer(cfg, train_dataset=qa_items(16), val_dataset=qa_items(6, seed=1, prefix="v"))
trainer.fit()
trainer.accelerator.end_training()  # destroys the process group: exiting with it alive can abort (SIGABRT)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _val_loss(work_dir) -> float:
    records = [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["split"] == "val")


def test_two_processes_match_one(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the Python interpreter")
    train = {"batch_size": 4, "micro_batch_size": 1, "max_steps": 4}  # 2 processes x 1 x accumulation 2
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(kit=str(KIT), work_dir=str(tmp_path / "two"), train=train))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), str(script)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, one process with the same global batch in one micro-batch
    one = train_config(tmp_path / "one", train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 4},
                       checkpoint={"save_final": True}, evaluation={"at_end": True})
    Trainer(one, train_dataset=qa_items(16), val_dataset=qa_items(6, seed=1, prefix="v")).fit()

    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert (state["num_processes"], state["micro_batch_size"], state["grad_accum"]) == (2, 1, 2)
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / "random_states_1.pkl").is_file()

    expected, got = losses_of(tmp_path / "one"), losses_of(tmp_path / "two")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert _val_loss(tmp_path / "two") == pytest.approx(_val_loss(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_00000004" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)  # Adam amplifies rounding of tiny grads


RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tpo" / "recipes" / "tiny_cpu.py"


def test_a_staged_tpo_recipe_trains_on_two_processes(tmp_path):
    """TPO under DDP: a stage whose losses leave heads out, and batches without some task, give those heads no
    gradient (find_unused_parameters is on for models with task heads); every process chains the stages."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the Python interpreter")
    from tpo.data.synth import synthesize

    synthesize(tmp_path / "synth", 6, seed=2, frames=4, size=32)
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        f"_base_ = [{str(RECIPE)!r}]\n"
        f"data = dict(train=dict(ann_file={str(tmp_path / 'synth' / 'train.jsonl')!r}))\n"
        "train = dict(batch_size=4)\n"
        "stages = [\n"
        "    dict(name='assign', algorithm=dict(type='TPO', losses=['^lm$', '^assign$']),\n"
        "         data=dict(train=dict(tasks=['grounding', 'segmentation'])), train=dict(max_steps=2)),\n"
        "    dict(name='heads', algorithm=dict(type='TPO', losses=[r'^(region|mask)\\.'], trainable=[r'^heads\\.']),\n"
        "         data=dict(train=dict(tasks=['grounding', 'segmentation'])), train=dict(max_steps=2)),\n"
        "]\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tpo.engine.main", str(recipe), "--work-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:]
    summary = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["assign", "heads"]
    for stage in summary["stages"]:
        report = json.loads((Path(stage["work_dir"]) / "report.json").read_text())
        assert report["num_processes"] == 2 and report["steps"] == 2
    config = json.loads((tmp_path / "run" / "2_heads" / "config.json").read_text())
    assert config["load_from"] == summary["stages"][0]["final_checkpoint"]
    assert out.stdout.count('"final_checkpoint"') == 3  # the brief is printed once: two stages and the last
