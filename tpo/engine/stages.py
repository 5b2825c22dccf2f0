"""Staged training (TPO's recipe): ``stages=[dict(name=..., <overrides>), ...]``
in a config runs one training per stage, each a full ``tpo train`` run in
``<work_dir>/<i>_<name>`` that starts from the previous stage's final weights.

A stage's dict is merged into the rest of the config (dicts merge key by key,
anything else is replaced), so a stage names only what changes: its
algorithm's ``losses`` and ``trainable`` parameters, its data mix, its
learning rates, its number of steps. ``--cfg-options`` edit the config the
stages merge into; an option that a stage sets itself is refused (set it per
stage: ``stages.<i>.<key>=...``). The first stage starts from its
``load_from`` (its own or the config's). A finished stage (its ``report.json``
written) is not run again; ``resume`` continues the unfinished one from its
latest checkpoint, so an interrupted recipe resumes where it stopped. A
finished stage whose config has changed since (in anything but where it logs,
saves and evaluates) is refused before any training, naming what changed.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from tpo.registry import load_config

from .checkpoint import latest_checkpoint
from .report import REPORT_FILE


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: dicts key by key (unless the
    override's dict says ``_delete_=True``: then it replaces), the rest replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and value.get("_delete_"):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_delete_"}
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def training_keys(cfg: Mapping[str, Any], source: str | None,
                  cfg_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` without the names a ``_base_`` file brought in that are not
    training keys (its ``vision_encoder = ...``, say); the unknown names of the
    file itself and of ``cfg_options`` stay, so that the config check reports them."""
    from .config import TOP_LEVEL, own_keys

    own = own_keys(source) | {k.split(".")[0] for k in cfg_options or {}} if source else set(cfg)
    return {k: v for k, v in cfg.items() if k in TOP_LEVEL or k in own or k == "stages"}


def stage_configs(cfg: Mapping[str, Any], work_dir: str | os.PathLike) -> list[tuple[str, Path, dict]]:
    """``(name, work_dir, config)`` of each stage; a later stage's ``load_from`` is set when it runs."""
    stages = cfg.get("stages")
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError("stages: must be a non-empty list of dicts, each with a 'name' and the keys it overrides")
    base = {k: v for k, v in cfg.items() if k != "stages"}
    out, names = [], set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or not isinstance(stage.get("name"), str):
            raise ValueError(f"stages[{i}]: must be a dict with a 'name' (str), got {stage!r}")
        name = stage["name"]
        if name in names:
            raise ValueError(f"stages[{i}].name: {name!r} is used twice; give each stage its own name")
        names.add(name)
        if "load_from" in stage and i > 0:
            raise ValueError(f"stages[{i}].load_from: a later stage starts from the previous stage's weights")
        overrides = {k: v for k, v in stage.items() if k != "name"}
        out.append((name, Path(work_dir) / f"{i + 1}_{name}", merge(base, overrides)))
    return out


# What does not change the weights a stage trains: where it writes, how often it logs, saves and
# evaluates, how it is launched. A finished stage whose config differs elsewhere is refused.
_NOT_TRAINING = ("work_dir", "source", "checkpoint", "evaluation", "data.val", "data.num_workers", "train.cpu",
                 "train.find_unused_parameters", "train.log_interval", "train.micro_batch_size",
                 "train.progress_bar", "train.tensorboard")


def _changed_since_finished(stage_dir: Path, cfg: Mapping[str, Any], first: bool) -> list[tuple[str, Any, Any]]:
    """How ``cfg`` differs from the config a finished stage trained with (nothing for an
    unfinished stage: resuming it with other settings is the user's call, as with --resume)."""
    from .config import as_json, differences
    from .trainer import CONFIG_FILE

    stored = stage_dir / CONFIG_FILE
    if not (stage_dir / REPORT_FILE).is_file() or not stored.is_file():
        return []
    now = as_json(cfg)
    ignored = _NOT_TRAINING if first else (*_NOT_TRAINING, "load_from")  # later stages: the previous stage's
    return [d for d in differences(json.loads(stored.read_text()), now)
            if not any(d[0] == k or d[0].startswith(k + ".") for k in ignored)]


def _overriding_key(stage: Mapping[str, Any], parts: list[str]) -> str | None:
    """The key of a stage's dict that replaces the value at the dotted key ``parts`` (the value
    itself, or a dict holding it that the stage replaces whole), or None where the stage leaves it."""
    head, *rest = parts
    if head not in stage:
        return None
    value = stage[head]
    if not rest or not isinstance(value, Mapping) or value.get("_delete_"):
        return head
    inner = _overriding_key(value, rest)
    return None if inner is None else f"{head}.{inner}"


def _refuse_overridden_options(stages: list[Mapping[str, Any]], cfg_options: Mapping[str, Any] | None) -> None:
    """--cfg-options edit the config the stages are merged into, where a stage's own value wins. An
    option that a stage overrides is refused rather than applied over the stage: a recipe's stages
    differ on purpose (their steps, learning rates, data; a stage may replace data.train whole, where
    the option's key does not even fit), and which of them a user meant to flatten cannot be told.
    The error names the per-stage keys (``stages.<i>.<key>``, as the experiment configs set them)."""
    for key in cfg_options or {}:
        if key.split(".")[0] == "stages":
            continue
        hits = [(i, stage["name"], where) for i, stage in enumerate(stages)
                if (where := _overriding_key(stage, key.split("."))) is not None]
        if hits:
            setters = ", ".join(f"stage {name!r} sets stages.{i}.{where}" for i, name, where in hits)
            raise ValueError(
                f"--cfg-options {key}: {setters}"
                f", and a stage's own value wins over the option; set it per stage instead, at or inside those keys "
                f"(e.g. --cfg-options stages.{hits[0][0]}.{hits[0][2]}=...)"
            )


def check_stages(config, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None
                 ) -> tuple[dict[str, Any], Path, list[tuple[str, Path, dict[str, Any]]]]:
    """Check every stage's config (nothing is built or trained); returns the
    recipe's config, its work dir and the plan ``[(name, stage dir, config)]``.
    Errors name the stage."""
    source = str(config) if isinstance(config, (str, os.PathLike)) else None
    cfg = load_config(config, cfg_options).to_dict()
    stem = Path(str(config)).stem if isinstance(config, (str, os.PathLike)) else "stages"
    root = Path(work_dir or cfg.get("work_dir") or Path("work_dirs") / stem)
    return check_stage_plan(cfg, root, source, cfg_options)


def check_stage_plan(cfg: Mapping[str, Any], root: Path, source: str | None = None,
                     cfg_options: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, Any], Path, list[tuple[str, Path, dict[str, Any]]]]:
    """:func:`check_stages` of a config already loaded (from the file ``source``, with
    ``cfg_options`` applied), its stages in ``root``."""
    from .config import validate

    cfg = training_keys(cfg, source, cfg_options)
    plan = stage_configs(cfg, root)
    _refuse_overridden_options(cfg["stages"], cfg_options)
    for i, (name, stage_dir, stage_cfg) in enumerate(plan):  # every config error before any training
        try:
            checked = validate(load_config(dict(stage_cfg, work_dir=str(stage_dir))), source=source,
                               cfg_options=cfg_options)
        except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
            raise type(err)(f"stage {name!r}: {err.args[0] if err.args else err}") from None
        changed = _changed_since_finished(stage_dir, checked, first=i == 0)
        if changed:
            from .config import describe_differences

            raise ValueError(
                f"stage {name!r}: finished in {str(stage_dir)!r} with another config "
                f"({describe_differences(changed)}), "
                f"so it would not train again and the stages after it would start from its old weights; delete "
                f"{str(stage_dir)!r} and the stages after it to train them again, or use another --work-dir"
            )
    return cfg, root, plan


def run_stages(config, cfg_options: Mapping[str, Any] | None = None, work_dir: str | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Run every stage of ``config`` in order; returns ``{"stages": [report,
    ...], "final_checkpoint": ...}`` (also ``<work_dir>/stages.json``).

    Every stage's config is checked before the first one trains."""
    from .trainer import Trainer

    _, root, plan = check_stages(config, cfg_options, work_dir)
    previous, reports = None, []
    for i, (name, stage_dir, stage_cfg) in enumerate(plan):
        report_file = stage_dir / REPORT_FILE
        if report_file.is_file():
            report = json.loads(report_file.read_text())
        else:
            if i > 0:  # the first stage starts from its load_from (its own, or the recipe's)
                stage_cfg = dict(stage_cfg, load_from=previous)
            stage_cfg = dict(stage_cfg, work_dir=str(stage_dir))
            has_ckpt = latest_checkpoint(stage_dir / "checkpoints") is not None
            stage_cfg = {k: v for k, v in stage_cfg.items() if not k.startswith("_")}
            report = Trainer(stage_cfg, resume=bool(resume and has_ckpt)).fit()
            if not report and report_file.is_file():  # another process than the main one: the main one wrote it
                report = json.loads(report_file.read_text())
        if not report.get("final_checkpoint"):
            raise RuntimeError(f"stage {name!r} finished without a final checkpoint; set checkpoint.save_final=True")
        previous = report["final_checkpoint"]
        reports.append({"name": name, "work_dir": str(stage_dir), **report})
    summary = {"stages": reports, "final_checkpoint": previous}
    from accelerate import PartialState

    from .checkpoint import write_json

    if PartialState().is_main_process:  # one writer when several processes run the recipe
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / "stages.json", summary)
    return summary
