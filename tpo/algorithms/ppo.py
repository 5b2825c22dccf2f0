"""PPO against a learned reward model (VLM-RLAIF stage 3).

One engine step of :class:`PPO` takes a micro-batch of prompts
(:class:`~tpo.rlaif.collate.PromptCollator`: the question, its media) and

1. **rolls out**: the policy samples an answer to each prompt with
   ``generate`` (``temperature``, ``top_p``, ``max_new_tokens``); tokens after
   the first end-of-sequence token are dropped;
2. **scores**: the frozen reward model scores prompt + answer at the answer's
   last token, and the paper's penalties are added: ``missing_eos_penalty`` to
   an answer that never ended (the paper: -8, added) and ``length_coef *
   length / max_new_tokens`` (the paper: -10, a length penalty);
3. **shapes the reward**: per token ``-kl_coef * KL_t`` with ``KL_t`` the
   ``k1`` (``logp - ref_logp``) or ``k3`` estimate against the reference
   policy, plus the score on the last token; ``kl_coef`` is fixed or adaptive
   (Ziegler et al.: moves the observed KL toward ``adaptive_kl.target``);
4. **estimates advantages**: the value model's per-token values (it starts as
   a copy of the reward model, as in the paper), GAE (``gamma``, ``lam``), the
   advantages whitened over the batch's tokens, returns = advantages + values;
5. **updates**: the clipped policy loss (``clip_range``) and the clipped value
   loss (``clip_range_value``, weight ``vf_coef``), token means.

*Several epochs over each batch of rollouts* (``ppo_epochs``): the engine
makes ``ppo_epochs`` optimiser updates on each step's batch
(``updates_per_batch``): the first samples the rollouts, every update
trains on them against the log-probs and values they were sampled with, so
each rollout gets ``ppo_epochs`` clipped updates from a policy that moves
between them, as in PPO's inner epochs (one minibatch per epoch: the
step's micro-batches; the learning rate steps once per batch, as in TRL).
The rollouts live within one engine step: a checkpoint (between steps)
holds none, and a resumed run continues exactly where it stopped.

The adaptive KL controller moves the coefficient by the KL of each
micro-batch summed over all processes, so every process keeps the same
coefficient. Under FSDP the engine marks the modules as FSDP-managed, so
``generate`` runs ``synced_gpus`` (every process takes ``max_new_tokens``
forward passes, each a collective).

Rollouts (log-probs, values) are computed in eval mode, as generation runs;
the updates in train mode: a model with dropout then sees a ratio away from 1
on its first update, so give PPO models no dropout (as TRL advises).

Log-probs come from the fused linear log-prob kernel (no ``[tokens, vocab]``
logits; the sampling temperature divides the logits). LoRA: with
``reference="adapter"`` the reference is the initial policy without a second
copy of the LLM: the policy with its adapters disabled and its other trained
parameters (the projector, ...) at their initial values (as DPO's).

Metrics (TRL's PPO names): ``objective/scores`` (score after penalties),
``objective/rm_scores``, ``objective/kl``, ``objective/kl_coef``,
``objective/entropy``, ``objective/non_score_reward``,
``objective/rlhf_reward``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``, ``val/ratio``,
``val/num_eos_tokens``, ``response/length`` (means over the step's
updates), and
``objective/qa_accuracy`` when the prompts carry reference answers.
Evaluation answers the validation prompts greedily: ``eval/scores``,
``eval/rm_scores``, ``eval/length``, ``eval/num_eos_tokens`` and QA data
samples for ``QAAccuracy``.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from tpo.kernels import fused_linear_logprob
from tpo.registry import ALGORITHMS, build_model, current_config_key

from .base import IGNORE_INDEX, AdapterReference, Algorithm, _where, group_parameters

REFERENCES = ("copy", "adapter")
KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded response tokens
    (``mask`` 1 on a prefix of each row). Returns ``(advantages, returns)``."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        following = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def truncate_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens with everything after the first EOS set to pad, mask of the
    kept tokens (the EOS included), whether each row has an EOS)``."""
    is_eos = tokens == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, tokens.shape[1], dtype=torch.long))
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    keep = index <= first[:, None]
    return tokens.masked_fill(~keep, pad_id), keep.long(), has_eos


class AdaptiveKLController:
    """Ziegler et al. (2019): ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"{current_config_key('adaptive_kl')}: target and horizon must be > 0, "
                             f"got target={target!r}, horizon={horizon!r}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, coef: float, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return coef * (1.0 + error * n / self.horizon)


@ALGORITHMS.register_module()
class PPO(Algorithm):
    """PPO with a reward model and a KL penalty (see the module docstring).

    Args:
        model: the policy (an MLLM; built by the engine from ``model=...``,
            weights from ``load_from`` or ``init_from``).
        reward_model: ``dict(config=<a RewardModel config dict or file>,
            checkpoint=<its RewardModeling checkpoint>)``; frozen.
        value_model: ``None`` (a copy of the reward model, trainable as its
            config says: LoRA or full) or a dict like ``reward_model``.
        reference: ``"copy"`` (a frozen copy of the initial policy) or
            ``"adapter"`` (the LoRA policy with its adapters disabled and its
            other trained parameters at their initial values).
        init_from: a checkpoint (e.g. the SFT run's) for the policy's weights,
            read across a LoRA wrapper (the engine's ``load_from`` needs
            identical names).
        max_new_tokens, temperature, top_p: sampling of the rollouts.
        ppo_epochs: optimiser updates on each batch of rollouts (see the module docstring).
        clip_range, clip_range_value, vf_coef: the clipped losses.
        gamma, lam: GAE.
        kl_coef: the KL penalty's coefficient (initial value when adaptive).
        kl_estimator: ``"k1"`` or ``"k3"``.
        adaptive_kl: ``None`` (fixed) or ``dict(target=..., horizon=...)``.
        missing_eos_penalty: added to the score of an answer without EOS
            (``None``: no penalty).
        length_coef: ``length_coef * length / max_new_tokens`` is added to the score.
        whiten_advantages: whiten the advantages over each batch's tokens.
        value_lr: the value model's learning rate (default: ``optim.lr``).
        eval_max_new_tokens: answer length at evaluation (default ``max_new_tokens``).
    """

    def __init__(
        self,
        model: nn.Module,
        reward_model: Mapping[str, Any],
        value_model: Mapping[str, Any] | None = None,
        reference: str = "copy",
        init_from: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        ppo_epochs: int = 2,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_coef: float = 0.1,
        kl_estimator: str = "k1",
        adaptive_kl: Mapping[str, float] | None = None,
        missing_eos_penalty: float | None = None,
        length_coef: float = 0.0,
        whiten_advantages: bool = True,
        value_lr: float | None = None,
        eval_max_new_tokens: int | None = None,
    ):
        super().__init__(model)
        _check_options(dict(reference=reference, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            ppo_epochs=ppo_epochs, clip_range=clip_range, clip_range_value=clip_range_value,
                            vf_coef=vf_coef, gamma=gamma, lam=lam, kl_coef=kl_coef, kl_estimator=kl_estimator,
                            eval_max_new_tokens=eval_max_new_tokens), current_config_key)
        for attr in ("generate", "embed_inputs", "decode", "processor", "llm"):
            if not hasattr(model, attr):
                raise TypeError(f"{current_config_key()}: the policy must be a multimodal LLM, "
                                f"{type(model).__name__} has no {attr!r}")
        if reference == "adapter" and not getattr(model.llm, "uses_lora", False):
            raise ValueError(f"{current_config_key('reference')}: 'adapter' disables the policy's LoRA adapters, but "
                             "it has none; set model.llm.lora=dict(...) or use 'copy'")
        if init_from is not None:
            from tpo.models.reward import load_backbone_weights

            load_backbone_weights(model, init_from)
        self.reference = reference
        self.max_new_tokens, self.temperature, self.top_p = int(max_new_tokens), float(temperature), float(top_p)
        self.ppo_epochs = int(ppo_epochs)
        self.clip_range, self.clip_range_value = float(clip_range), float(clip_range_value)
        self.vf_coef = float(vf_coef)
        self.gamma, self.lam = float(gamma), float(lam)
        self.kl_estimator = kl_estimator
        self.kl_ctl = None if adaptive_kl is None else AdaptiveKLController(**dict(adaptive_kl))
        self.missing_eos_penalty = None if missing_eos_penalty is None else float(missing_eos_penalty)
        self.length_coef = float(length_coef)
        self.whiten_advantages = bool(whiten_advantages)
        self.value_lr = value_lr
        self.eval_max_new_tokens = int(eval_max_new_tokens or max_new_tokens)
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))

        rm = _load_scored_model(reward_model, "reward_model")
        _check_compatible(model, rm, "reward_model")
        if value_model is None:
            value = copy.deepcopy(rm)  # trainable as the reward model's config makes it (LoRA or full)
        else:
            value = _load_scored_model(value_model, "value_model")
            _check_compatible(model, value, "value_model")
        rm.requires_grad_(False)
        rm.eval()
        self.value_model = value
        # kept out of the module tree: never trained, wrapped or saved
        self._frozen: dict[str, Any] = {"reward_model": rm}
        if reference == "copy":
            ref = copy.deepcopy(model)
            ref.requires_grad_(False)
            ref.eval()
            self._frozen["reference"] = ref
        else:
            self._frozen["adapter"] = AdapterReference(model)
        self._rollouts: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []  # this step's, per micro-batch
        self._update, self._slot = 0, 0

    # ------------------------------------------------------------ helpers
    def _frozen_model(self, name: str) -> nn.Module:
        module = self._frozen[name]
        device = next(self.model.parameters()).device
        if next(module.parameters()).device != device:
            module.to(device)
        return module

    @classmethod
    def collator_class(cls):
        from tpo.rlaif.collate import PromptCollator

        return PromptCollator

    def num_items(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    @property
    def updates_per_batch(self) -> int:
        return self.ppo_epochs

    def on_step(self, step: int, total_steps: int) -> None:
        self._rollouts, self._update, self._slot = [], 0, 0

    def on_update(self, index: int, updates: int) -> None:
        self._update, self._slot = index, 0

    def param_groups(self, optim_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
        groups = super().param_groups(optim_cfg)
        lr = float(self.value_lr if self.value_lr is not None else optim_cfg["lr"])
        value = group_parameters(list(self.value_model.named_parameters()), lr=lr,
                                 weight_decay=optim_cfg.get("weight_decay", 0.0),
                                 no_decay=optim_cfg.get("no_decay", ("bias", "norm")))
        for g in value:
            g["name"] = g["name"].replace("default", "value", 1)
            g["param_names"] = [f"value_model.{n}" for n in g["param_names"]]
        return groups + value

    def _token_logps(self, model: nn.Module, seq: dict[str, Any], prompt_len: int, response: torch.Tensor,
                     mask: torch.Tensor, with_entropy: bool = False):
        """Per-token log-probs ``[B, T]`` of the response under ``model`` (at
        the sampling temperature), and optionally the per-token entropy."""
        embeds = model.embed_inputs(seq["input_ids"], seq["media"], seq.get("ids"))
        hidden = model.decode(embeds, seq["attention_mask"])[:, prompt_len - 1: -1]
        head = model.llm.get_output_embeddings()
        labels = response.masked_fill(mask == 0, IGNORE_INDEX)
        logps = fused_linear_logprob(hidden, head.weight, labels, head.bias, ignore_index=IGNORE_INDEX,
                                     temperature=self.temperature, reduction="none",
                                     backend=getattr(model, "kernel_backend", "auto")).logps
        if not with_entropy:
            return logps, None
        with torch.no_grad():
            rows = hidden[mask.bool()]
            logits = (rows @ head.weight.T if head.bias is None else rows @ head.weight.T + head.bias).float()
            logp_all = torch.log_softmax(logits / self.temperature, -1)
            entropy = torch.zeros_like(logps)
            entropy[mask.bool()] = -(logp_all.exp() * logp_all).sum(-1)
        return logps, entropy

    def _reference_logps(self, seq, prompt_len, response, mask):
        if self.reference == "copy":
            return self._token_logps(self._frozen_model("reference"), seq, prompt_len, response, mask)[0]
        return self._frozen["adapter"](self._token_logps, seq, prompt_len, response, mask)[0]

    def _values(self, model: nn.Module, seq: dict[str, Any], prompt_len: int) -> torch.Tensor:
        last = seq["attention_mask"].shape[1] - 1
        out = model({**seq, "score_positions": torch.full_like(seq["attention_mask"][:, 0], last)})
        return out["values"][:, prompt_len - 1: -1]

    def _sample(self, batch: dict[str, Any], greedy: bool, max_new_tokens: int):
        policy = self.model
        was = policy.training
        policy.eval()
        try:
            kwargs = {} if greedy else dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            new = policy.generate(batch["input_ids"], batch["attention_mask"], media=batch["media"],
                                  max_new_tokens=max_new_tokens, ids=batch.get("ids"), **kwargs)
        finally:
            policy.train(was)
        tok = policy.tokenizer
        response, mask, has_eos = truncate_after_eos(new, tok.eos_token_id, tok.pad_token_id)
        seq = {"input_ids": torch.cat([batch["input_ids"], response], 1),
               "attention_mask": torch.cat([batch["attention_mask"], mask], 1),
               "media": batch["media"], "ids": batch.get("ids")}
        return seq, response, mask, has_eos

    @torch.no_grad()
    def _score(self, seq, prompt_len, mask, has_eos, max_new_tokens):
        """``(score after penalties, raw reward-model score)``, each ``[B]``."""
        rm = self._frozen_model("reward_model")
        lengths = mask.sum(1)
        positions = prompt_len + lengths - 1
        raw = rm({**seq, "score_positions": positions})["rewards"].float()
        score = raw + self.length_coef * lengths.float() / max_new_tokens
        if self.missing_eos_penalty is not None:
            score = score + (~has_eos).float() * self.missing_eos_penalty
        return score, raw

    def _qa_accuracy(self, batch, response, mask) -> torch.Tensor | None:
        refs = batch.get("references")
        if not refs or all(r is None for r in refs):
            return None
        from tpo.evaluation.metrics import qa_correct

        texts = self.model.tokenizer.batch_decode(response.masked_fill(mask == 0, self.model.tokenizer.pad_token_id),
                                                  skip_special_tokens=True)
        hits = [qa_correct(t, r["answer"], r.get("answer_type", "open"), r.get("options"))
                for t, r in zip(texts, refs) if r is not None]
        return torch.tensor(float(sum(hits)) / len(hits))

    # ------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Sample, score, shape and estimate advantages for one prompt batch."""
        prompt_len = batch["input_ids"].shape[1]
        seq, response, mask, has_eos = self._sample(batch, greedy=False, max_new_tokens=self.max_new_tokens)
        maskf = mask.float()
        # the behaviour policy's log-probs and the values without dropout (as generation ran)
        modes = [(m, m.training) for m in (self.model, self.value_model)]
        for m, _ in modes:
            m.eval()
        try:
            logps, entropy = self._token_logps(self.model, seq, prompt_len, response, mask, with_entropy=True)
            ref_logps = self._reference_logps(seq, prompt_len, response, mask)
            values = self._values(self.value_model, seq, prompt_len).float() * maskf
        finally:
            for m, was in modes:
                m.train(was)
        score, raw = self._score(seq, prompt_len, mask, has_eos, self.max_new_tokens)
        log_ratio = (logps - ref_logps) * maskf
        kl = log_ratio if self.kl_estimator == "k1" else (torch.exp(-log_ratio) - 1 + log_ratio) * maskf
        coef = float(self.kl_coef)
        rewards = -coef * kl
        last = (mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += score
        advantages, returns = gae(rewards, values, maskf, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, maskf)
        kl_seq = kl.sum(1)
        stats = {
            "objective/scores": score.mean(), "objective/rm_scores": raw.mean(),
            "objective/kl": kl_seq.mean(), "objective/kl_coef": torch.tensor(coef),
            "objective/entropy": masked_mean(entropy, maskf),
            "objective/non_score_reward": (-coef * kl_seq).mean(),
            "objective/rlhf_reward": (score - coef * kl_seq).mean(),
            "val/num_eos_tokens": has_eos.float().mean(), "response/length": maskf.sum(1).mean(),
        }
        qa = self._qa_accuracy(batch, response, mask)
        if qa is not None:
            stats["objective/qa_accuracy"] = qa
        if self.kl_ctl is not None:
            # the KL of this micro-batch on every process: all processes move the coefficient alike
            total = _all_processes_sum(torch.stack([kl_seq.sum().double(), torch.tensor(
                float(kl_seq.numel()), dtype=torch.float64, device=kl_seq.device)]))
            new = self.kl_ctl.update(coef, float(total[0] / total[1]), int(total[1]))
            self.kl_coef.fill_(new)
        return {"input_ids": seq["input_ids"], "attention_mask": seq["attention_mask"], "media": seq["media"],
                "ids": list(seq["ids"]) if seq["ids"] is not None else None, "prompt_len": prompt_len,
                "response": response, "mask": mask, "logps": logps * maskf, "values": values,
                "advantages": advantages, "returns": returns, "stats": stats}

    def _chunk_loss(self, chunk: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seq = {"input_ids": chunk["input_ids"], "attention_mask": chunk["attention_mask"], "media": chunk["media"],
               "ids": chunk["ids"]}
        p, mask = chunk["prompt_len"], chunk["mask"].float()
        logps, _ = self._token_logps(self.model, seq, p, chunk["response"], chunk["mask"])
        log_ratio = (logps - chunk["logps"]) * mask
        ratio = torch.exp(log_ratio)
        adv = chunk["advantages"]
        pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
        vpred = self._values(self.value_model, seq, p).float()
        old = chunk["values"]
        vclipped = old + (vpred - old).clamp(-self.clip_range_value, self.clip_range_value)
        v1, v2 = (vpred - chunk["returns"]) ** 2, (vclipped - chunk["returns"]) ** 2
        vf_loss = 0.5 * masked_mean(torch.maximum(v1, v2), mask)
        loss = pg_loss + self.vf_coef * vf_loss
        stats = {
            "loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(),
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "policy/clipfrac_avg": masked_mean((pg2 > pg1).float().detach(), mask),
            "val/clipfrac_avg": masked_mean((v2 > v1).float().detach(), mask),
            "val/ratio": masked_mean(ratio.detach(), mask),
        }
        return loss, stats

    # -------------------------------------------------------------- training
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The first update of a step rolls out on ``batch`` (this micro-batch
        of prompts); each update trains on those rollouts."""
        slot = self._slot
        self._slot += 1
        if self._update == 0:
            chunk = self.rollout(batch)
            self._rollouts.append((chunk, chunk.pop("stats")))
        elif slot >= len(self._rollouts):
            raise RuntimeError(f"internal error: update {self._update} of a step has more micro-batches than its "
                               "first (on_step/on_update were not called as the engine calls them)")
        chunk, stats = self._rollouts[slot]
        loss, update_stats = self._chunk_loss(chunk)
        return {"loss": loss, **stats, **update_stats}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], predict: bool = False) -> dict[str, Any]:
        """Greedy answers to the prompts: their scores, lengths, EOS rate, and
        QA data samples where the prompts carry reference answers."""
        prompt_len = batch["input_ids"].shape[1]
        seq, response, mask, has_eos = self._sample(batch, greedy=True, max_new_tokens=self.eval_max_new_tokens)
        score, raw = self._score(seq, prompt_len, mask, has_eos, self.eval_max_new_tokens)
        metrics = {"eval/scores": score.mean(), "eval/rm_scores": raw.mean(),
                   "eval/length": mask.float().sum(1).mean(), "eval/num_eos_tokens": has_eos.float().mean()}
        qa = self._qa_accuracy(batch, response, mask)
        if qa is not None:
            metrics["eval/qa_accuracy"] = qa
        tok = self.model.tokenizer
        texts = tok.batch_decode(response.masked_fill(mask == 0, tok.pad_token_id), skip_special_tokens=True)
        samples = []
        for k, (text, ref) in enumerate(zip(texts, batch.get("references") or [None] * len(texts))):
            if ref is None:
                continue
            samples.append({"id": batch["ids"][k], "prediction": text, "answer": ref["answer"],
                            "answer_type": ref.get("answer_type", "open"), "options": ref.get("options"),
                            "question_type": ref.get("question_type"), "score": float(score[k])})
        return {"metrics": {k: v.float() for k, v in metrics.items()}, "num_items": len(texts), "samples": samples}

    # ---------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], key: str = "algorithm", source=None) -> None:
        super().check_config(cfg, key, source)
        _check_options(cfg, lambda leaf: f"{key}.{leaf}", where=_where(source))
        for name in ("reward_model", "value_model"):
            spec = cfg.get(name)
            if name == "reward_model" and spec is None:
                raise KeyError(f"{key}.reward_model: missing; give dict(config=..., checkpoint=...) of the trained "
                               f"reward model{_where(source)}")
            if spec is not None:
                _check_model_spec(spec, f"{key}.{name}", _where(source))


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _all_processes_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all processes (itself in one process)."""
    if _distributed():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _check_options(cfg: Mapping[str, Any], name, where: str = "") -> None:
    checks = {
        "reference": (lambda v: v in REFERENCES, f"one of {REFERENCES}"),
        "kl_estimator": (lambda v: v in KL_ESTIMATORS, f"one of {KL_ESTIMATORS}"),
        "max_new_tokens": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
        "eval_max_new_tokens": (lambda v: v is None or (isinstance(v, int) and v > 0), "a positive int or None"),
        "ppo_epochs": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
        "temperature": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]"),
        "clip_range": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "clip_range_value": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "vf_coef": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
        "gamma": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "in [0, 1]"),
        "lam": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "in [0, 1]"),
        "kl_coef": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    }
    for field, (ok, want) in checks.items():
        if field in cfg and not ok(cfg[field]):
            raise ValueError(f"{name(field)}: must be {want}, got {cfg[field]!r}{where}")
    adaptive = cfg.get("adaptive_kl")
    if adaptive is not None and (not isinstance(adaptive, Mapping) or set(adaptive) != {"target", "horizon"}):
        raise ValueError(f"{name('adaptive_kl')}: None or dict(target=..., horizon=...), got {adaptive!r}{where}")


def _check_model_spec(spec, key: str, where: str = "") -> None:
    if not isinstance(spec, Mapping) or "config" not in spec:
        raise TypeError(f"{key}: give dict(config=<RewardModel config dict or file>, checkpoint=<folder or "
                        f".safetensors>), got {spec!r}{where}")
    unknown = set(spec) - {"config", "checkpoint", "cfg_options"}
    if unknown:
        raise KeyError(f"{key}.{sorted(unknown)[0]}: unknown key; it takes config, checkpoint, cfg_options{where}")


def _load_scored_model(spec: Mapping[str, Any], key: str) -> nn.Module:
    """A RewardModel from ``dict(config=..., checkpoint=..., cfg_options=...)``;
    with a checkpoint, the config's ``init_from`` is skipped (the checkpoint
    holds every weight)."""
    _check_model_spec(spec, current_config_key(key))
    options = dict(spec.get("cfg_options") or {})
    checkpoint = spec.get("checkpoint")
    config = spec["config"]
    if checkpoint is not None:
        if isinstance(config, Mapping) and "type" in config:
            config = {**config, "init_from": None}
        else:
            options.setdefault("model.init_from", None)
    model = build_model(config, cfg_options=options or None)
    if not hasattr(model, "value_head"):
        raise TypeError(f"{current_config_key(key)}.config: must build a RewardModel (a model with a value head), "
                        f"got {type(model).__name__}")
    if checkpoint is not None:
        from tpo.models.utils import load_model_weights

        load_model_weights(model, checkpoint)
    return model


def _check_compatible(policy: nn.Module, scorer: nn.Module, key: str) -> None:
    """The scorer reads the policy's token ids and media: same vocabulary,
    same visual tokens per frame, pixels prepared alike (size and normalisation)."""
    if policy.tokenizer.get_vocab() != scorer.tokenizer.get_vocab():
        raise ValueError(f"{current_config_key(key)}: its tokenizer differs from the policy's; PPO scores the "
                         "policy's token ids, so both must share one tokenizer")
    if policy.tokens_per_frame != scorer.tokens_per_frame:
        raise ValueError(f"{current_config_key(key)}: {scorer.tokens_per_frame} visual tokens per frame, the policy "
                         f"{policy.tokens_per_frame}; both must read the same media tokens")
    for attr in ("image_size", "image_mean", "image_std"):
        mine, theirs = getattr(policy.vision_encoder, attr), getattr(scorer.vision_encoder, attr)
        if any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(mine, theirs)):
            raise ValueError(f"{current_config_key(key)}: its vision encoder's {attr} is {tuple(theirs)}, the "
                             f"policy's {tuple(mine)}; PPO scores the policy's prepared pixels, so both must "
                             "prepare them alike")
