"""Two CPU processes (gloo) under `accelerate launch` with an accelerate
config (FSDP, DeepSpeed), checked against one process with the same global
batch: the loss curve, the evaluation, the gathered ``model.safetensors``,
and a run killed mid-way and resumed from the checkpoint of its own format."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_testkit import losses_of, model_config, qa_items, train_config
from safetensors.torch import load_file

KIT = Path(__file__).resolve().parent
TRAIN = {"batch_size": 4, "micro_batch_size": 1, "max_steps": 4}  # 2 processes x 1 x accumulation 2
# evaluation answers the QA prompts too (generation on sharded weights: every process the same forward passes)
EVALUATION = {"at_end": True, "metrics": [{"type": "QAAccuracy"}]}


def val_items():
    """5 evaluation items (batches of 1), two of them captions: whichever way the batches are dealt to the
    2 processes, at some step one process has a QA item to answer and the other none, and both must still
    take the same generation steps."""
    items = qa_items(5, seed=1, prefix="v")
    for i in (1, 3):
        items[i]["meta"] = dict(items[i]["meta"], task="caption")
    return items


DRIVER = """
import json, sys
sys.path.insert(0, {kit!r})
from engine_testkit import qa_items, train_config
from launch_testkit import val_items
from tpo.algorithms.sft import SFT
from tpo.engine import Trainer


def run(work_dir, resume=False):
    cfg = train_config(work_dir, train={train!r}, checkpoint={{"interval": 2, "keep_last": 3, "save_final": True}},
                       evaluation={evaluation!r})
    trainer = Trainer(cfg, train_dataset=qa_items(16), val_dataset=val_items(), resume=resume)
    trainer.fit()
    return trainer


trainer = run({full!r})
acc, algo = trainer.accelerator, trainer.accelerator._models[0]
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers.integrations.fsdp import is_fsdp_managed_module
facts = dict(distributed_type=str(acc.distributed_type), num_processes=acc.num_processes,
             fsdp_units=sum(isinstance(m, FSDPModule) for m in algo.modules()),
             dtensors=all(isinstance(p, DTensor) for p in algo.parameters()),
             synced_generation=is_fsdp_managed_module(algo.model.llm.model))
if acc.is_main_process:
    print("FACTS " + json.dumps(facts), flush=True)


class Stop(Exception):
    pass


original = SFT.on_step


def crash(self, step, total):
    if step == 2:
        raise Stop("killed")
    return original(self, step, total)


SFT.on_step = crash  # killed before step 3, on both processes
try:
    run({cut!r})
except Stop:
    pass
else:
    raise SystemExit("the run was not stopped")
SFT.on_step = original
run({cut!r}, resume=True).accelerator.end_training()  # the process group destroyed before exit
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _val(work_dir) -> dict:
    records = [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["split"] == "val")


def launch_and_compare(tmp_path, accelerate_config: str) -> tuple[dict, Path]:
    """Run the driver under `accelerate launch --config_file` (2 processes)
    while one process trains the same global batch here; check what both
    runs share and return the driver's facts and the final checkpoint."""
    from tpo.engine import Trainer

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("the accelerate command is not installed next to the Python interpreter")
    config = tmp_path / "accelerate.yaml"
    config.write_text(accelerate_config.format(port=free_port()))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(kit=str(KIT), train=TRAIN, evaluation=EVALUATION, full=str(tmp_path / "two"),
                                    cut=str(tmp_path / "cut")))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([str(accelerate), "launch", "--config_file", str(config), str(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, one process with the same global batch in one micro-batch
    one = train_config(tmp_path / "one", train={**TRAIN, "micro_batch_size": 4}, checkpoint={"save_final": True},
                       evaluation=EVALUATION)
    Trainer(one, train_dataset=qa_items(16), val_dataset=val_items()).fit()

    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    facts = json.loads(next(line for line in out.splitlines() if line.startswith("FACTS "))[len("FACTS "):])
    assert facts["num_processes"] == 2

    final = tmp_path / "two" / "checkpoints" / "step_00000004"
    state = json.loads((final / "trainer_state.json").read_text())
    assert (state["num_processes"], state["micro_batch_size"], state["grad_accum"]) == (2, 1, 2)
    assert (final / "random_states_1.pkl").is_file()

    # the loss curve of one process: the gradient is reduced over the processes (a sum, then the mean) where one
    # process sums in one backward, so only float32 rounding differs (measured: relative 1e-7)
    expected, got = losses_of(tmp_path / "one"), losses_of(tmp_path / "two")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    # evaluation: 5 batches dealt to 2 processes, the same item-weighted mean, the same greedy answers
    val_one, val_two = _val(tmp_path / "one"), _val(tmp_path / "two")
    assert val_two["loss"] == pytest.approx(val_one["loss"], rel=1e-5)
    assert val_two["num_items"] == val_one["num_items"]  # answer tokens, each counted once
    assert val_two["qa/accuracy"] == val_one["qa/accuracy"]

    # the gathered weights load strictly into a one-process model and match its weights
    from safetensors.torch import load_model

    from tpo.registry import build_model

    missing, unexpected = load_model(build_model(model_config()), str(final / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_file(final / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)  # Adam amplifies rounding of tiny grads

    # killed before step 3 and resumed from the checkpoint of step 2: the uninterrupted 2-process run exactly
    resumed = losses_of(tmp_path / "cut")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in got:
        assert resumed[step] == got[step], step
    c = load_file(tmp_path / "cut" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(torch.equal(b[key], c[key]) for key in b)
    return facts, final
