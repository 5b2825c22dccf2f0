"""Loading configs and building components from them, with errors that name
the registry, the config key and the closest valid names."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import difflib
import inspect
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from mmengine.config import Config, ConfigDict
from mmengine.registry import Registry

from .registry import (
    ALGORITHMS,
    ALL_REGISTRIES,
    DATASETS,
    JUDGES,
    LLMS,
    LOSSES,
    METRICS,
    MODELS,
    PROJECTORS,
    TASK_HEADS,
    TOKENIZERS,
    VISION_ENCODERS,
)

CONFIG_SUFFIXES = (".py", ".yaml", ".yml", ".json")

# The dotted config key of the component being built (``model.llm``), so that
# a component deep in the tree can name where its bad value came from.
_KEY_STACK: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("tpo_config_key", default=())


def current_config_key(leaf: str | None = None) -> str:
    """The dotted config key of the component now being built, plus ``leaf``."""
    parts = [p for p in _KEY_STACK.get() if p]
    if leaf:
        parts.append(leaf)
    return ".".join(parts) or "<root>"


@contextlib.contextmanager
def config_key(key: str | None) -> Iterator[None]:
    token = _KEY_STACK.set(_KEY_STACK.get() + ((key,) if key else ()))
    try:
        yield
    finally:
        _KEY_STACK.reset(token)


def load_config(cfg: str | os.PathLike | Mapping | Config, cfg_options: Mapping[str, Any] | None = None) -> Config:
    """A :class:`mmengine.config.Config` from a path (``.py``, ``.yaml``,
    ``.json``, with ``_base_`` inheritance), a dict or a Config, with the
    dotted ``cfg_options`` overrides merged in."""
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if path.suffix not in CONFIG_SUFFIXES:
            raise ValueError(f"config file {str(path)!r} must end in one of {', '.join(CONFIG_SUFFIXES)}")
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist (looked from {os.getcwd()!r})")
        config = Config.fromfile(str(path))
    elif isinstance(cfg, Config):
        config = copy.deepcopy(cfg)
    elif isinstance(cfg, Mapping):
        config = Config(copy.deepcopy(dict(cfg)))
    else:
        raise TypeError(f"a config must be a file path, a dict or an mmengine Config, got {type(cfg).__name__}")
    if cfg_options:
        config.merge_from_dict(dict(cfg_options))
    return config


def _section(cfg, section: str, cfg_options: Mapping[str, Any] | None) -> dict:
    """The config of one component: ``cfg`` itself when it has a ``type``,
    else its ``section`` key (``model`` of a whole config file).

    ``cfg_options`` are dotted keys: relative to the component when ``cfg`` is
    one (``hidden_dim``; ``projector.hidden_dim`` is taken too), from the root
    of the file otherwise, where only those under ``section`` can change what
    is built (``model.llm.config.num_hidden_layers``). Any other key would be
    merged where this build never reads it (a root ``llm`` from ``_base_`` was
    already copied into ``model`` when the file loaded), so it is an error that
    names the key the user most likely meant."""
    options = dict(cfg_options or {})
    prefix = section + "."

    def relative(opts: Mapping[str, Any]) -> dict:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in opts.items()}

    config = load_config(cfg)
    if "type" in config:  # a component (a dict or a Config with a type): options relative to it
        config.merge_from_dict(relative(options))
        return config.to_dict()
    where = f"config file {str(cfg)!r}" if isinstance(cfg, (str, os.PathLike)) else "the config"
    if section not in config:
        raise KeyError(f"{where} has no {section!r} key and no 'type' key; add `{section} = dict(type=...)`")
    component = config[section]
    for key in options:
        if key == section or key.startswith(prefix):
            continue
        head = key.split(".")[0]
        if head not in config or (isinstance(component, Mapping) and head in component):
            hint = f"did you mean {prefix + key!r}?"
        else:
            hint = (f"{head!r} is another key of the file's root (its own or from `_base_`), not read here; "
                    f"set what you mean under {section!r}, or drop it")
        raise KeyError(
            f"cfg option {key!r} is outside {section!r}, the only key of {where} that build_{section} reads, "
            f"so it would change nothing: {hint}"
        )
    config.merge_from_dict(options)
    return config[section].to_dict() if isinstance(config[section], ConfigDict) else config[section]


def registered_names(registry: Registry) -> list[str]:
    """Every name ``registry`` can build, its lazy locations imported."""
    registry.import_from_location()
    return sorted(registry.module_dict)


def _unknown_type(registry: Registry, name: str) -> KeyError:
    names = registered_names(registry)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return KeyError(
        f"{current_config_key('type')}: {name!r} is not in the tpo {registry.name!r} registry{hint} "
        f"Registered: {', '.join(names) or '(none)'}"
    )


def _check_arguments(obj_cls, args: Mapping[str, Any]) -> None:
    try:
        sig = inspect.signature(obj_cls)
    except (TypeError, ValueError):  # builtins without a signature
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    name = getattr(obj_cls, "__name__", repr(obj_cls))
    for key in args:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{current_config_key(key)}: {name} got an unexpected argument {key!r}{hint} "
                f"Its arguments are: {', '.join(accepted)}"
            )
    missing = [
        n for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in args
    ]
    if missing:
        raise TypeError(f"{current_config_key()}: {name} needs the argument(s) {', '.join(map(repr, missing))}")


def build_from_cfg(cfg, registry: Registry, default_args: Mapping[str, Any] | None = None):
    """Build one component: ``cfg['type']`` names a class in ``registry`` (or
    is the class itself); the other keys are its constructor's arguments."""
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"{current_config_key()}: a {registry.name} config must be a dict with a 'type' key, "
            f"got {type(cfg).__name__}"
        )
    args = dict(cfg)
    for key, value in (default_args or {}).items():
        args.setdefault(key, value)
    if "type" not in args:
        raise KeyError(
            f"{current_config_key()}: the {registry.name} config has no 'type' key; "
            f"set it to one of: {', '.join(registered_names(registry))}"
        )
    obj_type = args.pop("type")
    if isinstance(obj_type, str):
        obj_cls = registry.get(obj_type)
        if obj_cls is None:
            raise _unknown_type(registry, obj_type)
    elif callable(obj_type):
        obj_cls = obj_type
    else:
        raise TypeError(f"{current_config_key('type')}: must be a registered name or a class, got {obj_type!r}")
    _check_arguments(obj_cls, args)
    return obj_cls(**args)


def build_child(cfg, registry: Registry, key: str, default_args: Mapping[str, Any] | None = None):
    """Build a sub-component (a model's ``llm``, say) under config key ``key``,
    so that its errors name ``model.llm.<argument>``."""
    with config_key(key):
        return build_from_cfg(cfg, registry, default_args)


def _builder(registry: Registry, section: str):
    def build(cfg, cfg_options: Mapping[str, Any] | None = None, default_args: Mapping[str, Any] | None = None):
        with config_key(section):
            return build_from_cfg(_section(cfg, section, cfg_options), registry, default_args)

    build.__name__ = f"build_{section}"
    build.__doc__ = (
        f"Build a {registry.name} from a dict with a ``type``, an mmengine Config, or a config file path "
        f"(``.py``/``.yaml``/``.json``; its ``{section}`` key is built), with dotted ``cfg_options`` overrides."
    )
    return build


build_model = _builder(MODELS, "model")
build_vision_encoder = _builder(VISION_ENCODERS, "vision_encoder")
build_projector = _builder(PROJECTORS, "projector")
build_llm = _builder(LLMS, "llm")
build_tokenizer = _builder(TOKENIZERS, "tokenizer")
build_task_head = _builder(TASK_HEADS, "task_head")
build_loss = _builder(LOSSES, "loss")
build_dataset = _builder(DATASETS, "dataset")
build_metric = _builder(METRICS, "metric")
build_judge = _builder(JUDGES, "judge")
build_algorithm = _builder(ALGORITHMS, "algorithm")

for _registry in ALL_REGISTRIES.values():
    _registry.build_func = build_from_cfg
