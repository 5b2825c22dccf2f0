"""Tokenizers: a local pretrained one, or a small byte-level BPE tokenizer
that tpo trains offline (deterministically, in well under a second) for tiny
test and demo models. Both carry a chat template and the media tokens."""
from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tpo.registry import TOKENIZERS, current_config_key

from .utils import resolve_pretrained

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
MEDIA_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN)

# Used when a tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# What the tiny tokenizer's merges are learnt from: the words of the synthetic
# benchmark and of everyday prompts. Any text still encodes (bytes are the base).
_CORPUS_WORDS = """
the a an is are was were be been it this that these those there here what which who when where why how
of in on at to from by with without into onto over under above below between left right top bottom middle
center centre first second third last next before after during while then finally begins ends enters leaves
appears disappears moves moving stays stops occludes behind front hidden visible image video frame frames
red green blue yellow orange purple white black gray grey pink brown cyan magenta colour color
circle square triangle rectangle star diamond shape shapes object objects ball box
one two three four five six seven eight nine ten zero many none some all each every both
count number how many times does do did can could would should will may might
describe answer question choose option options yes no true false correct wrong
up down toward towards away across around clockwise fast slow large small big tiny
please tell me about scene background foreground describe detail detailed
""".split()


def _training_corpus() -> list[str]:
    words = _CORPUS_WORDS
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() + "?" for w in words] + [f"{w}." for w in words]
    lines += [str(n) for n in range(0, 101)] + ["0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0"]
    return lines


def _add_media_and_chat(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure the media tokens are single special tokens and that a chat
    template and a pad token exist."""
    missing = [t for t in MEDIA_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not getattr(tokenizer, "chat_template", None):
        roles = [t for t in ROLE_TOKENS if t not in tokenizer.get_vocab()]
        if roles:
            tokenizer.add_tokens(roles, special_tokens=True)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


@TOKENIZERS.register_module()
def PretrainedTokenizer(pretrained: str, padding_side: str = "right", chat_template: str | None = None):
    """A tokenizer from a local folder (``save_pretrained`` output), with the
    media tokens added when it lacks them."""
    path = resolve_pretrained(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side=padding_side)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return _add_media_and_chat(tokenizer)


@TOKENIZERS.register_module()
def TinyTokenizer(vocab_size: int = 512, padding_side: str = "right", chat_template: str | None = None):
    """A byte-level BPE tokenizer trained offline on a small built-in corpus.

    Deterministic: the same ``vocab_size`` always gives the same vocabulary,
    so a model saved with it loads back with identical token ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>", *ROLE_TOKENS, *MEDIA_TOKENS]
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ValueError(f"{current_config_key('vocab_size')}: must be at least {minimum} (256 bytes + specials)")
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[*ROLE_TOKENS, *MEDIA_TOKENS],
        padding_side=padding_side,
    )
    tokenizer.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
    return _add_media_and_chat(tokenizer)
