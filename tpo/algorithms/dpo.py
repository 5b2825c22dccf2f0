"""Direct preference optimisation and its relatives, on a multimodal LLM.

One forward pass over the concatenated batch (the B chosen rows, then the B
rejected rows, as the preference collator lays them out) gives the policy's
last hidden states; per-sequence log-probs of the answers and the preference
loss come from them through the fused linear preference loss (the LM head is
applied tile by tile, the ``[tokens, vocab]`` logits never exist), or, with
``logprob="eager"``, from materialised logits and ``log_softmax``.

The loss is any preference loss of ``tpo.registry.LOSSES`` (``DPOLoss`` with
TRL's ``loss_type`` names, ``SimPOLoss``, ``CPOLoss``, ``ORPOLoss``, ...). The
reference is

* ``"copy"``: a frozen deep copy of the model as it was built (or loaded),
* ``"adapter"``: the model itself with its LoRA adapters disabled (peft's
  ``disable_adapter()``), no second copy of the LLM; the other parameters
  that train (a projector, task heads) are called with a frozen copy of their
  initial values (``torch.func.functional_call``), so the reference is exactly
  the initial model,
* ``"precomputed"``: per-sequence log-probs computed once over the training
  and validation sets before training and cached in
  ``<work_dir>/ref_logps.pt``; their model is the initial model, on a LoRA
  model the same as ``"adapter"``'s (adapters disabled, the other trained
  parameters at their initial values),
* ``"none"``: only for reference-free losses (SimPO, CPO, ORPO,
  ``DPOLoss(reference_free=True)``); such losses never build a reference.

Metrics (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``logits/chosen``, ``logits/rejected`` and the loss's own
(``nll_loss``, ...).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tpo.kernels import FusedLinearPreferenceLoss, fused_linear_logprob
from tpo.registry import ALGORITHMS, LOSSES, current_config_key

from .base import (
    IGNORE_INDEX,
    AdapterReference,
    Algorithm,
    SetupContext,
    _where,
    check_component,
    media_masked_labels,
    without_labels,
)

REFERENCES = ("copy", "adapter", "precomputed", "none")
LOGPROB_MODES = ("fused", "eager")
REF_CACHE_FILE = "ref_logps.pt"


def num_pairs(batch: Mapping[str, Any]) -> int:
    rows = int(batch["input_ids"].shape[0])
    n = batch.get("num_pairs")
    n = rows // 2 if n is None else int(n)
    if rows != 2 * n:
        raise ValueError(f"a preference batch holds 2 x num_pairs rows (chosen, then rejected); got {rows} rows "
                         f"for {n} pairs")
    return n


def pair_ids(batch: Mapping[str, Any]) -> list:
    """The sample id of each pair (``ids`` per pair, or per row: chosen rows first)."""
    n = num_pairs(batch)
    ids = batch.get("ids")
    if ids is None:
        raise KeyError("the preference batch has no 'ids'; precomputed reference log-probs are looked up by sample id")
    ids = list(ids)
    if len(ids) not in (n, 2 * n):
        raise ValueError(f"the preference batch has {len(ids)} ids for {n} pairs")
    return ids[:n]


@ALGORITHMS.register_module()
class DPO(Algorithm):
    """Preference optimisation with any preference loss (see the module docstring).

    Args:
        model: the MLLM policy.
        loss: a preference loss config of ``tpo.registry.LOSSES`` (default
            ``dict(type="DPOLoss", beta=0.1)``, TRL's sigmoid DPO).
        reference: ``"copy"``, ``"adapter"``, ``"precomputed"`` or ``"none"``.
        logprob: ``"fused"`` (default) or ``"eager"`` (materialised logits).
    """

    collator = "PreferenceCollator"

    def __init__(self, model: nn.Module, loss: Mapping[str, Any] | None = None, reference: str = "copy",
                 logprob: str = "fused"):
        super().__init__(model)
        if reference not in REFERENCES:
            raise ValueError(f"{current_config_key('reference')}: use one of {REFERENCES}, got {reference!r}")
        if logprob not in LOGPROB_MODES:
            raise ValueError(f"{current_config_key('logprob')}: use one of {LOGPROB_MODES}, got {logprob!r}")
        self.loss_fn = FusedLinearPreferenceLoss(loss=dict(loss or dict(type="DPOLoss", beta=0.1)))
        self.logprob = logprob
        needs = self.loss_fn.needs_reference
        if needs and reference == "none":
            raise ValueError(f"{current_config_key('reference')}: {type(self.loss_fn.loss).__name__} needs a "
                             "reference; use 'copy', 'adapter' or 'precomputed', or a reference-free loss")
        uses_lora = getattr(getattr(model, "llm", None), "uses_lora", False)
        if reference == "adapter" and not uses_lora:
            raise ValueError(f"{current_config_key('reference')}: 'adapter' disables the LoRA adapters, but the model "
                             "has none; set model.llm.lora=dict(r=..., target_modules=[...]) or use 'copy'")
        self.reference = reference if needs else "none"
        # Kept out of the module tree: never trained, wrapped or saved.
        self._frozen: dict[str, Any] = {}
        if self.reference == "copy":
            ref = copy.deepcopy(model)
            ref.requires_grad_(False)
            ref.eval()
            self._frozen["model"] = ref
        elif self.reference == "adapter" or (self.reference == "precomputed" and uses_lora):
            self._frozen["adapter"] = AdapterReference(model)
        self.ref_logps: dict[Any, tuple[float, float]] | None = None

    # ------------------------------------------------------------ reference
    @property
    def ref_model(self) -> nn.Module | None:
        ref = self._frozen.get("model")
        if ref is not None:
            device = next(self.model.parameters()).device
            if next(ref.parameters()).device != device:
                ref.to(device)
        return ref

    def _reference_forward(self, inputs: Mapping[str, Any]):
        """``(hidden states, LM head weight, bias)`` of the reference model."""
        adapter = self._frozen.get("adapter")
        if adapter is not None:
            return adapter(_hidden_and_head, inputs)
        return _hidden_and_head(self.ref_model if self.reference == "copy" else self.model, inputs)

    def _reference_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Keyword arguments of the preference loss that carry the reference."""
        if self.reference == "none":
            return {}
        if self.reference == "precomputed":
            chosen, rejected = self.lookup_ref_logps(batch)
            return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        with torch.no_grad():
            hidden, weight, bias = self._reference_forward(without_labels(batch))
        return {"ref_hidden": hidden[:, :-1].detach(), "ref_weight": weight.detach(),
                "ref_bias": None if bias is None else bias.detach()}

    def lookup_ref_logps(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_logps is None:
            raise RuntimeError("reference='precomputed' but the reference log-probs were not computed; the engine "
                               "calls setup() before training")
        device = batch["input_ids"].device
        missing = [i for i in pair_ids(batch) if i not in self.ref_logps]
        if missing:
            raise KeyError(f"no precomputed reference log-probs for sample(s) {missing[:5]}; delete "
                           f"{REF_CACHE_FILE} in the work dir to recompute them")
        values = torch.tensor([self.ref_logps[i] for i in pair_ids(batch)], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]

    # -------------------------------------------------------------- training
    def num_items(self, batch: dict[str, Any]) -> int:
        return num_pairs(batch)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        num_pairs(batch)
        labels = media_masked_labels(self.model, batch["input_ids"], batch["labels"])[:, 1:]
        hidden = self.model(without_labels(batch))["hidden_states"][:, :-1]
        head = self.model.llm.get_output_embeddings()
        ref = self._reference_inputs(batch)
        if self.logprob == "fused":
            loss, metrics = self.loss_fn(hidden, head.weight, labels, head.bias, **ref)
        else:
            loss, metrics = self._eager_loss(hidden, head, labels, ref)
        metrics.pop("loss", None)
        return {"loss": loss, **metrics}

    def _eager_loss(self, hidden, head, labels, ref):
        """The same loss from materialised logits and ``log_softmax``."""
        chosen, rejected, n_c, n_r = eager_sequence_logps(hidden, head.weight, head.bias, labels)
        ref_c = ref_r = None
        if "ref_hidden" in ref:
            with torch.no_grad():
                ref_c, ref_r, _, _ = eager_sequence_logps(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], labels)
        elif "ref_chosen_logps" in ref:
            ref_c, ref_r = ref["ref_chosen_logps"], ref["ref_rejected_logps"]
        out = self.loss_fn.loss(chosen, rejected, ref_c, ref_r, chosen_lengths=n_c, rejected_lengths=n_r)
        return out["loss"], {k: v.detach() for k, v in out.items()}

    # ------------------------------------------------------------ log-probs
    @torch.no_grad()
    def sequence_logps(self, batch: Mapping[str, Any], reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed answer log-probs ``[2B]`` and token counts, of the
        policy or (``reference=True``) of the reference."""
        labels = media_masked_labels(self.model, batch["input_ids"], batch["labels"])[:, 1:]
        inputs = without_labels(batch)
        backend = getattr(self.model, "kernel_backend", "auto")
        if reference and self.reference == "precomputed" and self.ref_logps is not None:
            chosen, rejected = self.lookup_ref_logps(batch)
            return torch.cat([chosen, rejected]), (labels != IGNORE_INDEX).sum(-1)
        # (before training, a precomputed reference of a model without LoRA is the model as it is)
        hidden, weight, bias = self._reference_forward(inputs) if reference else _hidden_and_head(self.model, inputs)
        out = fused_linear_logprob(hidden[:, :-1], weight, labels, bias, ignore_index=IGNORE_INDEX,
                                   reduction="sum", backend=backend)
        return out.logps.float(), out.counts

    def setup(self, context: SetupContext) -> None:
        if self.reference == "precomputed":
            self.ref_logps = self.precompute_ref_logps(context)
            self._frozen.pop("adapter", None)  # the initial values are not needed any more

    @torch.no_grad()
    def precompute_ref_logps(self, context: SetupContext) -> dict[Any, tuple[float, float]]:
        """Reference log-probs of every pair of the training and validation sets,
        computed once (each process a share of the batches) and cached in
        ``<work_dir>/ref_logps.pt`` under the run's fingerprint."""
        from accelerate.utils import gather_object

        acc = context.accelerator
        path = os.path.join(context.work_dir, REF_CACHE_FILE)
        if os.path.isfile(path):
            cached = torch.load(path, weights_only=False)
            if cached.get("fingerprint") == context.fingerprint:
                return cached["logps"]
        was_training = self.model.training
        self.model.eval()
        device = acc.device
        self.model.to(device)
        mine: list[tuple[Any, float, float]] = []
        for dataset in (context.train_dataset, context.val_dataset):
            if dataset is None:
                continue
            starts = range(0, len(dataset), context.batch_size)
            for b, start in enumerate(starts):
                if b % acc.num_processes != acc.process_index:
                    continue
                items = [dataset[i] for i in range(start, min(start + context.batch_size, len(dataset)))]
                batch = _to_device(context.collate_fn(items), device)
                logps, _ = self.sequence_logps(batch, reference=True)
                n = num_pairs(batch)
                mine += [(i, float(logps[k]), float(logps[n + k])) for k, i in enumerate(pair_ids(batch))]
        self.model.train(was_training)
        everything = gather_object(mine) if acc.num_processes > 1 else mine
        table = {i: (c, r) for i, c, r in everything}
        if acc.is_main_process:
            os.makedirs(context.work_dir, exist_ok=True)
            tmp = path + ".tmp"
            torch.save({"fingerprint": context.fingerprint, "logps": table}, tmp)
            os.replace(tmp, path)
        acc.wait_for_everyone()
        return table

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], predict: bool = False) -> dict[str, Any]:
        """The loss and TRL metrics of the batch, and one data sample per pair
        (``chosen_reward``, ``rejected_reward``: the loss's implicit rewards)
        for ``PairwiseAccuracy``."""
        n = num_pairs(batch)
        logps, counts = self.sequence_logps(batch)
        chosen, rejected = logps[:n], logps[n:]
        n_c, n_r = counts[:n].float(), counts[n:].float()
        ref_c = ref_r = None
        if self.reference != "none":
            ref, _ = self.sequence_logps(batch, reference=True)
            ref_c, ref_r = ref[:n], ref[n:]
        loss_fn = self.loss_fn.loss
        out = loss_fn(chosen, rejected, ref_c, ref_r, chosen_lengths=n_c, rejected_lengths=n_r)
        metrics = {k: v.detach().float() for k, v in out.items()}
        samples = []
        ids = batch.get("ids")
        for k in range(n):
            sl = slice(k, k + 1)
            one = loss_fn(chosen[sl], rejected[sl], None if ref_c is None else ref_c[sl],
                          None if ref_r is None else ref_r[sl], chosen_lengths=n_c[sl], rejected_lengths=n_r[sl])
            samples.append({"id": None if ids is None else list(ids)[k],
                            "chosen_reward": float(one["rewards/chosen"]),
                            "rejected_reward": float(one["rewards/rejected"])})
        return {"metrics": metrics, "num_items": n, "samples": samples}

    # ---------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], key: str = "algorithm", source=None) -> None:
        super().check_config(cfg, key, source)
        for name, options in (("reference", REFERENCES), ("logprob", LOGPROB_MODES)):
            if name in cfg and cfg[name] not in options:
                raise ValueError(f"{key}.{name}: use one of {options}, got {cfg[name]!r}{_where(source)}")
        loss = cfg.get("loss")
        if loss is not None:
            if not isinstance(loss, Mapping) or "type" not in loss:
                raise TypeError(f"{key}.loss: must be a preference loss config dict with a 'type', got {loss!r}"
                                f"{_where(source)}")
            check_component(LOSSES, loss, f"{key}.loss", source)


def _hidden_and_head(model: nn.Module, inputs: Mapping[str, Any]):
    head = model.llm.get_output_embeddings()
    return model(dict(inputs))["hidden_states"], head.weight, head.bias


def eager_sequence_logps(hidden, weight, bias, labels):
    """Per-row summed log-probs of the labels through materialised logits and
    ``log_softmax``; returns chosen, rejected (first and second half) and their
    token counts."""
    logits = F.linear(hidden, weight, bias).float()
    mask = labels != IGNORE_INDEX
    token = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (token * mask).sum(-1)
    counts = mask.sum(-1).to(sums.dtype)
    n = hidden.shape[0] // 2
    return sums[:n], sums[n:], counts[:n], counts[n:]


def _to_device(batch, device):
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)
