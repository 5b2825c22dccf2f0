"""Judges: which of two answers to a question about a video is better.

A judge takes the media, the question, two answers and the context (a
detailed description of the media, see :mod:`tpo.rlaif.context`) and returns
a :class:`Judgement`: the preferred answer (or a tie), the probability that
the first answer is the better one, a confidence and a rationale.

Position bias: an LM judge tends to prefer the answer shown first (or
second). :meth:`Judge.__call__` asks in both orders, (x as A, y as B) and
(y as A, x as B), and averages ``P(x better)`` over the two; the judgement is
a tie when that average is within ``tie_margin`` of 1/2, and ``consistent``
says whether both orders picked the same answer.

Registered in ``tpo.registry.JUDGES``:

* :class:`RuleJudge`: reads each answer against the context, the way a
  careful reader checks a claim against a description: an answer is supported
  when its words stand in a sentence of the description next to the words of
  the question. Deterministic and free; for the synthetic benchmark, whose
  descriptions are correct and complete, it lets the whole loop run on CPU
  and its own accuracy be measured against the benchmark's answers. Without
  context it can only tell a well-formed answer from a malformed one (the
  paper's no-context ablation).
* :class:`LMJudge`: any causal LM or MLLM of the registry (the policy
  itself included, as in the paper) reads a prompt built from a template of
  the config and the verdict is read from its next-token probabilities of
  ``A`` and ``B``, optionally after a generated rationale.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from tpo.evaluation.metrics import extract_choice, normalize_answer
from tpo.registry import JUDGES, LLMS, TOKENIZERS, build_child, current_config_key

from .context import resolve_model
from .prompts import JUDGE_TEMPLATE, RATIONALE_REQUEST, VERDICT_PREFIX, check_template, render_judge_prompt

__all__ = ["Judge", "Judgement", "LMJudge", "RuleJudge", "parse_options"]


@dataclass
class Judgement:
    """The verdict on a pair ``(x, y)``.

    ``preferred``: 0 (x), 1 (y) or ``None`` (a tie); ``p_first``: P(x is
    better), averaged over the orders asked; ``confidence``: ``max(p, 1 - p)``
    in [0.5, 1]; ``consistent``: both orders agree (always true with one
    order); ``rationale``: the judge's reasons; ``orders``: each order's own
    ``p_first`` (P(the answer shown first is better)) and rationale.
    """

    preferred: int | None
    p_first: float
    confidence: float
    consistent: bool
    rationale: str
    orders: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge:
    """Base of the judges: subclasses implement :meth:`compare` (one order).

    Args:
        tie_margin: ``|P(x better) - 1/2| <= tie_margin`` is a tie.
        both_orders: ask in both orders (position-bias control).
    """

    name = "judge"

    def __init__(self, tie_margin: float = 0.0, both_orders: bool = True):
        if not isinstance(tie_margin, (int, float)) or not 0 <= tie_margin < 0.5:
            raise ValueError(f"{current_config_key('tie_margin')}: must be in [0, 0.5), got {tie_margin!r}")
        self.tie_margin = float(tie_margin)
        self.both_orders = bool(both_orders)

    def compare(self, question: str, answer_a: str, answer_b: str, context: str | None = None,
                media: torch.Tensor | None = None, media_type: str | None = None) -> tuple[float, str]:
        """``(P(answer_a is better), rationale)`` for one order."""
        raise NotImplementedError

    def __call__(self, question: str, x: str, y: str, context: str | None = None, media: torch.Tensor | None = None,
                 media_type: str | None = None) -> Judgement:
        for name, value in (("question", question), ("x", x), ("y", y)):
            if not isinstance(value, str):
                raise TypeError(f"{type(self).__name__}: {name} must be a string, got {type(value).__name__}")
        if context is not None and not isinstance(context, str):
            raise TypeError(f"{type(self).__name__}: context must be a string or None, got {type(context).__name__}")
        p1, why1 = self.compare(question, x, y, context, media, media_type)
        orders = [{"order": "xy", "p_first": float(p1), "rationale": why1}]
        p = float(p1)
        consistent = True
        if self.both_orders:
            p2, why2 = self.compare(question, y, x, context, media, media_type)
            orders.append({"order": "yx", "p_first": float(p2), "rationale": why2})
            p = 0.5 * (p1 + (1.0 - p2))
            consistent = (p1 - 0.5) * (0.5 - p2) > 0 or (p1 == 0.5 and p2 == 0.5)
        preferred = None if abs(p - 0.5) <= self.tie_margin else (0 if p > 0.5 else 1)
        rationale = why1 if len(orders) == 1 else f"[x first] {why1} [y first] {why2}"
        return Judgement(preferred, p, max(p, 1.0 - p), bool(consistent), rationale, orders)


# ------------------------------------------------------------------ rule judge

_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", re.MULTILINE)
_STOP = frozenset(
    "is are was were be been what which who whom whose where when how does do did in on at of to from by and or "
    "it its this that these those there with for as answer option options letter s video image shown show shows "
    "please tell me one word".split()
)


def parse_options(question: str) -> list[str] | None:
    """The options ``(A) ...``, ``(B) ...`` listed in a multiple-choice
    question, in letter order, or ``None``."""
    found = _OPTION_LINE.findall(question)
    if len(found) < 2:
        return None
    letters = [letter for letter, _ in found]
    if letters != [chr(65 + i) for i in range(len(letters))]:
        return None
    return [text for _, text in found]


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _tokens(text: str) -> list[str]:
    return [_stem(w) for w in normalize_answer(text).split()]


def _content(tokens: Sequence[str]) -> list[str]:
    kept = [t for t in tokens if t not in _STOP]
    return kept or list(tokens)


@JUDGES.register_module()
class RuleJudge(Judge):
    """Checks answers against the context (see the module docstring).

    Each answer gets a score: its *support* in the context (the largest, over
    the description's sentences that hold every content word of the answer,
    fraction of the question's content words within ``window`` words of the
    answer's words: 1 when the sentence ties the answer to what was asked) plus
    ``format_bonus`` when it is well formed (a multiple-choice answer names one
    of the listed options, whose text is then what is checked; an open answer
    is 1 to ``max_answer_words`` plain words). ``P(A better) = 1/2 + tanh(
    sharpness * (score_A - score_B)) / 2``.

    Args:
        window: words on each side of the answer that count as "next to".
        format_bonus: the score of a well-formed answer without support.
        max_answer_words: the longest well-formed open answer.
        sharpness: how fast the probability saturates with the score gap.
        tie_margin, both_orders: as :class:`Judge` (the rule judge has no
            position bias; both orders are still asked, as for any judge).
    """

    name = "rule"

    def __init__(self, window: int = 3, format_bonus: float = 0.25, max_answer_words: int = 8,
                 sharpness: float = 3.0, tie_margin: float = 0.0, both_orders: bool = True):
        super().__init__(tie_margin, both_orders)
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"{current_config_key('window')}: must be an int >= 0, got {window!r}")
        if not isinstance(format_bonus, (int, float)) or not 0 <= format_bonus < 1:
            raise ValueError(f"{current_config_key('format_bonus')}: must be in [0, 1), got {format_bonus!r}")
        if not isinstance(max_answer_words, int) or max_answer_words < 1:
            raise ValueError(f"{current_config_key('max_answer_words')}: must be a positive int, "
                             f"got {max_answer_words!r}")
        if not isinstance(sharpness, (int, float)) or sharpness <= 0:
            raise ValueError(f"{current_config_key('sharpness')}: must be > 0, got {sharpness!r}")
        self.window, self.format_bonus = window, float(format_bonus)
        self.max_answer_words, self.sharpness = max_answer_words, float(sharpness)

    def resolve(self, question: str, answer: str) -> tuple[str | None, str]:
        """``(the text to check or None when malformed, a note)``."""
        options = parse_options(question)
        if options is not None:
            letter = extract_choice(answer, options)
            if letter is None:
                return None, "names none of the options"
            return options[ord(letter) - 65], f"option ({letter}) {options[ord(letter) - 65]!r}"
        words = normalize_answer(answer).split()
        if not words:
            return None, "is empty"
        if len(words) > self.max_answer_words:
            return None, f"is {len(words)} words long"
        if not all(w.isascii() and w.isalnum() for w in words):
            return None, "is not plain words"
        return answer, repr(answer.strip())

    def support(self, question: str, text: str, context: str) -> tuple[float, str | None]:
        """``(support in [0, 1], the supporting sentence or None)``."""
        question = "\n".join(line for line in question.splitlines() if not _OPTION_LINE.match(line))
        asked = set(_content(_tokens(question)))
        claim = _content(_tokens(text))
        best, where = 0.0, None
        for sentence in re.split(r"(?<=[.!?])\s+", context.strip()):
            words = _tokens(sentence)
            at = [i for i, w in enumerate(words) if w in claim]
            if not at or not set(claim) <= set(words):
                continue
            near = set(words[max(0, min(at) - self.window): max(at) + self.window + 1]) - set(claim)
            score = len(near & asked) / len(asked) if asked - set(claim) else 1.0
            if score > best:
                best, where = score, sentence
        return best, where

    def score(self, question: str, answer: str, context: str | None) -> tuple[float, str]:
        text, note = self.resolve(question, answer)
        if text is None:
            return 0.0, f"it {note}"
        if not context:
            return self.format_bonus, f"{note} is well formed (no context to check it against)"
        support, sentence = self.support(question, text, context)
        if sentence is None:
            return self.format_bonus, f"{note} is well formed but the description does not state it"
        return self.format_bonus + support, f"{note} is supported ({support:.2f}) by {sentence!r}"

    def compare(self, question, answer_a, answer_b, context=None, media=None, media_type=None):
        sa, why_a = self.score(question, answer_a, context)
        sb, why_b = self.score(question, answer_b, context)
        p = 0.5 + 0.5 * math.tanh(self.sharpness * (sa - sb))
        return p, f"A: {why_a}; B: {why_b}."


# -------------------------------------------------------------------- LM judge


@JUDGES.register_module()
class LMJudge(Judge):
    """A language model as the judge: the verdict is ``softmax`` over its
    next-token logits of the two labels after the prompt (and the rationale).

    Give either ``model`` (a multimodal LLM: a ``MODELS`` config dict or file,
    or ``"policy"``: the model being sampled judges its own answers, as in the
    paper) or ``llm`` + ``tokenizer`` (a text-only causal LM of ``LLMS`` and a
    ``TOKENIZERS`` config: it judges from the question, the answers and the
    context alone).

    Args:
        model, llm, tokenizer: see above.
        checkpoint: weights for ``model`` (a ``tpo train`` checkpoint).
        template: the judge prompt (see :mod:`tpo.rlaif.prompts`).
        verdict_prefix: text after which the label is read.
        labels: the two labels the template names the answers by.
        rationale_tokens: generate a rationale of at most this many tokens
            (greedy) before the verdict; 0: none (the rationale is then the
            label probabilities).
        use_media: show the MLLM judge the media (else text only).
        tie_margin, both_orders: as :class:`Judge`.
        policy: the policy, given by ``tpo rlaif generate`` (not a config key).
    """

    name = "lm"

    def __init__(self, model=None, llm: dict | None = None, tokenizer: dict | None = None,
                 checkpoint: str | None = None, template: str = JUDGE_TEMPLATE, verdict_prefix: str = VERDICT_PREFIX,
                 labels: Sequence[str] = ("A", "B"), rationale_tokens: int = 0, use_media: bool = True,
                 tie_margin: float = 0.0, both_orders: bool = True, policy: nn.Module | None = None):
        super().__init__(tie_margin, both_orders)
        if (model is None) == (llm is None):
            raise ValueError(f"{current_config_key()}: give `model` (an MLLM config or 'policy') or `llm` + "
                             "`tokenizer` (a text-only LM), not both and not neither")
        if model is not None:
            self.model = resolve_model(model, policy, "model", checkpoint)
            for attr in ("processor", "embed_inputs", "decode", "llm"):
                if not hasattr(self.model, attr):
                    raise TypeError(f"{current_config_key('model')}: {type(self.model).__name__} is not a multimodal "
                                    f"LLM (no {attr!r}); for a text-only LM use llm=... and tokenizer=...")
            self.tokenizer = self.model.tokenizer
            self.lm = self.model.llm
            self.multimodal = True
        else:
            if tokenizer is None:
                raise ValueError(f"{current_config_key('tokenizer')}: a text-only judge needs a tokenizer config")
            if checkpoint is not None:
                raise ValueError(f"{current_config_key('checkpoint')}: only for `model`; give a text-only LM its "
                                 "weights with llm=dict(..., pretrained=FOLDER)")
            self.tokenizer = build_child(tokenizer, TOKENIZERS, "tokenizer")
            self.lm = build_child(llm, LLMS, "llm", default_args=dict(vocab_size=len(self.tokenizer)))
            self.lm.eval()
            self.model = self.lm
            self.multimodal = False
        self.template = check_template(template)
        if not isinstance(verdict_prefix, str):
            raise TypeError(f"{current_config_key('verdict_prefix')}: must be a string, got {verdict_prefix!r}")
        self.verdict_prefix = verdict_prefix
        if len(labels) != 2 or not all(isinstance(label, str) and label.strip() for label in labels):
            raise ValueError(f"{current_config_key('labels')}: two non-empty strings, got {labels!r}")
        self.labels = tuple(labels)
        self.verdict_ids, self.label_ids = self._verdict_tokens()
        if not isinstance(rationale_tokens, int) or rationale_tokens < 0:
            raise ValueError(f"{current_config_key('rationale_tokens')}: must be an int >= 0, got {rationale_tokens!r}")
        self.rationale_tokens = rationale_tokens
        self.use_media = bool(use_media)

    def _verdict_tokens(self) -> tuple[list[int], list[int]]:
        """The token ids of the verdict prefix (up to where the two labels'
        tokenisations part: a tokenizer may give the space before a label its
        own token) and the two label tokens read there."""
        a, b = (self.tokenizer(self.verdict_prefix + " " + label, add_special_tokens=False)["input_ids"]
                for label in self.labels)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            raise ValueError(f"{current_config_key('labels')}: {self.labels!r} give the same tokens after the verdict "
                             "prefix; pick labels the tokenizer tells apart")
        return list(a[:k]), [int(a[k]), int(b[k])]

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def _prompt(self, question, answer_a, answer_b, context, wording: str | None, placeholder: str | None) -> str:
        """The templated prompt; ``wording`` names the media in the text,
        ``placeholder`` (the media kind shown to an MLLM, or None) adds its token."""
        user = render_judge_prompt(self.template, question, answer_a, answer_b, context, wording)
        if self.rationale_tokens:
            user += RATIONALE_REQUEST
        if self.multimodal:
            return self.model.processor.chat_prompt(user, placeholder)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
        return user + "\n"

    def _encode(self, text: str, media: torch.Tensor | None, suffix: list[int] | None = None) -> dict[str, Any]:
        if self.multimodal:
            inputs = self.model.processor([text], [media])
        else:
            enc = self.tokenizer([text], add_special_tokens=False, return_tensors="pt")
            inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "media": [None]}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if suffix:
            ids = torch.cat([ids, torch.tensor([suffix], dtype=ids.dtype)], 1)
            mask = torch.cat([mask, torch.ones(1, len(suffix), dtype=mask.dtype)], 1)
        device = self.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "media": [None if m is None else m.to(device) for m in inputs["media"]]}

    def _last_hidden(self, inputs: dict[str, Any]) -> torch.Tensor:
        if self.multimodal:
            embeds = self.model.embed_inputs(inputs["input_ids"], inputs["media"])
            return self.model.decode(embeds, inputs["attention_mask"])[:, -1]
        embeds = self.lm.get_input_embeddings()(inputs["input_ids"])
        return self.lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state[:, -1]

    def _rationale(self, inputs: dict[str, Any]) -> str:
        if self.multimodal:
            new = self.model.generate(inputs["input_ids"], inputs["attention_mask"], media=inputs["media"],
                                      max_new_tokens=self.rationale_tokens)
        else:
            out = self.lm.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   max_new_tokens=self.rationale_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()

    @torch.no_grad()
    def compare(self, question, answer_a, answer_b, context=None, media=None, media_type=None):
        wording = media_type if media is not None else None
        pixels = None
        if self.multimodal and self.use_media and media is not None:
            if media_type not in ("image", "video"):
                raise ValueError(f"LMJudge: media_type must be 'image' or 'video' with media, got {media_type!r}")
            pixels = self.model.processor.prepare_media(media, media_type)
        was = self.model.training
        self.model.eval()
        try:
            text = self._prompt(question, answer_a, answer_b, context, wording,
                                media_type if pixels is not None else None)
            rationale = ""
            if self.rationale_tokens:
                rationale = self._rationale(self._encode(text, pixels))
                text = text + rationale + "\n"
            hidden = self._last_hidden(self._encode(text, pixels, self.verdict_ids))
            head = self.lm.get_output_embeddings()
            ids = torch.tensor(self.label_ids, device=hidden.device)
            logits = hidden.float() @ head.weight[ids].float().T
            if head.bias is not None:
                logits = logits + head.bias[ids].float()
            p = float(torch.softmax(logits[0], -1)[0])
        finally:
            self.model.train(was)
        shown = f"P({self.labels[0]})={p:.3f}, P({self.labels[1]})={1 - p:.3f}"
        return p, f"{rationale} ({shown})" if rationale else shown
