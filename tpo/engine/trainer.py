"""The training loop on accelerate.

Read :meth:`Trainer.fit` top to bottom: build (data first, then the model and
the algorithm), prepare with accelerate, maybe resume, then for each
optimiser step: take this process's micro-batches, run the algorithm's step
on each (gradients accumulated, normalised by the items of the whole global
batch), stop on a non-finite loss, clip, step (``updates_per_batch`` times
when the algorithm asks for several updates on each batch: PPO's epochs),
log, evaluate, checkpoint.

DDP, FSDP and DeepSpeed come from accelerate's own launch configs
(``accelerate launch --config_file ...``) or ``torchrun``; mixed precision from
``train.mixed_precision`` (or the launcher). On CPU processes (gloo), where
accelerate 1.15 falls back to DDP without a word, the trainer sets up FSDP2
(``fsdp_version: 2``) and DeepSpeed ZeRO-1/2 (its CPU accelerator) itself;
FSDP1 and ZeRO-3 are refused with the reason (see ``_accelerator``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from tpo.errors import CONFIG_ERRORS, mark_setup_error
from tpo.registry import build_algorithm, build_dataset, build_metric, build_model, load_config

from . import checkpoint as ckpt
from .config import validate
from .logger import MetricLogger, Progress
from .optim import apply_optim_settings, build_optimizer, build_scheduler, group_learning_rates, optim_settings
from .report import write_report
from .sampler import EvalSampler, StepBatchSampler

CONFIG_FILE = "config.json"


@contextlib.contextmanager
def _setup_errors():
    """Marks the errors of building what the config names before the first step (its data,
    resume checkpoint, model, weights, algorithm, collator): they name the config key, and
    ``tpo train`` prints them as one line instead of a traceback. Their type is kept."""
    try:
        yield
    except CONFIG_ERRORS as err:
        mark_setup_error(err)
        raise


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the
    samples of the batch and the last good checkpoint."""


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation) without disturbing the training's random
    streams (python, numpy, torch CPU and CUDA)."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _scalar_metrics(out: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in out.items()
            if torch.is_tensor(v) and v.dim() == 0 and k != "loss"}


def _dataset_signature(dataset) -> list:
    """Length and sample ids of a dataset, where they are cheap to get."""
    if dataset is None:
        return []
    ids = None
    if isinstance(dataset, (list, tuple)):
        ids = [item.get("id") if isinstance(item, Mapping) else None for item in dataset]
    elif hasattr(dataset, "samples"):
        ids = [getattr(sample, "id", None) for sample in dataset.samples]
    return [type(dataset).__name__, len(dataset), hashlib.sha256(repr(ids).encode()).hexdigest()]


def _fingerprint(cfg: Mapping[str, Any], train_ds, val_ds) -> str:
    """What determines the initial model and the data (for caches such as
    precomputed reference log-probs)."""
    keyed = {k: cfg.get(k) for k in ("model", "load_from")}
    keyed["data"] = cfg["data"]
    keyed["seed"] = cfg["train"]["seed"]
    keyed["datasets"] = [_dataset_signature(train_ds), _dataset_signature(val_ds)]
    for split in ("train", "val"):
        spec = cfg["data"].get(split) or {}
        path = spec.get("ann_file")
        if path and os.path.isfile(path):
            stat = os.stat(path)
            keyed[f"{split}_file"] = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_on_cpu(acc, plugin) -> None:
    """Turn on accelerate's own FSDP2 path for processes on CPU (gloo).

    accelerate 1.15 sets ``DistributedType.FSDP`` (and keeps the plugin) only
    when the processes run on an accelerator device (``AcceleratorState``
    switches MULTI_GPU, MULTI_XPU, ... to FSDP, never MULTI_CPU): on CPU it
    drops the FSDP config without a word and wraps the model in DDP. FSDP2's
    ``fully_shard`` itself runs on CPU over gloo, so complete the state the
    way accelerate does for a GPU; everything after (``prepare``, gradient
    sync, clipping, sharded ``save_state``/``load_state``) is accelerate's.
    FSDP1 does not run on CPU: accelerate's plugin asks for a GPU when
    ``sync_module_states`` (its default), and torch's FSDP1 rejects
    accelerate's ``device_id`` ``cpu:0`` for the compute device ``cpu``; the
    caller refuses it with a clear error.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = acc.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what a later AcceleratorState() reads


def is_sharded(acc) -> bool:
    """Whether the parameters are sharded across processes (FSDP): every
    process must then run the same forward passes."""
    from accelerate.utils import DistributedType

    return acc.num_processes > 1 and acc.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def gathered_parameters(acc, module):
    """The root FSDP2 unit's parameters gathered for calls that do not go
    through ``forward`` (evaluation calls the algorithm's methods): inner
    units gather their own when they run."""
    unshard = getattr(module, "unshard", None) if acc.is_fsdp2 else None
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        module.reshard()


class Trainer:
    """Trains ``algorithm(model)`` on ``data`` as a config says.

    Args:
        cfg: a config (dict, mmengine Config, or file path); checked in full
            before anything is built (see :mod:`tpo.engine.config`).
        cfg_options: dotted overrides (``--cfg-options``).
        work_dir: overrides ``cfg.work_dir``.
        resume: ``True`` resumes from the latest checkpoint of the work dir, a
            path from that checkpoint; an error when there is none. A new run
            (``False``) in a work dir that holds checkpoints is an error too.
        model, train_dataset, val_dataset, collate_fn: ready-made parts used
            instead of building them from the config (tests, notebooks).

    A script of its own under a launcher (torchrun, accelerate launch) ends with
    ``trainer.accelerator.end_training()``, as ``tpo train`` does: it destroys the process
    group, without which a process can abort at exit (gloo; pytorch/pytorch#190489).
    """

    def __init__(self, cfg, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None,
                 resume: bool | str | os.PathLike = False, *, model=None, train_dataset=None, val_dataset=None,
                 collate_fn: Callable | None = None):
        source = cfg if isinstance(cfg, (str, os.PathLike)) else None
        loaded = load_config(cfg, cfg_options)
        self.cfg = validate(loaded, source=source, cfg_options=cfg_options, datasets_given=train_dataset is not None,
                            collate_given=collate_fn is not None)
        if work_dir is not None:
            self.cfg["work_dir"] = str(work_dir)
        self.work_dir = Path(self.cfg["work_dir"])
        self.resume = resume
        self.model, self.train_dataset, self.val_dataset = model, train_dataset, val_dataset
        self.collate_fn = collate_fn
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ build
    def _find_unused_parameters(self) -> bool:
        """``train.find_unused_parameters``, or when None, whether the model has task heads: a TPO step
        whose batch lacks a task (or whose stage leaves a head's losses out) gives that head no gradient,
        which DDP refuses unless it looks for unused parameters."""
        given = self.cfg["train"]["find_unused_parameters"]
        if given is not None:
            return given
        from tpo.algorithms.base import registered_class
        from tpo.models.tpo_model import TPOModel
        from tpo.registry import MODELS

        if self.model is not None:
            return isinstance(self.model, TPOModel)
        model_cls = registered_class(MODELS, self.cfg["model"], "model", None)
        return isinstance(model_cls, type) and issubclass(model_cls, TPOModel)

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        train = self.cfg["train"]
        # without any accelerator device, say so: accelerate then runs torchrun's processes as MULTI_CPU (gloo)
        has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        no_device = not has_device
        kwargs = dict(cpu=train["cpu"] or no_device,
                      kwargs_handlers=[DistributedDataParallelKwargs(
                          find_unused_parameters=self._find_unused_parameters())])
        if train["mixed_precision"] is not None:
            kwargs["mixed_precision"] = train["mixed_precision"]
        if _env_flag("ACCELERATE_USE_DEEPSPEED") and no_device and not train["cpu"] and "LOCAL_RANK" in os.environ:
            # accelerate (<= 1.15) sets DeepSpeed up only with cpu=False, and then, finding no accelerator device,
            # no process-group backend: every process would call itself process 0 of 1. Name DeepSpeed's CPU
            # backend (gloo) for it.
            from accelerate.utils import InitProcessGroupKwargs

            kwargs["cpu"] = False
            kwargs["kwargs_handlers"].append(InitProcessGroupKwargs(backend="gloo"))
        fsdp = None
        if _env_flag("ACCELERATE_USE_FSDP"):  # `accelerate launch` with an FSDP config (or its FSDP_* variables)
            from accelerate.utils import FullyShardedDataParallelPlugin

            version = os.environ.get("FSDP_VERSION", "1")
            if kwargs["cpu"] and version != "2":
                raise ValueError(
                    f"FSDP on CPU: fsdp_version {version} (FSDP1) cannot run on CPU processes (accelerate's FSDP1 "
                    "plugin asks for a GPU to sync module states, torch's FSDP1 rejects the CPU device); set "
                    "`fsdp_version: 2` in the accelerate config (FSDP_VERSION=2)"
                )
            fsdp = kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()
        if not torch.distributed.is_initialized():
            # one process: let a second run in this process (a notebook, tests) choose its own settings
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()
        acc = Accelerator(**kwargs)
        if acc.distributed_type == DistributedType.MULTI_CPU:
            if fsdp is not None:
                _fsdp_on_cpu(acc, fsdp)
            elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
                raise ValueError(
                    "train.cpu: DeepSpeed was asked for (an `accelerate launch` DeepSpeed config), but train.cpu=True "
                    "makes accelerate train with DDP instead; set train.cpu=False (on a machine without a GPU "
                    "DeepSpeed then runs on its CPU accelerator)"
                )
        return acc

    def _batch_geometry(self, world: int) -> tuple[int, int]:
        """(micro-batch size per process, accumulation steps)."""
        train = self.cfg["train"]
        batch = train["batch_size"]
        micro = train["micro_batch_size"] or max(1, batch // world)
        if batch % (micro * world):
            if batch % world == 0:  # a smaller micro-batch fits: the largest that divides each process's share
                fix = f"train.micro_batch_size={max(d for d in range(1, micro + 1) if batch // world % d == 0)}"
            else:  # no micro-batch fits: the global batch must change (or the number of processes)
                fix = (f"train.batch_size={max(1, round(batch / (micro * world))) * micro * world}, or a number of "
                       f"processes that divides {batch}")
            raise ValueError(
                f"train.batch_size: {batch} samples per step must be a multiple of train.micro_batch_size "
                f"({micro}) x processes ({world}); e.g. {fix}"
            )
        return micro, batch // (micro * world)

    def _datasets(self):
        data = self.cfg["data"]
        train = self.train_dataset if self.train_dataset is not None else build_dataset(data["train"])
        val = self.val_dataset
        if val is None and data["val"] is not None:
            val = build_dataset(data["val"])
        return train, val

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from, or None for a new run: refused in a work dir that holds
        checkpoints (its final checkpoint would be pruned as older than theirs, and a later --resume
        would continue their run)."""
        latest = ckpt.latest_checkpoint(self.work_dir / "checkpoints")
        if not self.resume:
            if latest is not None:
                raise ValueError(
                    f"work_dir: {str(self.work_dir)!r} holds the checkpoints of an earlier run (the latest "
                    f"{latest.name}); pass --resume (resume=True) to continue it, or start a new run in another "
                    f"--work-dir or after removing {str(latest.parent)!r}"
                )
            return None
        if self.resume is True or self.resume == "auto":
            if latest is None:
                raise FileNotFoundError(
                    f"--resume: no checkpoint in {str(self.work_dir / 'checkpoints')!r}; start without --resume, or "
                    "give --work-dir of the run to continue"
                )
            return latest
        path = Path(self.resume)
        ckpt.read_state(path)  # a complete checkpoint, or a clear error
        return path

    def _check_resumable(self, path: Path, num_samples: int) -> None:
        """What must not change for a resumed run to continue exactly: the global batch, and the
        data order of the epoch it is in (``train.seed`` and the training set's length)."""
        state, train = ckpt.read_state(path), self.cfg["train"]
        saved = state.get("num_samples", num_samples)  # (checkpoints of earlier versions do not say)
        for key, before, now, what in [
            ("train.batch_size", state["global_batch_size"], train["batch_size"], "global batch"),
            ("train.seed", state["seed"], train["seed"], "seed (it orders the samples of every epoch)"),
            ("data.train", f"{saved} samples", f"{num_samples} samples",
             "training set (its length orders the samples of every epoch)"),
        ]:
            if before != now:
                raise ValueError(
                    f"{key}: {now}, but the checkpoint {str(path)!r} was trained with {before}; resuming needs "
                    f"the same {what}: set it back, or start a new run in another --work-dir"
                )

    # -------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        """Train; returns the final report (also in ``<work_dir>/report.json``)."""
        from accelerate.utils import DistributedType, set_seed

        cfg, train = self.cfg, self.cfg["train"]
        acc = self._accelerator()
        self.accelerator = acc
        world, rank = acc.num_processes, acc.process_index
        micro, accum = self._batch_geometry(world)
        acc.gradient_accumulation_steps = accum
        if acc.distributed_type == DistributedType.DEEPSPEED:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = micro
            ds["gradient_accumulation_steps"] = accum
            ds["train_batch_size"] = train["batch_size"]
            if acc.state.deepspeed_plugin.zero_stage == 3:
                raise ValueError(
                    "DeepSpeed ZeRO stage 3 is not supported: it gathers a parameter only while its own module's "
                    "forward runs, and tpo's models read weights outside it (the fused log-prob loss reads the LM "
                    "head's weight, timm encoders run through forward_intermediates), which ZeRO-3 does not gather "
                    "(on CPU its loss already differs from one process at step 1). Use zero_stage 1 or 2, or FSDP "
                    "(fsdp_version: 2), which shards the parameters too"
                )
            clip = train["grad_clip"] or 0.0  # DeepSpeed clips inside its step (0: never)
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = clip
            elif float(ds["gradient_clipping"]) != clip:
                raise ValueError(
                    f"train.grad_clip: {train['grad_clip']}, but the DeepSpeed config says gradient_clipping="
                    f"{ds['gradient_clipping']}; DeepSpeed clips by its own config, so make them agree (or set it "
                    "to 'auto' there)"
                )
        seed = train["seed"]

        # the work dir and data first: their errors come before any model is built
        with _setup_errors():
            resume_path = self._resume_path()
            train_ds, val_ds = self._datasets()
            if val_ds is None and cfg["evaluation"]["interval"]:  # (a config without data.val is refused earlier)
                raise ValueError(f"evaluation.interval: {cfg['evaluation']['interval']}, but there is no validation "
                                 "data; give data.val (or val_dataset=...), or set evaluation.interval=None")
            steps_per_epoch = len(train_ds) // train["batch_size"]
            if steps_per_epoch == 0:
                raise ValueError(
                    f"train.batch_size: {train['batch_size']} is larger than the training set ({len(train_ds)} "
                    f"samples of data.train); lower it or add data"
                )
            total = train["max_steps"] or train["max_epochs"] * steps_per_epoch
            if resume_path is not None:
                self._check_resumable(resume_path, len(train_ds))

        # model and algorithm (the same seed on every process: the same initial weights)
        set_seed(seed)
        with _setup_errors():
            model = self.model if self.model is not None else build_model(cfg["model"])
            if cfg["load_from"]:
                from tpo.models.utils import load_model_weights

                load_model_weights(model, cfg["load_from"])
            algo = build_algorithm(cfg["algorithm"], default_args={"model": model})
            collate = self.collate_fn or algo.build_collator(**cfg["data"]["collator"])
        eval_bs = cfg["evaluation"]["batch_size"] or micro
        from tpo.algorithms.base import SetupContext

        algo.to(acc.device)
        with acc.autocast():
            algo.setup(SetupContext(accelerator=acc, work_dir=str(self.work_dir), train_dataset=train_ds,
                                    val_dataset=val_ds, collate_fn=collate, batch_size=eval_bs,
                                    fingerprint=_fingerprint(cfg, train_ds, val_ds)))
        groups = algo.param_groups(cfg["optim"])
        optimizer = build_optimizer(groups, cfg["optim"])
        scheduler = build_scheduler(optimizer, cfg["schedule"], total)
        metrics = [build_metric(m) for m in cfg["evaluation"]["metrics"]]

        wrapped, optimizer = acc.prepare(algo, optimizer)
        if is_sharded(acc):
            # every forward is a collective: generation must take max_new_tokens steps on every process.
            # transformers' generate turns synced_gpus on for modules FSDP manages; FSDP1 marks them, FSDP2 not
            for module in algo.modules():
                module._is_fsdp_managed_module = True
        acc.register_for_checkpointing(scheduler)
        ckpt.register_model_hooks(acc, algo)
        ckpt_root = self.work_dir / "checkpoints"

        step, epoch, step_in_epoch = 0, 0, 0
        last_eval = last_save = None
        changed_optim: list[str] = []
        if resume_path is not None:
            configured = optim_settings(optimizer, scheduler)
            state = ckpt.load_checkpoint(acc, resume_path)
            step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            own = ckpt.load_process_state(resume_path, rank, world, state.get("num_processes", 1))
            if own is not None:
                algo.load_process_state(own)
            # this run's optimiser settings and schedule (max_steps may have grown since the save), not the saved
            changed_optim = apply_optim_settings(optimizer, scheduler, configured)
            # the checkpoint is this step's: not saved again, nor its validation run again (a finished run)
            last_save, last_eval = step, (step if state.get("evaluated") else None)
        last_ckpt = str(resume_path) if resume_path is not None else None

        main = acc.is_main_process
        if main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(ckpt_root)
            abandoned = None if resume_path is None else ckpt.set_aside_after(ckpt_root, step)
            if abandoned is not None:
                print(f"tpo train: resuming from step {step}: the later checkpoints of the run it abandons are "
                      f"moved to {str(abandoned)!r}", file=sys.stderr, flush=True)
            ckpt.write_json(self.work_dir / CONFIG_FILE, {k: v for k, v in cfg.items()})
        logger = MetricLogger(self.work_dir, enabled=main, resume_step=step if resume_path else None,
                              tensorboard=train["tensorboard"])
        progress = Progress(total, initial=step, enabled=main and train["progress_bar"])
        if main:
            progress.write(self._summary(algo, groups, world, micro, accum, total, steps_per_epoch, resume_path))
            if changed_optim:  # said with or without a progress bar
                print("tpo train: resuming with this config's optimiser settings, not the checkpoint's: "
                      + "; ".join(changed_optim), file=sys.stderr, flush=True)

        sampler = StepBatchSampler(len(train_ds), micro, accum, world, rank, seed)
        ckpt_cfg, eval_cfg = cfg["checkpoint"], cfg["evaluation"]
        started, start_step = time.time(), step

        def save(at: int) -> str:
            state = {"step": at, "epoch": epoch, "step_in_epoch": step_in_epoch, "total_steps": total,
                     "steps_per_epoch": steps_per_epoch, "global_batch_size": train["batch_size"],
                     "micro_batch_size": micro, "grad_accum": accum, "num_processes": world, "seed": seed,
                     "num_samples": len(train_ds), "samples_seen": at * train["batch_size"],
                     "evaluated": last_eval == at, "time": time.time()}
            return str(ckpt.save_checkpoint(acc, ckpt_root, at, state, ckpt_cfg["keep_last"],
                                            process_state=algo.process_state()))

        try:
            while step < total:
                sampler.set_epoch(epoch, step_in_epoch)
                loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                                    num_workers=cfg["data"]["num_workers"],
                                    generator=torch.Generator().manual_seed(seed * 100003 + epoch))
                batches = iter(loader)
                while step_in_epoch < steps_per_epoch and step < total:
                    tic = time.perf_counter()
                    micro_batches = [next(batches) for _ in range(accum)]
                    algo.on_step(step, total)
                    record = self._train_step(acc, wrapped, algo, optimizer, scheduler, micro_batches,
                                              step, epoch, last_ckpt)
                    step += 1
                    step_in_epoch += 1
                    end_of_epoch = step_in_epoch == steps_per_epoch
                    if end_of_epoch:  # the position of the next step: a checkpoint resumes from there
                        epoch, step_in_epoch = epoch + 1, 0
                    seconds = time.perf_counter() - tic
                    record.update(epoch=step / steps_per_epoch, step_time=seconds,
                                  samples_per_s=train["batch_size"] / seconds)
                    progress.update(record["loss"], record.get("lr/default", next(
                        (v for k, v in record.items() if k.startswith("lr/")), 0.0)), record["samples_per_s"])
                    if step % train["log_interval"] == 0 or step == total:
                        self.history.append(logger.log(step, record))
                    # the last step's validation comes before its checkpoint, which records it
                    at_end = eval_cfg["at_end"] and step == total
                    if val_ds is not None and (at_end or eval_cfg["interval"] and step % eval_cfg["interval"] == 0):
                        self.history.append(logger.log(step, self.evaluate(acc, algo, val_ds, collate, metrics,
                                                                            eval_bs, eval_cfg), "val"))
                        last_eval = step
                    if ckpt_cfg["interval"] and step % ckpt_cfg["interval"] == 0:
                        last_ckpt, last_save = save(step), step
                    if end_of_epoch or step >= total:
                        break

            # (a run resumed after it ended, before its final validation)
            if val_ds is not None and eval_cfg["at_end"] and last_eval != step:
                self.history.append(logger.log(step, self.evaluate(acc, algo, val_ds, collate, metrics, eval_bs,
                                                                    eval_cfg), "val"))
                last_eval = step
            if ckpt_cfg["save_final"] and last_save != step:
                last_ckpt = save(step)
        finally:
            progress.close()
            logger.close()

        report = {}
        if main:
            from tpo.models.utils import count_parameters

            total_params, trainable = count_parameters(algo.model)
            report = write_report(self.work_dir, {
                "config": cfg["source"], "work_dir": str(self.work_dir),
                "algorithm": cfg["algorithm"]["type"], "model": cfg["model"]["type"],
                "steps": step, "total_steps": total, "epochs": step / steps_per_epoch,
                "resumed_from": None if resume_path is None else str(resume_path),
                "num_processes": world, "global_batch_size": train["batch_size"], "micro_batch_size": micro,
                "grad_accum": accum, "mixed_precision": str(acc.mixed_precision),
                "parameters": {"total": total_params, "trainable": trainable},
                "wall_time_s": round(time.time() - started, 3),
                "steps_per_s": round((step - start_step) / max(time.time() - started, 1e-9), 4),
                "final_checkpoint": last_ckpt,
            })
        acc.wait_for_everyone()
        return report

    # ------------------------------------------------------------ one step
    def _train_step(self, acc, wrapped, algo, optimizer, scheduler, micro_batches, step, epoch, last_ckpt):
        """One engine step: ``algo.updates_per_batch`` optimiser updates over
        this step's micro-batches (``on_update(k, n)`` before each), then one
        scheduler step. The record is the mean of the updates' records."""
        updates = algo.updates_per_batch
        if not isinstance(updates, int) or updates < 1:
            raise ValueError(f"{type(algo).__name__}.updates_per_batch must be an int >= 1, got {updates!r}")
        counts = [int(algo.num_items(b)) for b in micro_batches]
        global_items = int(acc.reduce(torch.tensor(sum(counts), device=acc.device), "sum").item())
        records = []
        for k in range(updates):
            algo.on_update(k, updates)
            records.append(self._update(acc, wrapped, optimizer, micro_batches, counts, global_items, step, epoch,
                                        last_ckpt, (k, updates)))
        record: dict[str, Any] = {key: sum(r[key] for r in records) / updates for key in records[0]}
        record["num_items"] = global_items
        record.update(group_learning_rates(optimizer))  # the rates this step's updates used
        scheduler.step()
        return record

    def _update(self, acc, wrapped, optimizer, micro_batches, counts, global_items, step, epoch, last_ckpt,
                update) -> dict[str, float]:
        """Forward and backward over the micro-batches, gradients normalised by
        the items of the global batch; stop on a non-finite loss; clip, step."""
        from accelerate.utils import gather_object, send_to_device

        scale_base = acc.num_processes * acc.gradient_accumulation_steps / max(global_items, 1)
        sums: dict[str, list[float]] = {}
        bad = None
        for batch, n in zip(micro_batches, counts):
            batch = send_to_device(batch, acc.device)  # one micro-batch on the device at a time
            with acc.accumulate(wrapped):
                out = wrapped(batch)
                loss = out["loss"]
                value = float(loss.detach().float())
                if not math.isfinite(value) and bad is None:
                    bad = {"value": value, "ids": list(dict.fromkeys(batch.get("ids") or []))}  # pairs: once
                acc.backward(loss * (n * scale_base))
            for key, v in [("loss", loss.detach().float()), *_scalar_metrics(out).items()]:
                entry = sums.setdefault(key, [0.0, 0.0])
                entry[0] += float(v) * n
                entry[1] += n
        if not acc.sync_gradients:
            raise RuntimeError("internal error: the last micro-batch of a step did not synchronise gradients")
        gathered = gather_object([{"sums": sums, "bad": bad}]) if acc.num_processes > 1 else [{"sums": sums,
                                                                                                  "bad": bad}]
        failures = [(r, g["bad"]) for r, g in enumerate(gathered) if g["bad"] is not None]
        if failures:
            optimizer.zero_grad(set_to_none=True)
            rank, info = failures[0]
            where = f" on process {rank}" if acc.num_processes > 1 else ""
            k, n = update
            which = f" (update {k + 1} of {n} on this batch; {k} applied)" if n > 1 else ""
            raise NonFiniteLossError(
                f"step {step + 1} (epoch {epoch}){which}: the loss is {info['value']}{where}; the batch holds the "
                f"samples {info['ids']}. The run stops before this update. Last good checkpoint: "
                f"{last_ckpt or 'none (no checkpoint was written yet)'}"
                + (" — resume from it with `tpo train CONFIG --resume` (lower optim.lr, set train.grad_clip, or "
                   "drop those samples first)." if last_ckpt else ".")
            )
        merged: dict[str, list[float]] = {}
        for g in gathered:
            for key, (s, w) in g["sums"].items():
                entry = merged.setdefault(key, [0.0, 0.0])
                entry[0] += s
                entry[1] += w
        record = {k: (s / w if w else 0.0) for k, (s, w) in merged.items()}
        clip = self.cfg["train"]["grad_clip"]
        if clip is not None:
            norm = acc.clip_grad_norm_(wrapped.parameters(), clip)
            if norm is not None:
                record["grad_norm"] = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return record

    # ------------------------------------------------------------ evaluation
    def evaluate(self, acc, algo, dataset, collate, metrics, batch_size, eval_cfg) -> dict[str, Any]:
        """Validation: the algorithm's metrics (item-weighted over the whole set)
        and the configured METRICS over the data samples it returns."""
        from accelerate.utils import gather_object, send_to_device

        predict = bool(metrics)
        # sharded parameters: every process runs the same number of batches (the padding ones are not counted)
        sampler = EvalSampler(len(dataset), batch_size, acc.num_processes, acc.process_index,
                              eval_cfg["max_batches"], even=is_sharded(acc))

        def collate_with_items(items):
            batch = collate(items)
            if predict:
                batch["items"] = items
            return batch

        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_with_items, num_workers=0,
                            generator=torch.Generator().manual_seed(0))
        sums: dict[str, list[float]] = {}
        samples: list[dict] = []
        was_training = algo.training
        algo.eval()
        with preserved_rng(), torch.no_grad(), acc.autocast(), gathered_parameters(acc, algo):
            for k, batch in enumerate(loader):
                items = batch.pop("items", None)
                batch = send_to_device(batch, acc.device)
                if items is not None:
                    batch["items"] = items
                out = algo.evaluate(batch, predict=predict)
                if k >= sampler.num_own_batches:  # a padding batch of an even split
                    continue
                n = int(out["num_items"])
                for key, value in out["metrics"].items():
                    entry = sums.setdefault(key, [0.0, 0.0])
                    entry[0] += float(value) * n
                    entry[1] += n
                samples.extend(out.get("samples") or [])
        algo.train(was_training)
        gathered = gather_object([{"sums": sums, "samples": samples}]) if acc.num_processes > 1 else [
            {"sums": sums, "samples": samples}]
        merged: dict[str, list[float]] = {}
        all_samples: list[dict] = []
        for g in gathered:
            all_samples.extend(g["samples"])
            for key, (s, w) in g["sums"].items():
                entry = merged.setdefault(key, [0.0, 0.0])
                entry[0] += s
                entry[1] += w
        result = {k: (s / w if w else 0.0) for k, (s, w) in merged.items()}
        result["num_items"] = int(next(iter(merged.values()), [0, 0])[1])
        if all_samples:
            for metric in metrics:
                metric.results.clear()
                metric.process(None, all_samples)
                values = metric.compute_metrics(metric.results)
                metric.results.clear()
                prefix = metric.prefix or ""
                result.update({(f"{prefix}/{k}" if prefix else k): v for k, v in values.items()})
        return result

    # ---------------------------------------------------------------- info
    def _summary(self, algo, groups, world, micro, accum, total, steps_per_epoch, resume_path) -> str:
        lines = [
            f"tpo train: {self.cfg['algorithm']['type']} on {self.cfg['model']['type']} -> {self.work_dir}",
            (f"  {world} process(es) x micro-batch {micro} x accumulation {accum} = global batch "
             f"{self.cfg['train']['batch_size']}; {total} steps ({steps_per_epoch} per epoch)"),
        ]
        for g in groups:
            count = sum(p.numel() for p in g["params"])
            lines.append(f"  group {g['name']:<24} lr {g['lr']:<10.3g} wd {g['weight_decay']:<6g} "
                         f"{len(g['params'])} tensors, {count:,} parameters")
        if resume_path is not None:
            lines.append(f"  resuming from {resume_path}")
        return "\n".join(lines)


def train(cfg, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None,
          resume: bool | str = False, **parts) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it; returns the report."""
    return Trainer(cfg, cfg_options=cfg_options, work_dir=work_dir, resume=resume, **parts).fit()
