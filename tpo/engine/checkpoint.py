"""Checkpoints: written atomically, the last K kept, found again on resume.

A checkpoint is a folder ``<work_dir>/checkpoints/step_<step>`` holding
accelerate's state (``Accelerator.save_state``: optimiser, registered objects
such as the scheduler, the gradient scaler, the RNG states of every process
and accelerate's micro-step counter, which a resumed run does not take over;
FSDP/DeepSpeed shards in their own formats),
the model's weights as ``model.safetensors`` under the model's own parameter
names (what ``tpo chat --checkpoint`` and ``load_from`` read), the
algorithm's other state (``algorithm_state.pt``: a loss's running
statistics, ...), what each process of the algorithm keeps for itself
(``process_state_<rank>.pt``, one file per process: PPO's rollouts still to
be trained on), and ``trainer_state.json`` (step, epoch, position in the
epoch, ...). Under FSDP and DeepSpeed the model is also gathered into
``model.safetensors`` (next to their own sharded files), so any run, of any
number of processes, can load it.

Atomicity: everything is written into ``.tmp-step_<step>``, every file and the
folder are fsynced, and only then is the folder renamed to ``step_<step>`` (a
rename within one folder is atomic on POSIX file systems). A crash before the
rename leaves a ``.tmp-*`` folder that is never read and is deleted by the
next save; the previous checkpoints stay intact. Old checkpoints are pruned
only after the new one is in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpo.data.schema import fsync_dir

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
ALGORITHM_STATE_FILE = "algorithm_state.pt"
PROCESS_STATE_FILE = "process_state_{rank}.pt"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path``, then every folder (deepest first)."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically: a temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_partial(root: str | os.PathLike) -> None:
    """Delete the ``.tmp-*`` folders that interrupted saves left behind."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-") or path.name.startswith(".old-"):
                shutil.rmtree(path, ignore_errors=True)


def set_aside_after(root: str | os.PathLike, step: int) -> Path | None:
    """Move the checkpoints after ``step`` (those of a run that a resume from ``step`` abandons) into
    ``root/abandoned-after-step_<step>[-<n>]/``, where neither ``--resume`` nor pruning looks: they
    would otherwise be the latest, pruned last and resumed by the next ``--resume``. Returns that
    folder, ``None`` when there were none."""
    root = Path(root)
    later = [path for at, path in list_checkpoints(root) if at > step]
    if not later:
        return None
    dest, n = root / f"abandoned-after-{checkpoint_name(step)}", 1
    while dest.exists():
        n += 1
        dest = root / f"abandoned-after-{checkpoint_name(step)}-{n}"
    dest.mkdir()
    for path in later:
        os.rename(path, dest / path.name)
    fsync_dir(root)
    return dest


def prune(root: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted."""
    if not keep_last:
        return []
    found = list_checkpoints(root)
    stale = [path for _, path in found[: max(0, len(found) - keep_last)]]
    for path in stale:
        shutil.rmtree(path)
    return stale


def save_checkpoint(accelerator, root: str | os.PathLike, step: int, state: dict[str, Any],
                    keep_last: int | None = None, process_state: Any = None) -> Path:
    """Save the whole training state for ``step`` atomically; every process
    calls this, each with its own ``process_state`` (``None``: nothing of its
    own). Returns the checkpoint folder."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if process_state is not None:
        torch.save(process_state, tmp / PROCESS_STATE_FILE.format(rank=accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run re-saving): swap it out
            old = root / f".old-{checkpoint_name(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete checkpoint: it has no {STATE_FILE} (a checkpoint folder is "
            "<work_dir>/checkpoints/step_<N>, written by `tpo train`)"
        )
    with open(state_file, encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimiser, scheduler, scaler and RNG states from ``path``;
    returns its trainer state."""
    state = read_state(path)
    accelerator.load_state(str(path))
    # load_state restores accelerate's micro-step counter, which decides when gradients synchronise.
    # Every checkpoint is at an optimiser-step boundary, and this run may accumulate over another
    # number of micro-batches (another micro-batch size or number of processes): count from 0.
    accelerator.step = 0
    return state


def load_process_state(path: str | os.PathLike, process_index: int, num_processes: int,
                       saved_processes: int) -> Any:
    """This process's own algorithm state from the checkpoint ``path``, or
    ``None`` when the checkpoint holds none; an error when it was written by
    another number of processes (that state cannot be dealt out again)."""
    path = Path(path)
    files = sorted(path.glob(PROCESS_STATE_FILE.format(rank="*")))
    if not files:
        return None
    if saved_processes != num_processes:
        raise ValueError(
            f"checkpoint {str(path)!r} holds the algorithm's per-process state of {saved_processes} process(es) "
            f"(e.g. PPO's rollouts still to be trained on), but this run has {num_processes}; resume it with "
            f"{saved_processes} process(es)"
        )
    own = path / PROCESS_STATE_FILE.format(rank=process_index)
    if not own.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete: {own.name} is missing")
    return torch.load(own, map_location="cpu", weights_only=True)


def _distinct_names(module: nn.Module) -> set[str]:
    """The state-dict names of ``module`` with tied tensors named once (the
    first name), as safetensors' ``save_model`` keeps them."""
    seen, names = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.add(name)
    return names


def write_model_files(algorithm: nn.Module, state_dict: dict[str, torch.Tensor], output_dir) -> None:
    """``model.safetensors`` (``algorithm.model``'s weights under its own
    names) and ``algorithm_state.pt`` (the rest) from a full state dict of the
    algorithm (FSDP: gathered on the main process)."""
    from safetensors.torch import save_file

    keep = _distinct_names(algorithm.model)
    weights = {k[len("model."):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if k.startswith("model.") and k[len("model."):] in keep}
    save_file(weights, os.path.join(output_dir, MODEL_FILE), metadata={"format": "pt"})
    extra = {k: v for k, v in state_dict.items() if not k.startswith("model.")}
    torch.save(extra, os.path.join(output_dir, ALGORITHM_STATE_FILE))


def register_model_hooks(accelerator, algorithm: nn.Module) -> None:
    """Make ``save_state``/``load_state`` write and read ``algorithm.model``'s
    weights as ``model.safetensors`` under the model's own names (plus the
    algorithm's other state in ``algorithm_state.pt``), rather than under the
    algorithm's ``model.`` prefix. FSDP and DeepSpeed save and load their own
    (sharded) files; ``model.safetensors`` is written next to them from the
    gathered weights."""
    from accelerate.utils import DistributedType

    def owns(wrapped) -> bool:
        return accelerator.unwrap_model(wrapped) is algorithm

    def save_hook(models, weights, output_dir):
        if len(weights) != len(models):  # FSDP / DeepSpeed: saved their own way
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                for m in models:
                    if owns(m):
                        full = accelerator.get_state_dict(m)  # FSDP: a collective, the full weights on process 0
                        if accelerator.is_main_process:
                            write_model_files(algorithm, full, output_dir)
            return
        for i in reversed(range(len(models))):
            if not owns(models[i]):
                continue
            if accelerator.is_main_process:
                from safetensors.torch import save_model

                save_model(algorithm.model, os.path.join(output_dir, MODEL_FILE))
                extra = {k: v for k, v in algorithm.state_dict().items() if not k.startswith("model.")}
                torch.save(extra, os.path.join(output_dir, ALGORITHM_STATE_FILE))
            weights.pop(i)

    def load_hook(models, input_dir):
        for m in list(models):
            if not owns(m):
                continue
            load_model_state(algorithm, input_dir)
            models.remove(m)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_model_state(algorithm: nn.Module, folder: str | os.PathLike) -> None:
    """Load ``model.safetensors`` (strictly) and ``algorithm_state.pt`` of a
    checkpoint folder into ``algorithm`` (and its ``model``)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    device = next(algorithm.model.parameters()).device
    missing, unexpected = load_model(algorithm.model, str(folder / MODEL_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {str(folder)!r} does not fit the model: missing {sorted(missing)[:8]}, unexpected "
            f"{sorted(unexpected)[:8]}; was it written with the same model config?"
        )
    extra_file = folder / ALGORITHM_STATE_FILE
    if extra_file.is_file():
        extra = torch.load(extra_file, map_location=device, weights_only=True)
        _, unexpected = algorithm.load_state_dict(extra, strict=False)
        if unexpected:
            raise KeyError(f"checkpoint {str(folder)!r}: algorithm state {sorted(unexpected)[:8]} fits no buffer")
