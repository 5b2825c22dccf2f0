"""The training config: its sections, their keys and defaults, and the checks
run before anything is built (unknown keys, wrong types, bad values, missing
data files), each error naming the config key.

Top-level keys of a training config::

    work_dir   = "work_dirs/<name>"        # where checkpoints, metrics and the report go
    load_from  = None                      # a checkpoint folder (or .safetensors) whose model weights start the run
    model      = dict(type="MultimodalLLM", ...)            # tpo.registry.MODELS
    algorithm  = dict(type="SFT" | "DPO" | ..., ...)        # tpo.registry.ALGORITHMS; keys: its arguments
    data       = dict(train=dict(type="SampleDataset", ann_file=...), val=None | dict(...),
                      collator=dict(max_length=...), num_workers=0)
    train      = dict(batch_size=..., micro_batch_size=None, max_steps=None | max_epochs=None, seed=0,
                      grad_clip=1.0, mixed_precision=None, log_interval=1, progress_bar=True,
                      tensorboard=True, find_unused_parameters=None, cpu=False)
                     # find_unused_parameters (DDP): None = on for models with task heads (a step whose
                     # batch lacks a task, or whose losses leave a head out, gives that head no gradient)
    optim      = dict(type="AdamW", lr=..., weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                      no_decay=["bias", "norm"], param_groups=dict(projector=dict(lr=...), ...), fused=None)
    schedule   = dict(type="cosine" | "linear" | "constant", warmup_steps=0, warmup_ratio=0.0, min_lr_ratio=0.0)
    checkpoint = dict(interval=None, keep_last=2, save_final=True)
    evaluation = dict(interval=None, metrics=[dict(type=...)], batch_size=None, max_batches=None, at_end=True)

Other top-level keys may come from ``_base_`` files (model parts such as
``llm`` or ``tasks`` reused through ``{{_base_.llm}}``); a key set in the config
file itself or through ``--cfg-options`` that is not a section is an error, as
is any key one typo away from a section name (the only check on the top-level
keys of a config given as a dict). Keys starting with ``_`` are private.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from tpo.algorithms.base import (
    GROUP_PATTERNS,
    ConfigKeyError,
    check_arguments,
    check_component,
    registered_class,
)

REQUIRED = object()
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
SCHEDULES = ("cosine", "linear", "constant")



def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v) -> str | None:
    return None if _is_int(v) and v > 0 else "must be a positive integer"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else check(v)


def _non_negative(v) -> str | None:
    return None if _is_number(v) and v >= 0 else "must be a number >= 0"


def _fraction(v) -> str | None:
    return None if _is_number(v) and 0 <= v <= 1 else "must be a number in [0, 1]"


def _choice(options) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}"


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def _dict(v) -> str | None:
    return None if isinstance(v, Mapping) else "must be a dict"


def _str(v) -> str | None:
    return None if isinstance(v, (str, os.PathLike)) else "must be a string"


def _betas(v) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
    return None if ok else "must be two numbers in [0, 1), e.g. (0.9, 0.999)"


def _str_list(v) -> str | None:
    ok = isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)
    return None if ok else "must be a list of strings"


def _component(v) -> str | None:
    return None if isinstance(v, Mapping) and "type" in v else "must be a dict with a 'type' key"


def _optional_component(v) -> str | None:
    return None if v is None else _component(v)


def _metric_list(v) -> str | None:
    ok = isinstance(v, (list, tuple)) and all(isinstance(m, Mapping) and "type" in m for m in v)
    return None if ok else "must be a list of metric configs, each a dict with a 'type' (tpo.registry.METRICS)"


# section -> key -> (default, check)
SCHEMA: dict[str, dict[str, tuple[Any, Callable[[Any], str | None]]]] = {
    "train": {
        "batch_size": (REQUIRED, _positive_int),
        "micro_batch_size": (None, _optional(_positive_int)),
        "max_steps": (None, _optional(_positive_int)),
        "max_epochs": (None, _optional(_positive_int)),
        "seed": (0, lambda v: None if _is_int(v) and v >= 0 else "must be an integer >= 0"),
        "grad_clip": (1.0, _optional(lambda v: None if _is_number(v) and v > 0 else "must be a number > 0 or None")),
        "mixed_precision": (None, _optional(_choice(MIXED_PRECISION))),
        "log_interval": (1, _positive_int),
        "progress_bar": (True, _bool),
        "tensorboard": (True, _bool),
        "find_unused_parameters": (None, _optional(_bool)),
        "cpu": (False, _bool),
    },
    "optim": {
        "type": ("AdamW", _choice(("AdamW",))),
        "lr": (REQUIRED, lambda v: None if _is_number(v) and v > 0 else "must be a number > 0"),
        "weight_decay": (0.0, _non_negative),
        "betas": ((0.9, 0.999), _betas),
        "eps": (1e-8, lambda v: None if _is_number(v) and v > 0 else "must be a number > 0"),
        "no_decay": (["bias", "norm"], _str_list),
        "param_groups": ({}, _dict),
        "fused": (None, _optional(_bool)),
    },
    "schedule": {
        "type": ("cosine", _choice(SCHEDULES)),
        "warmup_steps": (0, lambda v: None if _is_int(v) and v >= 0 else "must be an integer >= 0"),
        "warmup_ratio": (0.0, _fraction),
        "min_lr_ratio": (0.0, _fraction),
    },
    "checkpoint": {
        "interval": (None, _optional(_positive_int)),
        "keep_last": (2, _optional(_positive_int)),
        "save_final": (True, _bool),
    },
    "evaluation": {
        "interval": (None, _optional(_positive_int)),
        "metrics": ([], _metric_list),
        "batch_size": (None, _optional(_positive_int)),
        "max_batches": (None, _optional(_positive_int)),
        "at_end": (True, _bool),
    },
    "data": {
        "train": (REQUIRED, _component),
        "val": (None, _optional_component),
        "collator": ({}, _dict),
        "num_workers": (0, lambda v: None if _is_int(v) and v >= 0 else "must be an integer >= 0"),
    },
}
TOP_LEVEL = ("work_dir", "load_from", "model", "algorithm", *SCHEMA)
OPTIONAL_SECTIONS = ("optim", "schedule", "checkpoint", "evaluation")


def differences(before: Any, now: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, now)`` for every leaf where two configs (plain dicts) differ."""
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        out = []
        for k in sorted(set(before) | set(now), key=str):
            out += differences(before.get(k), now.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if before == now else [(key or "value", before, now)]


def as_json(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, other objects as strings, keys sorted)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def describe_differences(diffs: list[tuple[str, Any, Any]], most: int = 4) -> str:
    text = "; ".join(f"{k}: {b!r} before, {n!r} now" for k, b, n in diffs[:most])
    return text + ("; ..." if len(diffs) > most else "")


def _where(source: str | None) -> str:
    return f" [config {source}]" if source else ""


def _unknown(key: str, name: str, known, source: str | None) -> ConfigKeyError:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigKeyError(f"{key}: unknown key{hint} Known keys: {', '.join(known)}{_where(source)}")


def own_keys(path: str | os.PathLike | None) -> set[str] | None:
    """The top-level names a config file assigns itself (not via ``_base_``)."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix == ".py":
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
        return names - {"_base_"}
    if path.suffix == ".json":
        return set(json.loads(path.read_text(encoding="utf-8"))) - {"_base_"}
    import yaml

    return set(yaml.safe_load(path.read_text(encoding="utf-8")) or {}) - {"_base_"}


def _check_data_files(value: Any, key: str, source: str | None) -> None:
    """The ``ann_file`` of a dataset config and of every dataset config inside it (a
    MixedDataset's ``datasets``), each named by its key as --cfg-options spells it."""
    if isinstance(value, Mapping):
        _check_file(value, "ann_file", key, source)
        items = value.items()
    else:
        items = enumerate(value) if isinstance(value, (list, tuple)) else ()
    for name, inner in items:
        _check_data_files(inner, f"{key}.{name}", source)


def _check_file(cfg: Mapping, field: str, key: str, source: str | None) -> None:
    value = cfg.get(field)
    if value is None:
        return
    if not Path(value).expanduser().exists():
        raise FileNotFoundError(
            f"{key}.{field}: {str(value)!r} does not exist (looked from {os.getcwd()!r}). Write the synthetic "
            f"benchmark with `tpo data synth --out work_dirs/synth --num 64`, or point the key at your data with "
            f"--cfg-options {key}.{field}=PATH{_where(source)}"
        )


def resolve_sections(cfg: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Fill in the defaults of every section and check each key's value."""
    out: dict[str, Any] = {}
    for section, fields in SCHEMA.items():
        given = cfg.get(section)
        if given is None:
            if section in OPTIONAL_SECTIONS:
                given = {}
            else:
                raise ConfigKeyError(f"{section}: missing section; add `{section} = dict(...)`{_where(source)}")
        if not isinstance(given, Mapping):
            raise TypeError(f"{section}: must be a dict, got {type(given).__name__}{_where(source)}")
        for name in given:
            if name not in fields:
                raise _unknown(f"{section}.{name}", name, fields, source)
        resolved = {}
        for name, (default, check) in fields.items():
            if name in given:
                value = given[name]
            elif default is REQUIRED:
                raise ConfigKeyError(f"{section}.{name}: missing, and it has no default{_where(source)}")
            else:
                value = default
            problem = check(value)
            if problem:
                raise ValueError(f"{section}.{name}: {problem}, got {value!r}{_where(source)}")
            resolved[name] = value
        out[section] = resolved
    return out


def validate(cfg, source: str | os.PathLike | None = None, cfg_options: Mapping[str, Any] | None = None,
             datasets_given: bool = False, collate_given: bool = False) -> dict[str, Any]:
    """Check a whole training config before anything is built; returns it as a
    plain dict with every section's defaults filled in.

    Raises KeyError (unknown or missing keys, unregistered types), TypeError
    (wrong types, unexpected arguments), ValueError (bad values) or
    FileNotFoundError (missing data or checkpoint files), each naming the key.
    ``datasets_given``/``collate_given``: the caller brings its own datasets /
    collate function, so ``data.train`` may be absent / the collator is not checked.
    """
    from tpo.registry import ALGORITHMS, DATASETS, METRICS, MODELS

    src = None if source is None else str(source)
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}

    # top-level keys
    # a config given as a dict may hold model parts too: there only typos of section names are errors
    own = (own_keys(source) if source is not None else set()) | {k.split(".")[0] for k in (cfg_options or {})}
    for name in raw:
        if name in TOP_LEVEL:
            continue
        near = difflib.get_close_matches(name, TOP_LEVEL, n=1, cutoff=0.75)
        if name in own or near:
            raise _unknown(name, name, TOP_LEVEL, src)

    if datasets_given:
        raw.setdefault("data", {})
        raw["data"] = {"train": {"type": "<given>"}, **raw["data"]}
    out = resolve_sections(raw, src)
    train = out["train"]
    if (train["max_steps"] is None) == (train["max_epochs"] is None):
        raise ValueError(f"train.max_steps / train.max_epochs: set exactly one of them{_where(src)}")
    micro = train["micro_batch_size"]
    if micro is not None and train["batch_size"] % micro:
        raise ValueError(
            f"train.batch_size: {train['batch_size']} is not a multiple of train.micro_batch_size {micro}"
            f"{_where(src)}"
        )
    if out["schedule"]["warmup_steps"] and out["schedule"]["warmup_ratio"]:
        raise ValueError(f"schedule.warmup_steps / schedule.warmup_ratio: set one of them, not both{_where(src)}")
    for name, group in out["optim"]["param_groups"].items():
        key = f"optim.param_groups.{name}"
        if not isinstance(group, Mapping):
            raise TypeError(f"{key}: must be a dict (pattern, lr, weight_decay), got {group!r}{_where(src)}")
        for field in group:
            if field not in ("pattern", "lr", "weight_decay"):
                raise _unknown(f"{key}.{field}", field, ("pattern", "lr", "weight_decay"), src)
        pattern = group.get("pattern", GROUP_PATTERNS.get(name))
        if pattern is None:
            raise ConfigKeyError(
                f"{key}.pattern: missing; give a regular expression on parameter names (groups with a default "
                f"pattern: {', '.join(GROUP_PATTERNS)}){_where(src)}"
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{key}.pattern: {pattern!r} is not a regular expression: {err}{_where(src)}") from None
        for field in ("lr", "weight_decay"):
            if field in group and (not _is_number(group[field]) or group[field] < 0):
                raise ValueError(f"{key}.{field}: must be a number >= 0, got {group[field]!r}{_where(src)}")

    # components: registered types and argument names, without building anything
    for name in ("model", "algorithm"):
        if name not in raw:
            raise ConfigKeyError(f"{name}: missing; add `{name} = dict(type=...)`{_where(src)}")
        problem = _component(raw[name])
        if problem:
            raise TypeError(f"{name}: {problem}, got {raw[name]!r}{_where(src)}")
    check_component(MODELS, raw["model"], "model", src)
    algo_cls = registered_class(ALGORITHMS, raw["algorithm"], "algorithm", src)
    if hasattr(algo_cls, "check_config"):
        algo_cls.check_config(dict(raw["algorithm"]), key="algorithm", source=src)
    else:
        check_arguments(algo_cls, raw["algorithm"], "algorithm", ("model",), src)
    out["model"] = raw["model"]
    out["algorithm"] = raw["algorithm"]
    for split in ("train", "val"):
        data_cfg = out["data"][split]
        if data_cfg is not None and not datasets_given:
            check_component(DATASETS, data_cfg, f"data.{split}", src)
            _check_data_files(data_cfg, f"data.{split}", src)
    if hasattr(algo_cls, "check_collator_config") and not collate_given:
        algo_cls.check_collator_config(dict(out["data"]["collator"]), key="data.collator", source=src)
    for i, metric in enumerate(out["evaluation"]["metrics"]):
        check_component(METRICS, metric, f"evaluation.metrics[{i}]", src)
    if out["evaluation"]["interval"] and out["data"]["val"] is None and not datasets_given:
        raise ValueError(f"evaluation.interval: set, but data.val is None; give a validation set{_where(src)}")

    work_dir = raw.get("work_dir")
    if work_dir is None:
        work_dir = os.path.join("work_dirs", Path(source).stem if source else "run")
    if _str(work_dir):
        raise TypeError(f"work_dir: must be a path string, got {work_dir!r}{_where(src)}")
    out["work_dir"] = str(work_dir)
    load_from = raw.get("load_from")
    if load_from is not None:
        if _str(load_from):
            raise TypeError(f"load_from: must be a path string, got {load_from!r}{_where(src)}")
        if not Path(load_from).exists():
            raise FileNotFoundError(f"load_from: {str(load_from)!r} does not exist{_where(src)}")
    out["load_from"] = load_from
    out["source"] = src
    return out
