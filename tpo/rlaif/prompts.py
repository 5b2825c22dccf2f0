"""Prompt templates of the AI-feedback stage, and their checks.

A judge template is a ``str.format`` string with the fields

* ``{question}``, ``{answer_a}``, ``{answer_b}`` (required),
* ``{context_block}``: :data:`CONTEXT_BLOCK` filled with the detailed
  description when the judge has one, else the empty string (so the same
  template serves the context-aware judge and its no-context ablation),
* ``{media}``: ``"video"``, ``"image"`` or ``"question"`` (no media).

Configs give their own template as a string (``judge=dict(type="LMJudge",
template=...)``); :func:`check_template` names a missing or unknown field.
"""
from __future__ import annotations

import string

from tpo.registry import current_config_key

REQUIRED_FIELDS = ("question", "answer_a", "answer_b")
OPTIONAL_FIELDS = ("context_block", "media")

#: What the judge is told about the media when the description is given
#: (VLM-RLAIF's context-aware feedback: the description enriches what the
#: judge understands of the video).
CONTEXT_BLOCK = (
    "Here is a detailed description of the {media}, which is correct and which you should trust:\n"
    "{context}\n"
)

#: The default judge prompt: accuracy first (grounded in the media and its
#: description), then helpfulness, naturalness and brevity, as the paper's
#: guiding prompt asks; the verdict is read from the next token after
#: :data:`VERDICT_PREFIX`.
JUDGE_TEMPLATE = (
    "You compare two answers to a question about a {media}.\n"
    "{context_block}"
    "Question: {question}\n"
    "Answer A: {answer_a}\n"
    "Answer B: {answer_b}\n"
    "Which answer is better? A good answer is accurate (it agrees with the {media}"
    " and states nothing that the {media} does not show), helpful, natural and concise."
)
VERDICT_PREFIX = "Verdict: the better answer is"
RATIONALE_REQUEST = " First explain your judgement in one sentence."

#: What a captioning model is asked, for the whole video or for each segment.
CAPTION_PROMPT = "Describe the video in detail."
CLIP_CAPTION_PROMPT = "Describe what happens in this part of the video."


def check_template(template: str, key: str = "template") -> str:
    """``template`` if it is a string using the required judge fields and no
    other; else a ValueError naming the config key and the field."""
    if not isinstance(template, str) or not template.strip():
        raise TypeError(f"{current_config_key(key)}: a judge template is a non-empty string, got {template!r}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{current_config_key(key)}: not a valid format string: {err}") from None
    unknown = sorted(f for f in fields if f not in REQUIRED_FIELDS + OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(
            f"{current_config_key(key)}: unknown field(s) {unknown}; a judge template may use "
            f"{', '.join('{' + f + '}' for f in REQUIRED_FIELDS + OPTIONAL_FIELDS)} (write literal braces as {{{{ }}}})"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise ValueError(
            f"{current_config_key(key)}: the template never shows {', '.join('{' + f + '}' for f in missing)}; "
            "a judge must see the question and both answers"
        )
    return template


def render_judge_prompt(template: str, question: str, answer_a: str, answer_b: str, context: str | None,
                        media: str | None) -> str:
    """The judge's user turn."""
    kind = media or "question"
    block = CONTEXT_BLOCK.format(media=kind, context=context.strip()) if context else ""
    return template.format(question=question.strip(), answer_a=answer_a.strip(), answer_b=answer_b.strip(),
                           context_block=block, media=kind)
