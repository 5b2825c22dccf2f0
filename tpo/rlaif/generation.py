"""``tpo rlaif generate CONFIG``: AI-feedback preference data (VLM-RLAIF stage 1).

For each prompt of a sample file the policy (the SFT model) samples
``num_samples`` answers; every pair of distinct answers goes to the judge with
the context (the detailed description of the video); each decided pair
becomes a preference sample, a line of a JSONL file in the sample format
(``docs/data_format.md``), ready for ``RewardModeling`` through
``SampleDataset`` and the preference collator::

    {"id": "<sample>-p0-2", "media": "...", "conversations": [<up to the question>],
     "preference": {"prompt": ..., "chosen": ..., "rejected": ...,
                    "judge": {"name", "rationale", "confidence", "p_chosen", "consistent", "context"}},
     "description": [...], "meta": {"task": "preference", "source_id", "candidates", "reference", ...}}

Next to ``OUT`` (say ``pairs.jsonl``) come ``pairs.judgments.jsonl`` (one
line per prompt: its answers, the context, every pair's judgement, ties
included, and with ``ablation.no_context`` the same judge's verdict without
the context) and ``pairs.summary.json`` (counts, ties, position consistency,
and, where the samples carry reference answers, the judge's agreement with
them with and without context).

One process (a launch by torchrun or accelerate launch with several processes
is refused: they would all write the same files). Resumable: a prompt's
preference lines are appended and fsynced first, then
its judgments line; a prompt counts as done when its judgments line is
complete. A rerun skips the done prompts, drops the preference lines of a
prompt that was interrupted before its judgments line (and a torn last line),
and samples each prompt from a seed derived from ``sampling.seed`` and the
sample id, so an interrupted and resumed run writes what an uninterrupted one
writes: nothing lost, nothing twice.

The config (a ``.py``/``.yaml``/``.json`` file)::

    policy = dict(config="configs/mllm/timm_mlp_llama.py", checkpoint="work_dirs/sft/checkpoints/step_00000300",
                  cfg_options=None)   # dotted overrides of the policy's config, e.g. {"model.num_frames": 2}
    data = dict(ann_file="work_dirs/synth/train.jsonl", tasks=["qa"], num_frames=None, limit=None)
    sampling = dict(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0)
    judge = dict(type="RuleJudge")            # or dict(type="LMJudge", model="policy", ...)
    context = dict(type="SampleDescription")  # or CaptionContext / ClipCaptionContext, or None
    ablation = dict(no_context=True)          # also judge every pair without the context
    collator = dict(max_prompt_length=None, system_prompt=None)
    out = "work_dirs/rlaif/pairs/train.jsonl"
    max_pairs_per_prompt = None
    log_interval = 10
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tpo.data.schema import fsync_dir, write_jsonl
from tpo.errors import CONFIG_ERRORS, print_config_error
from tpo.registry import JUDGES, build_from_cfg, config_key, load_config

from .collate import PromptCollator, question_text, reference_of
from .context import resolve_model

__all__ = ["PreferenceStore", "generate", "main", "sample_answers", "summarize"]

SECTIONS = {
    "policy": {"config": None, "checkpoint": None, "cfg_options": None},
    "data": {"ann_file": None, "tasks": None, "num_frames": None, "limit": None},
    "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0},
    "ablation": {"no_context": False},
    "collator": {"max_prompt_length": None, "system_prompt": None},
}
TOP_LEVEL = (*SECTIONS, "judge", "context", "out", "max_pairs_per_prompt", "log_interval")


# ---------------------------------------------------------------- config


def _check_config(raw: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    where = f" [config {source}]" if source else ""
    cfg: dict[str, Any] = {}
    for name in raw:
        if name.startswith("_"):
            continue
        if name not in TOP_LEVEL:
            import difflib

            close = difflib.get_close_matches(name, TOP_LEVEL, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"{name}: unknown key of a `tpo rlaif generate` config{hint} Known keys: "
                           f"{', '.join(TOP_LEVEL)}{where}")
    for section, defaults in SECTIONS.items():
        given = raw.get(section) or {}
        if not isinstance(given, Mapping):
            raise TypeError(f"{section}: must be a dict, got {type(given).__name__}{where}")
        unknown = [k for k in given if k not in defaults]
        if unknown:
            raise KeyError(f"{section}.{unknown[0]}: unknown key; {section} takes {', '.join(defaults)}{where}")
        cfg[section] = {**defaults, **dict(given)}
    if cfg["policy"]["config"] is None:
        raise KeyError(f"policy.config: missing; give the policy's model config (dict or file){where}")
    ann = cfg["data"]["ann_file"]
    if ann is None:
        raise KeyError(f"data.ann_file: missing; the prompts' sample file (JSONL){where}")
    if not Path(ann).is_file():
        raise FileNotFoundError(f"data.ann_file: {str(ann)!r} does not exist (looked from {os.getcwd()!r}); write the "
                                f"synthetic benchmark with `tpo data synth --out work_dirs/synth --num 64`{where}")
    s = cfg["sampling"]
    if not isinstance(s["num_samples"], int) or s["num_samples"] < 2:
        raise ValueError(f"sampling.num_samples: at least 2 answers per prompt make a pair, got {s['num_samples']!r}"
                         f"{where}")
    if not isinstance(s["temperature"], (int, float)) or s["temperature"] <= 0:
        raise ValueError(f"sampling.temperature: must be > 0, got {s['temperature']!r}{where}")
    if not isinstance(s["top_p"], (int, float)) or not 0 < s["top_p"] <= 1:
        raise ValueError(f"sampling.top_p: must be in (0, 1], got {s['top_p']!r}{where}")
    if not isinstance(s["max_new_tokens"], int) or s["max_new_tokens"] < 1:
        raise ValueError(f"sampling.max_new_tokens: must be a positive int, got {s['max_new_tokens']!r}{where}")
    if not isinstance(s["seed"], int) or s["seed"] < 0:
        raise ValueError(f"sampling.seed: must be an int >= 0, got {s['seed']!r}{where}")
    judge = raw.get("judge")
    if not isinstance(judge, Mapping) or "type" not in judge:
        raise KeyError(f"judge: give the judge as dict(type=...) (tpo.registry.JUDGES: RuleJudge, LMJudge){where}")
    cfg["judge"] = dict(judge)
    context = raw.get("context", None)
    if context is not None and (not isinstance(context, Mapping) or "type" not in context):
        raise TypeError(f"context: give dict(type='SampleDescription' | 'CaptionContext' | 'ClipCaptionContext', ...) "
                        f"or None, got {context!r}{where}")
    cfg["context"] = None if context is None else dict(context)
    if cfg["ablation"]["no_context"] and cfg["context"] is None:
        raise ValueError(f"ablation.no_context: the judge already works without context (context=None){where}")
    if not raw.get("out"):
        raise KeyError(f"out: missing; the preference JSONL file to write{where}")
    cfg["out"] = str(raw["out"])
    mp = raw.get("max_pairs_per_prompt")
    if mp is not None and (not isinstance(mp, int) or mp < 1):
        raise ValueError(f"max_pairs_per_prompt: a positive int or None, got {mp!r}{where}")
    cfg["max_pairs_per_prompt"] = mp
    li = raw.get("log_interval", 10)
    if not isinstance(li, int) or li < 1:
        raise ValueError(f"log_interval: a positive int, got {li!r}{where}")
    cfg["log_interval"] = li
    return cfg


def _build_part(cfg: Mapping[str, Any], key: str, policy):
    """A judge or context provider from its config; ``policy`` is passed to
    the ones that take it (a judge or captioner that is the policy)."""
    cls = JUDGES.get(cfg["type"]) if isinstance(cfg["type"], str) else cfg["type"]
    extra = {}
    if cls is not None and "policy" in inspect.signature(cls).parameters:
        if "policy" in cfg:
            raise KeyError(f"{key}.policy: not a config key (the policy is passed in); use model='policy'")
        extra["policy"] = policy
    with config_key(key):
        return build_from_cfg(cfg, JUDGES, extra)


# ---------------------------------------------------------------- files


def _side_paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".judgments.jsonl"), out.with_name(stem + ".summary.json")


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The complete JSON lines of ``path`` and how many broken ones (a torn
    last line after a crash) were found."""
    if not path.exists():
        return [], 0
    rows, broken = [], 0
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            if not text.strip():
                continue
            if not text.endswith("\n"):
                broken += 1
                continue
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError:
                broken += 1
    return rows, broken


class PreferenceStore:
    """The append-only outputs of a generation run and their recovery.

    ``open()`` reads what a previous run left, keeps the prompts whose
    judgments line is complete, removes the preference lines of any other
    prompt and any torn line (rewriting the files atomically when something is
    removed), and returns the ids of the done prompts; ``recovered`` says what
    was removed. ``add(source_id, preference_lines, judgment)`` appends and
    fsyncs the preference lines, then the judgments line.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.judgments_path, self.summary_path = _side_paths(self.out)
        self.recovered = {"dropped_preference_lines": 0, "dropped_judgment_lines": 0}

    def open(self) -> set[str]:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        judgments, broken_j = _read_jsonl(self.judgments_path)
        done = {j["id"] for j in judgments}
        if len(done) != len(judgments):
            raise ValueError(f"{self.judgments_path}: a prompt id appears twice; the file was not written by this "
                             "tool alone. Move it away to start over")
        prefs, broken_p = _read_jsonl(self.out)
        kept = [p for p in prefs if (p.get("meta") or {}).get("source_id") in done]
        expected = sum(int(j.get("written", 0)) for j in judgments)
        if len(kept) != expected:
            raise ValueError(
                f"{self.out}: holds {len(kept)} preference lines of done prompts, but {self.judgments_path} says "
                f"{expected} were written; the files do not belong together. Move both away to start over"
            )
        for path in (self.out, self.judgments_path):
            if not path.exists():  # both exist from the start, empty until something is decided
                path.touch()
                fsync_dir(path.parent)
        if broken_j:
            write_jsonl(judgments, self.judgments_path)
        if broken_p or len(kept) != len(prefs):
            write_jsonl(kept, self.out)
        self.recovered = {"dropped_preference_lines": len(prefs) - len(kept) + broken_p,
                          "dropped_judgment_lines": broken_j}
        return done

    @staticmethod
    def _append(path: Path, rows: Sequence[dict]) -> None:
        if not rows:
            return
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_dir(path.parent)

    def add(self, preference_lines: Sequence[dict], judgment: dict) -> None:
        self._append(self.out, preference_lines)
        self._append(self.judgments_path, [judgment])

    def judgments(self) -> list[dict]:
        return _read_jsonl(self.judgments_path)[0]


# ---------------------------------------------------------------- sampling


def prompt_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one prompt: a function of the run's seed and the id only."""
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def sample_answers(policy, collator: PromptCollator, item: Mapping, num_samples: int, temperature: float,
                   top_p: float, max_new_tokens: int, seed: int) -> list[str]:
    """``num_samples`` sampled answers of ``policy`` to ``item``'s last
    question, from a generator seeded with ``seed`` (the global random state is
    left as it was)."""
    batch = collator([item])
    device = next(policy.parameters()).device
    ids = batch["input_ids"].to(device).repeat(num_samples, 1)
    mask = batch["attention_mask"].to(device).repeat(num_samples, 1)
    media = [None if batch["media"][0] is None else batch["media"][0].to(device)] * num_samples
    was = policy.training
    policy.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            new = policy.generate(ids, mask, media=media, max_new_tokens=max_new_tokens, do_sample=True,
                                  temperature=temperature, top_p=top_p, ids=[item["id"]] * num_samples)
    finally:
        policy.train(was)
    return [policy.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _correct(answer: str, reference: Mapping | None) -> bool | None:
    if reference is None:
        return None
    from tpo.evaluation.metrics import qa_correct

    return bool(qa_correct(answer, reference["answer"], reference.get("answer_type", "open"),
                           reference.get("options")))


# ---------------------------------------------------------------- summary


def _agreement(pairs: Sequence[tuple[int | None, bool | None, bool | None]]) -> dict[str, Any]:
    """Agreement with the references over the informative pairs (exactly one
    answer right): the judge picks the right one, the wrong one, or ties."""
    right = wrong = tie = 0
    for preferred, cx, cy in pairs:
        if cx is None or cy is None or cx == cy:
            continue
        good = 0 if cx else 1
        if preferred is None:
            tie += 1
        elif preferred == good:
            right += 1
        else:
            wrong += 1
    n = right + wrong + tie
    return {"informative_pairs": n, "right": right, "wrong": wrong, "ties": tie,
            "accuracy": (right + 0.5 * tie) / n if n else None,
            "accuracy_decided": right / (right + wrong) if right + wrong else None}


def summarize(judgments: Sequence[Mapping]) -> dict[str, Any]:
    """Counts, ties, position consistency, confidence and the agreement with
    the references (with context, and without where the ablation was run)."""
    pairs = [p for j in judgments for p in j["pairs"]]
    n = len(pairs)
    ties = sum(p["preferred"] is None for p in pairs)
    out: dict[str, Any] = {
        "prompts": len(judgments),
        "answers": sum(len(j["answers"]) for j in judgments),
        "pairs_judged": n,
        "identical_pairs_skipped": sum(j["identical_pairs"] for j in judgments),
        "preferences_written": sum(j["written"] for j in judgments),
        "ties": ties,
        "tie_rate": ties / n if n else None,
        "position_consistency": sum(p["consistent"] for p in pairs) / n if n else None,
        "mean_confidence": sum(p["confidence"] for p in pairs) / n if n else None,
        "answers_correct": None,
    }
    flags = [c for j in judgments for c in j["correct"] if c is not None]
    if flags:
        out["answers_correct"] = sum(flags) / len(flags)
    triples = [(p["preferred"], j["correct"][p["i"]], j["correct"][p["j"]]) for j in judgments for p in j["pairs"]]
    out["agreement"] = _agreement(triples)
    nc = [(p["no_context"]["preferred"], j["correct"][p["i"]], j["correct"][p["j"]])
          for j in judgments for p in j["pairs"] if p.get("no_context") is not None]
    if nc:
        nc_pairs = [p["no_context"] for j in judgments for p in j["pairs"] if p.get("no_context") is not None]
        out["agreement_no_context"] = _agreement(nc)
        out["ties_no_context"] = sum(p["preferred"] is None for p in nc_pairs)
    return out


# ---------------------------------------------------------------- the run


def _record(sample, item: Mapping, out_dir: Path, i: int, j: int, chosen: str, rejected: str, judgement,
            judge_name: str, context_name: str | None, correct: list, reference, chosen_first: bool) -> dict:
    src = sample.to_dict(relative_to=str(out_dir))
    conv = src["conversations"]
    last_human = max(k for k, t in enumerate(conv) if t["from"] == "human")
    conv = conv[: last_human + 1]
    p_chosen = judgement.p_first if chosen_first else 1.0 - judgement.p_first
    rec: dict[str, Any] = {"id": f"{item['id']}-p{i}-{j}"}
    if "media" in src:
        rec["media"] = src["media"]
    rec["conversations"] = conv
    rec["preference"] = {
        "prompt": conv[-1]["value"], "chosen": chosen, "rejected": rejected,
        "judge": {"name": judge_name, "rationale": judgement.rationale, "confidence": round(judgement.confidence, 6),
                  "p_chosen": round(p_chosen, 6), "consistent": judgement.consistent, "context": context_name},
    }
    if "description" in src:
        rec["description"] = src["description"]
    meta = dict(src.get("meta") or {})
    rec["meta"] = {
        "task": "preference", "source_id": item["id"], "candidates": [i, j] if chosen_first else [j, i],
        "source_task": meta.get("task"), "split": meta.get("split"), "question_type": meta.get("question_type"),
        "reference": reference,
        "chosen_correct": correct[i] if chosen_first else correct[j],
        "rejected_correct": correct[j] if chosen_first else correct[i],
    }
    return rec


def generate(config, cfg_options: Mapping[str, Any] | None = None, out: str | None = None,
             stop_after: int | None = None, log=None) -> dict[str, Any]:
    """Run the generation a config describes (see the module docstring);
    returns the summary (also written to ``<out>.summary.json``).

    ``stop_after`` processes at most that many new prompts and returns (a
    clean interruption: the run resumes from there).
    """
    return _generate(prepare(config, cfg_options, out, log), stop_after)


def prepare(config, cfg_options: Mapping[str, Any] | None = None, out: str | None = None, log=None) -> dict:
    """Everything :func:`generate` needs before its first prompt: the config checked, the output
    files opened (recovering an interrupted run), the policy, data, judge and context built.
    Raises the config's errors (``KeyError``, ``TypeError``, ``ValueError``, ``FileNotFoundError``,
    naming the key) before any answer is sampled."""
    from tpo.data import SampleDataset

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise RuntimeError(
            f"tpo rlaif generate runs as one process, but it was launched as one of {world} (WORLD_SIZE={world}, "
            "torchrun or accelerate launch): every process would sample every prompt and append to the same files. "
            "Run it as a plain command; to use several devices, split data.ann_file and run one generation per part "
            "with its own --out"
        )
    source = str(config) if isinstance(config, (str, os.PathLike)) else None
    raw = load_config(config, cfg_options).to_dict()
    if out is not None:
        raw["out"] = out
    cfg = _check_config(raw, source)
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))

    store = PreferenceStore(cfg["out"])
    done = store.open()
    if any(store.recovered.values()):
        log(f"[rlaif generate] recovered from an interruption: dropped {store.recovered['dropped_preference_lines']} "
            f"preference line(s) of an unfinished prompt and {store.recovered['dropped_judgment_lines']} torn "
            "judgment line(s); they are generated again")

    with config_key("policy"):
        policy = resolve_model(cfg["policy"]["config"], None, "config", cfg["policy"]["checkpoint"],
                               cfg["policy"]["cfg_options"])
    data = cfg["data"]
    dataset = SampleDataset(data["ann_file"], num_frames=data["num_frames"], tasks=data["tasks"])
    collator = PromptCollator(policy.processor, **cfg["collator"])
    judge = _build_part(cfg["judge"], "judge", policy)
    context = None if cfg["context"] is None else _build_part(cfg["context"], "context", policy)
    judge_name = f"{type(judge).__name__}"
    context_name = None if context is None else getattr(context, "name", type(context).__name__)
    s = cfg["sampling"]
    total = len(dataset) if data["limit"] is None else min(len(dataset), int(data["limit"]))
    out_dir = store.out.parent.resolve()
    log(f"[rlaif generate] {total} prompts from {data['ann_file']} ({len(done)} already done) -> {store.out}; "
        f"{s['num_samples']} samples each, judge {judge_name}, context {context_name}")
    return dict(cfg=cfg, log=log, store=store, done=done, policy=policy, dataset=dataset, collator=collator,
                judge=judge, context=context, judge_name=judge_name, context_name=context_name, total=total,
                out_dir=out_dir)


def _generate(plan: Mapping[str, Any], stop_after: int | None) -> dict[str, Any]:
    from tpo.data.schema import validate_record

    cfg, log, store, done, total, out_dir = (plan[k] for k in ("cfg", "log", "store", "done", "total", "out_dir"))
    policy, dataset, collator, judge, context = (plan[k] for k in ("policy", "dataset", "collator", "judge", "context"))
    judge_name, context_name = plan["judge_name"], plan["context_name"]
    s = cfg["sampling"]
    started, new_prompts = time.time(), 0
    for index in range(total):
        if stop_after is not None and new_prompts >= stop_after:
            break
        sample = dataset.samples[index]
        if sample.id in done:
            continue
        item = dataset[index]
        answers = sample_answers(policy, collator, item, s["num_samples"], s["temperature"], s["top_p"],
                                 s["max_new_tokens"], prompt_seed(s["seed"], item["id"]))
        reference = reference_of(item)
        correct = [_correct(a, reference) for a in answers]
        ctx = None if context is None else context(item)
        question = question_text(item)
        pairs, lines, identical = [], [], 0
        combos = list(itertools.combinations(range(len(answers)), 2))
        for i, j in combos:
            if answers[i] == answers[j]:
                identical += 1
                continue
            if cfg["max_pairs_per_prompt"] is not None and len(pairs) >= cfg["max_pairs_per_prompt"]:
                break
            verdict = judge(question, answers[i], answers[j], ctx, item.get("media"), item.get("media_type"))
            entry = {"i": i, "j": j, **verdict.to_dict()}
            if cfg["ablation"]["no_context"]:
                bare = judge(question, answers[i], answers[j], None, item.get("media"), item.get("media_type"))
                entry["no_context"] = {k: v for k, v in bare.to_dict().items() if k != "orders"}
            pairs.append(entry)
            if verdict.preferred is None:
                continue
            first = verdict.preferred == 0
            chosen, rejected = (answers[i], answers[j]) if first else (answers[j], answers[i])
            rec = _record(sample, item, out_dir, i, j, chosen, rejected, verdict, judge_name, context_name,
                          correct, reference, first)
            _, problems = validate_record(rec, file=str(store.out), root=str(out_dir), check_media=False)
            if problems:
                raise ValueError(f"internal error: the preference record {rec['id']!r} is not a valid sample: "
                                 + "; ".join(str(p) for p in problems[:3]))
            lines.append(rec)
        store.add(lines, {"id": item["id"], "answers": answers, "correct": correct, "reference": reference,
                          "context": ctx, "context_source": context_name, "judge": judge_name, "pairs": pairs,
                          "identical_pairs": identical, "written": len(lines)})
        new_prompts += 1
        if new_prompts % cfg["log_interval"] == 0:
            log(f"[rlaif generate] {index + 1}/{total} prompts ({new_prompts} new, "
                f"{(time.time() - started) / new_prompts:.2f} s each)")

    summary = summarize(store.judgments())
    summary.update({"out": str(store.out), "judge": judge_name, "context": context_name,
                    "complete": summary["prompts"] == total, "prompts_total": total,
                    "recovered": store.recovered, "seconds_this_run": round(time.time() - started, 3)})
    tmp = store.summary_path.with_name(f".{store.summary_path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, store.summary_path)
    agr = summary["agreement"]
    line = (f"[rlaif generate] {summary['prompts']}/{total} prompts, {summary['pairs_judged']} pairs judged, "
            f"{summary['preferences_written']} preferences, {summary['ties']} ties")
    if agr["accuracy"] is not None:
        line += f"; agreement with the references {agr['accuracy']:.3f} over {agr['informative_pairs']} pairs"
    if "agreement_no_context" in summary and summary["agreement_no_context"]["accuracy"] is not None:
        line += f" ({summary['agreement_no_context']['accuracy']:.3f} without context)"
    log(line)
    return summary


# ---------------------------------------------------------------- command line


def build_parser(prog: str = "tpo rlaif") -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(prog=prog, description="AI feedback for VLM-RLAIF.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="sample answers, judge pairs, write preference JSONL (resumable)")
    p.add_argument("config", help="generation config (.py, .yaml or .json)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                   help="override config entries, e.g. sampling.num_samples=4 data.limit=100")
    p.add_argument("--out", help="the preference JSONL to write (default: the config's out)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tpo rlaif generate CONFIG [--cfg-options ...] [--out PATH]``."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        try:  # the config's errors are one line, before any answer is sampled
            plan = prepare(args.config, cfg_options=args.cfg_options, out=args.out)
        except CONFIG_ERRORS as err:
            return print_config_error("tpo rlaif generate", err)
        summary = _generate(plan, None)
        print(json.dumps(summary, indent=2))
        return 0 if summary["complete"] else 1
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
