"""AI feedback for VLM-RLAIF: judges, the judge's context (detailed
descriptions of the media), prompt templates, prompt collation for sampling,
and preference generation (``tpo rlaif generate CONFIG``, :func:`main`).
Importing this package registers the judges and context providers in
``tpo.registry.JUDGES``."""
from . import collate, context, judges, prompts  # noqa: F401
from .collate import PromptCollator, prompt_messages, question_text, reference_of
from .context import CaptionContext, ClipCaptionContext, ContextProvider, SampleDescription
from .generation import PreferenceStore, generate, main, sample_answers, summarize
from .judges import Judge, Judgement, LMJudge, RuleJudge, parse_options

__all__ = [
    "CaptionContext", "ClipCaptionContext", "ContextProvider", "Judge", "Judgement", "LMJudge", "PreferenceStore",
    "PromptCollator", "RuleJudge", "SampleDescription", "generate", "main", "parse_options", "prompt_messages",
    "question_text", "reference_of", "sample_answers", "summarize",
]
