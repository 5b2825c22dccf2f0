"""The contract between the engine and a training algorithm.

An algorithm is a small ``nn.Module`` that holds the model being trained
(``self.model``) and turns one batch into a loss (TRL's shape: a step
function plus its config). The engine wraps the whole algorithm for
DDP/FSDP/DeepSpeed, so everything that needs gradients happens inside
``forward`` (= ``step``); frozen helpers such as a reference model are kept
out of the module tree.

* ``step(batch) -> {"loss": tensor, <metric>: tensor, ...}``: ``loss`` is the
  mean over the batch's *items* (answer tokens for SFT, pairs for DPO);
  metrics are detached scalars, means over the same items, named as TRL
  names them.
* ``num_items(batch)``: how many items the batch holds, known before the
  forward pass. The engine normalises by the items of the whole global batch
  (all micro-batches of all processes), so gradient accumulation and any
  number of processes give the gradient of one big batch.
* ``param_groups(optim_cfg)``: named parameter groups with their own learning
  rates (by name patterns: projector, heads, task tokens, LoRA, ...).
* ``build_collator(**cfg)``: what turns dataset items into batches.
* ``setup(context)``: one-off work before training (precomputed reference
  log-probs, ...).
* ``evaluate(batch)``: the validation pass of one batch: metrics plus the
  data samples that the configured ``METRICS`` consume.
* ``on_step(step, total_steps)``: called before each engine step.
* ``updates_per_batch``: optimiser updates the engine makes on each step's
  batch (default 1; PPO: its epochs over each batch of rollouts); before
  each, ``on_update(index, updates_per_batch)``. The learning-rate schedule
  steps once per engine step (as TRL's PPO), checkpoints fall between steps.
* ``process_state()`` / ``load_process_state(state)``: what one process
  keeps for itself across steps and is not a parameter or buffer (PPO's
  rollouts still to be trained on: each process has its own). The engine
  saves it per process with every checkpoint (``process_state_<rank>.pt``)
  and hands it back to the same process on resume. Tensors, lists, dicts and
  numbers only (loaded with ``weights_only=True``).
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

IGNORE_INDEX = -100

#: Default name patterns of the named parameter groups (see tpo.engine.config).
GROUP_PATTERNS = {
    "projector": r"^projector\.",
    "heads": r"^(heads|box_encoder)\.",
    "task_tokens": r"^task_embeddings\.",
    "lora": r"\.lora_",
    "embeddings": r"embed_tokens\.",
    "vision": r"^vision_encoder\.",
    "llm": r"^llm\.",
}


@dataclass
class SetupContext:
    """What ``Algorithm.setup`` may use: the accelerator, the run's folder, the
    datasets, the collate function, the evaluation batch size, and a
    fingerprint of everything that determines the initial model and data."""

    accelerator: Any
    work_dir: str
    train_dataset: Any
    val_dataset: Any
    collate_fn: Callable
    batch_size: int
    fingerprint: str


def _where(source) -> str:
    return f" [config {source}]" if source else ""


def group_parameters(
    named_parameters: Sequence[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    no_decay: Sequence[str] = ("bias", "norm"),
) -> list[dict[str, Any]]:
    """Optimiser parameter groups from name patterns.

    Each trainable parameter goes to the first group (in config order) whose
    ``pattern`` (a regular expression, default ``GROUP_PATTERNS[name]``) is
    found in its name, else to ``default``. Parameters whose name contains one
    of ``no_decay`` (case-insensitive; biases and norms by default) or that are
    1-D get no weight decay, in a ``<group>/no_decay`` sub-group. Returns the
    non-empty groups: dicts with ``name``, ``params``, ``param_names``, ``lr``
    and ``weight_decay``.
    """
    groups = dict(groups or {})
    compiled = [(name, re.compile(spec.get("pattern", GROUP_PATTERNS.get(name, "$^"))))
                for name, spec in groups.items()]
    buckets: dict[str, dict[str, Any]] = {}
    lowered = [s.lower() for s in no_decay]
    for pname, param in named_parameters:
        if not param.requires_grad:
            continue
        group = next((name for name, pattern in compiled if pattern.search(pname)), "default")
        spec = groups.get(group, {})
        decay = spec.get("weight_decay", weight_decay)
        if param.ndim <= 1 or any(s in pname.lower() for s in lowered):
            key, decay = f"{group}/no_decay", 0.0
        else:
            key = group
        bucket = buckets.setdefault(key, {"name": key, "params": [], "param_names": [],
                                          "lr": float(spec.get("lr", lr)), "weight_decay": float(decay)})
        bucket["params"].append(param)
        bucket["param_names"].append(pname)
    return list(buckets.values())


class Algorithm(nn.Module):
    """Base of the training algorithms; see the module docstring.

    Args:
        model: the model to train (built by the engine from ``model=...``).
    """

    #: which collator of ``tpo.data.collate`` turns dataset items into batches
    collator: str = "ConversationCollator"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # ------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.step(batch)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def num_items(self, batch: dict[str, Any]) -> int:
        """Items the loss averages over (default: the batch's rows)."""
        return int(batch["input_ids"].shape[0])

    #: optimiser updates on each engine step's batch (see the module docstring)
    updates_per_batch: int = 1

    def on_step(self, step: int, total_steps: int) -> None:
        """Hook run before each engine step (``step`` counts from 0)."""

    def on_update(self, index: int, updates: int) -> None:
        """Hook run before each of the ``updates`` optimiser updates of a step."""

    def setup(self, context: SetupContext) -> None:
        """One-off work before training; the model is still as initialised."""

    def process_state(self) -> Any:
        """This process's own state for a checkpoint (``None``: none)."""
        return None

    def load_process_state(self, state: Any) -> None:
        """Restore what :meth:`process_state` returned in the checkpointed run."""
        raise NotImplementedError(f"{type(self).__name__} saved a per-process state but cannot load it")

    def param_groups(self, optim_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Named parameter groups of the model (see :func:`group_parameters`)."""
        return group_parameters(
            list(self.model.named_parameters()),
            lr=optim_cfg["lr"],
            weight_decay=optim_cfg.get("weight_decay", 0.0),
            groups=optim_cfg.get("param_groups"),
            no_decay=optim_cfg.get("no_decay", ("bias", "norm")),
        )

    # ------------------------------------------------------------- data
    @classmethod
    def collator_class(cls):
        from tpo.data import collate

        return getattr(collate, cls.collator)

    def build_collator(self, **cfg: Any) -> Callable:
        """The collate function: ``self.collator`` built with the model's processor."""
        return self.collator_class()(self.model.processor, **cfg)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], predict: bool = False) -> dict[str, Any]:
        """One validation batch: ``{"metrics": {name: scalar mean over items},
        "num_items": n, "samples": [dicts for the METRICS]}``; ``predict``
        asks for predictions (generation), which only the metrics need."""
        out = self.step(batch)
        metrics = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
        return {"metrics": metrics, "num_items": self.num_items(batch), "samples": []}

    # ------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], key: str = "algorithm", source=None) -> None:
        """Check ``algorithm=dict(...)`` without building anything: every key
        is an argument of the class (``model`` is given by the engine)."""
        params = inspect.signature(cls).parameters
        accepted = [n for n, p in params.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "model"]
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        for name in cfg:
            if name == "type":
                continue
            if name == "model":
                raise TypeError(f"{key}.model: the engine gives the algorithm the model built from the top-level "
                                f"`model` key; drop it here{_where(source)}")
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{key}.{name}: {cls.__name__} got an unexpected argument {name!r}{hint} "
                                f"Its arguments are: {', '.join(accepted)}{_where(source)}")

    @classmethod
    def check_collator_config(cls, cfg: Mapping[str, Any], key: str = "data.collator", source=None) -> None:
        """Check ``data.collator`` against the collator's arguments."""
        try:
            collator = cls.collator_class()
        except (ImportError, AttributeError) as err:
            raise ImportError(
                f"{key}: {cls.__name__} needs tpo.data.collate.{cls.collator}, which is not available ({err})"
                f"{_where(source)}"
            ) from None
        params = inspect.signature(collator).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        accepted = [n for n in params if n != "processor"]
        for name in cfg:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{key}.{name}: {cls.collator} got an unexpected argument {name!r}{hint} "
                                f"Its arguments are: {', '.join(accepted)}{_where(source)}")


# ---------------------------------------------------------------- config checks
class ConfigKeyError(KeyError):
    """An unknown or missing config key (``str()`` is the plain message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_arguments(cls, args: Mapping[str, Any], key: str, skip: tuple[str, ...] = (), source=None) -> None:
    """Every key of ``args`` (but ``type``) is an argument of ``cls``, else a
    TypeError naming ``key.<argument>`` and the closest valid name."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip]
    for name in args:
        if name == "type":
            continue
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{key}.{name}: {getattr(cls, '__name__', cls)} got an unexpected argument {name!r}{hint} "
                f"Its arguments are: {', '.join(accepted)}{_where(source)}"
            )


def registered_class(registry, cfg: Mapping, key: str, source: str | None):
    """The class ``cfg['type']`` names in ``registry`` (importing its lazy
    locations), or a KeyError naming the key and the close names."""
    from tpo.registry import registered_names

    name = cfg["type"]
    if not isinstance(name, str):
        return name
    cls = registry.get(name)
    if cls is None:
        names = registered_names(registry)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigKeyError(
            f"{key}.type: {name!r} is not in the tpo {registry.name!r} registry{hint} "
            f"Registered: {', '.join(names) or '(none)'}{_where(source)}"
        )
    return cls


def check_component(registry, cfg: Mapping, key: str, source: str | None = None, skip: tuple[str, ...] = ()):
    """Check a component config without building it: its type is registered
    and its keys are arguments of the class. Returns the class."""
    cls = registered_class(registry, cfg, key, source)
    check_arguments(cls, cfg, key, skip, source)
    return cls


# ---------------------------------------------------------------- helpers
def media_masked_labels(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with the media placeholder positions ignored (the model's own rule)."""
    return model.mask_media_labels(input_ids, labels)


def count_label_tokens(model: nn.Module, batch: Mapping[str, Any]) -> int:
    """Tokens the LM loss averages over: labelled, shifted, media excluded."""
    labels = media_masked_labels(model, batch["input_ids"], batch["labels"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def without_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


class AdapterReference:
    """The initial model of a LoRA model, without a second copy of its LLM:
    the model with its LoRA adapters disabled (peft's ``disable_adapter()``)
    and every other parameter that trains (a projector, task heads) replaced
    by a frozen snapshot of its value when this was made
    (``torch.func.functional_call``). Not a module: an algorithm keeps it out
    of its module tree (never trained, wrapped or saved).

    ``reference(fn, *args)`` returns ``fn(model, *args)`` computed by that
    initial model; any tensor ``fn`` reads off the model (the LM head's
    weight, say) is the initial one.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad and ".lora_" not in n}

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        device = next(self.model.parameters()).device
        for name, value in self.params.items():
            if value.device != device:
                self.params[name] = value.to(device)
        with self.model.llm.model.disable_adapter():
            return torch.func.functional_call(_Apply(self.model, fn), {f"model.{n}": v for n, v in self.params.items()},
                                              args)


class _Apply(nn.Module):
    """``fn(model, *args)`` as a module's forward, for ``functional_call``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.model, *args)
