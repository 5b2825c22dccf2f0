"""Collators: :class:`~tpo.data.SampleDataset` items -> model batches.

:class:`ConversationCollator` renders an item's LLaVA-style conversation with
the tokenizer's own chat template, expands its media placeholder to the
visual token count, labels the assistant answers (and their end-of-turn
tokens) and nothing else, appends the TPO task tokens to the last answer of an
item that carries a task annotation and gathers the task heads' targets.
:class:`PreferenceCollator` makes chosen/rejected pairs for DPO-style losses.

Labels come from rendering prefixes of the conversation: the text of
``messages[:i]`` with the generation prompt, then of ``messages[:i + 1]``; the
difference is assistant turn ``i``. This needs a *prefix-stable* template (the
rendering of a conversation extends the rendering of each of its prefixes),
which is checked on every sample.

Task tokens (the contract with :class:`tpo.models.tpo_model.TPOModel`): for
each configured task the tokenizer holds a begin token ``<|task|>`` and a query
token ``<|task_query|>`` (:func:`task_tokens`). When an item carries a non-empty
annotation of the task, ``" <|task|><|task_query|>"`` ends its last answer,
before the end-of-turn tokens: the begin token is labelled (the LLM learns to
emit it), the query token is not (its hidden state is the head's query).
Tracking items also get ``" <|box|>"`` (:data:`BOX_TOKEN`) at the end of the
first user turn; its box is the batch's ``input_boxes``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .schema import IMAGE_TOKEN, VIDEO_TOKEN
from .video import frame_timestamps, uniform_indices

IGNORE_INDEX = -100
BOX_TOKEN = "<|box|>"
#: The sample annotations a task can be trained on.
ANNOTATIONS = ("boxes", "spans", "masks", "tracks")
#: The usual task names and the annotation each reads.
DEFAULT_TASKS = {"region": "boxes", "temporal": "spans", "mask": "masks", "track": "tracks"}
#: LLaVA roles -> chat-template roles (the template roles are accepted too).
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

_TASK_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PLACEHOLDER = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")


def task_tokens(task: str) -> tuple[str, str]:
    """The begin and query tokens of ``task``: ``("<|task|>", "<|task_query|>")``."""
    if not isinstance(task, str) or not _TASK_NAME.match(task):
        raise ValueError(f"a task name is a non-empty string of letters, digits, '_', '.' or '-', got {task!r}")
    return f"<|{task}|>", f"<|{task}_query|>"


def normalize_tasks(tasks: Mapping[str, Any] | Sequence[str] | None) -> dict[str, str]:
    """``{task: annotation}`` from the collators' ``tasks`` argument: ``None``
    (no tasks), a list of the default names (``region``, ``temporal``,
    ``mask``, ``track``), or ``{name: {"annotation": ...}}`` (other keys of a
    task's dict, e.g. its head config, are ignored; ``annotation`` defaults by
    name) or ``{name: annotation}``."""
    if tasks is None:
        return {}
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Mapping):
        if not isinstance(tasks, (list, tuple, set, frozenset)):
            raise TypeError(f"tasks: give a dict {{name: {{'annotation': ...}}}} or a list of names, got {tasks!r}")
        tasks = {name: {} for name in tasks}
    out: dict[str, str] = {}
    for name, spec in tasks.items():
        task_tokens(name)  # checks the name
        if isinstance(spec, str):
            annotation = spec
        elif isinstance(spec, Mapping):
            annotation = spec.get("annotation", DEFAULT_TASKS.get(name))
        else:
            raise TypeError(f"tasks.{name}: give a dict like {{'annotation': 'boxes'}}, got {spec!r}")
        if annotation is None:
            raise ValueError(
                f"tasks.{name}.annotation: {name!r} is not a default task name ({', '.join(DEFAULT_TASKS)}); "
                f"say which annotation trains it: one of {', '.join(ANNOTATIONS)}"
            )
        if annotation not in ANNOTATIONS:
            raise ValueError(f"tasks.{name}.annotation: must be one of {', '.join(ANNOTATIONS)}, got {annotation!r}")
        out[name] = annotation
    return out


def add_task_tokens(tokenizer, tasks, box_token: bool = True) -> int:
    """Add the begin/query tokens of ``tasks`` (and :data:`BOX_TOKEN`) to
    ``tokenizer`` as special tokens where missing; returns how many were added
    (resize the LLM's embeddings after adding)."""
    names = normalize_tasks(tasks)
    wanted = [tok for name in names for tok in task_tokens(name)] + ([BOX_TOKEN] if box_token else [])
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in wanted if tok not in vocab]
    return tokenizer.add_tokens(missing, special_tokens=True) if missing else 0


def _tokenizer_name(tokenizer) -> str:
    path = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({path!r})" if path else type(tokenizer).__name__


def track_prompt(boxes, valid) -> tuple[int, torch.Tensor] | None:
    """The box prompt of a track on a model's frames (``boxes [T, 4]``, ``valid [T]``): ``(the first frame
    its object is visible on, the track's own box there)``, or ``None`` when it is visible on none. Its
    ``init_box`` is not used: its ``init_frame`` may not be among the frames sampled. Training targets,
    evaluation and ``tpo chat --input-box/--input-frame`` all give a box on one of the model's frames."""
    visible = torch.as_tensor(valid).bool().nonzero()
    if not len(visible):
        return None
    first = int(visible[0, 0])
    return first, torch.as_tensor(boxes, dtype=torch.float32)[first]


def _where(sid: Any, field: str) -> str:
    return f"sample {sid!r}: field {field!r}"


@dataclass
class _Segment:
    """A piece of a rendered sequence: a prompt (unlabelled) or an answer
    (labelled up to ``label_end``; ``ids[text_start:tail_start]`` is its text,
    which truncation may shorten; before it the task tokens an answer starts
    with (``task_token_position="start"``), after it its task tokens (``"end"``)
    and end-of-turn tokens)."""

    ids: list[int]
    answer: bool
    label_end: int = 0
    tail_start: int = 0
    text_start: int = 0

    @property
    def fixed(self) -> int:
        """The tokens truncation never cuts: the answer's task and end-of-turn tokens."""
        return len(self.ids) - (self.tail_start - self.text_start)


class _ChatCollator:
    """What both collators share: media, messages, rendering, tokenising, padding."""

    def __init__(
        self,
        processor,
        max_length: int | None,
        padding_side: str,
        system_prompt: str | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        for attr in ("tokenizer", "preprocess", "tokens_per_frame", "num_frames", "expand_placeholders"):
            if not hasattr(processor, attr):
                raise TypeError(
                    f"processor: needs a MultimodalProcessor (model.processor); {type(processor).__name__} "
                    f"has no {attr!r}"
                )
        bad_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        if max_length is not None and bad_length:
            raise ValueError(f"max_length: must be a positive integer or None, got {max_length!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: must be a positive integer or None, got {pad_to_multiple_of!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt: must be a string or None, got {type(system_prompt).__name__}")
        self.processor = processor
        self.tokenizer = tok = processor.tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.system_prompt = system_prompt
        self.tokens_per_frame = int(processor.tokens_per_frame)
        self.num_frames = int(processor.num_frames)
        self.tokenizer_name = _tokenizer_name(tok)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"processor.tokenizer: {self.tokenizer_name} has no chat template; set its chat_template")
        if tok.pad_token_id is None:
            raise ValueError(f"processor.tokenizer: {self.tokenizer_name} has no pad token; set tokenizer.pad_token")
        self.pad_id = int(tok.pad_token_id)
        vocab = tok.get_vocab()
        missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"processor.tokenizer: {self.tokenizer_name} lacks the media token(s) {missing}")
        self.media_ids = frozenset(vocab[t] for t in (IMAGE_TOKEN, VIDEO_TOKEN))
        special = set(getattr(tok, "all_special_ids", []) or [])
        decoder = getattr(tok, "added_tokens_decoder", {}) or {}
        special |= {int(i) for i, added in decoder.items() if getattr(added, "special", False)}
        self.special_ids = frozenset(special)
        self._vocab = vocab
        # filled in by the conversation collator
        self.begin_ids: dict[str, int] = {}
        self.query_ids: dict[str, int] = {}
        self.box_id: int | None = None
        self._structural: frozenset[int] = frozenset()  # task/box tokens: never end-of-turn markers

    # ------------------------------------------------------------------ media
    def _media(self, item: Mapping, sid: Any):
        """``(pixels [T, 3, h, w] or None, the sampled positions in the item's
        frames or None, timestamps [T] float32 or None)``."""
        kind, media = item.get("media_type"), item.get("media")
        if media is None:
            if kind is not None:
                raise ValueError(f"{_where(sid, 'media')}: media_type is {kind!r} but the media is None")
            return None, None, None
        if not torch.is_tensor(media):
            raise TypeError(f"{_where(sid, 'media')}: must be a uint8 tensor, got {type(media).__name__}")
        if kind == "image":
            if media.dim() != 3 or media.shape[0] != 3:
                raise ValueError(f"{_where(sid, 'media')}: an image must be [3, H, W], got {list(media.shape)}")
            pixels = self.processor.preprocess(media)
            return pixels.reshape(-1, *pixels.shape[-3:])[:1], np.zeros(1, dtype=np.int64), None
        if kind == "video":
            if media.dim() != 4 or media.shape[1] != 3 or media.shape[0] == 0:
                raise ValueError(f"{_where(sid, 'media')}: a video must be [T, 3, H, W], got {list(media.shape)}")
            total = media.shape[0]
            sel = uniform_indices(total, self.num_frames)
            pixels = self.processor.preprocess(media[torch.from_numpy(sel)])
            stamps = item.get("timestamps")
            if stamps is None:
                stamps = torch.from_numpy(frame_timestamps(sel, total))
            else:
                stamps = torch.as_tensor(stamps)
                if stamps.shape != (total,):
                    raise ValueError(
                        f"{_where(sid, 'timestamps')}: has shape {list(stamps.shape)} for a video of {total} frames"
                    )
                stamps = stamps[torch.from_numpy(sel)]
            return pixels, sel, stamps.float()
        raise ValueError(f"{_where(sid, 'media_type')}: must be 'image', 'video' or None, got {kind!r}")

    # --------------------------------------------------------------- messages
    def _messages(self, item: Mapping, sid: Any) -> list[dict[str, str]]:
        conv = item.get("conversations")
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"{_where(sid, 'conversations')}: must be a non-empty list of turns, got {conv!r}")
        messages = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, Mapping):
                raise TypeError(f"{_where(sid, f'conversations[{i}]')}: a turn is a dict, got {type(turn).__name__}")
            role = turn.get("from", turn.get("role"))
            value = turn.get("value", turn.get("content"))
            if role not in ROLES:
                raise ValueError(
                    f"{_where(sid, f'conversations[{i}].from')}: unknown role {role!r}; "
                    f"use one of {', '.join(ROLES)}"
                )
            if not isinstance(value, str):
                raise TypeError(f"{_where(sid, f'conversations[{i}].value')}: must be a string, got {value!r}")
            messages.append({"role": ROLES[role], "content": value})
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _check_text(self, messages: list[dict], has_media: bool, sid: Any) -> None:
        """One placeholder in a user turn with media, none without; no task or
        box token in the data's own text."""
        count = 0
        for i, m in enumerate(messages):
            n = len(_PLACEHOLDER.findall(m["content"]))
            if n and m["role"] != "user":
                raise ValueError(
                    f"{_where(sid, 'conversations')}: a media placeholder ({IMAGE_TOKEN}/{VIDEO_TOKEN}) stands in "
                    f"a {m['role']} turn; it belongs in a user (human) turn"
                )
            count += n
            for name in self.begin_ids:
                for tok in task_tokens(name):
                    if tok in m["content"]:
                        raise ValueError(
                            f"{_where(sid, 'conversations')}: the text already holds the task token {tok}; "
                            "the collator adds task tokens from the annotations"
                        )
            if self.box_id is not None and BOX_TOKEN in m["content"]:
                raise ValueError(
                    f"{_where(sid, 'conversations')}: the text already holds {BOX_TOKEN}; "
                    "the collator adds it to tracking samples"
                )
        want = 1 if has_media else 0
        if count != want:
            raise ValueError(
                f"{_where(sid, 'conversations')}: {count} media placeholder(s) ({IMAGE_TOKEN}/{VIDEO_TOKEN}) for "
                f"{want} media item(s); put exactly one placeholder in a human turn when the sample has media"
            )

    # -------------------------------------------------------------- rendering
    def _render(self, messages: list[dict], sid: Any, generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja2 raises its own errors (and templates raise_exception)
            raise ValueError(
                f"{_where(sid, 'conversations')}: the chat template of {self.tokenizer_name} cannot render it: {err}"
            ) from err
        if not isinstance(text, str):
            raise TypeError(f"{self.tokenizer_name}.apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text

    def _not_prefix_stable(self, sid: Any, turn: int, before: str, after: str) -> ValueError:
        k = next((j for j, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        return ValueError(
            f"the chat template of tokenizer {self.tokenizer_name} is not prefix-stable: for sample {sid!r}, "
            f"the rendering up to message {turn} does not extend the rendering before it (they differ at character "
            f"{k}: {before[max(0, k - 30):k + 30]!r} vs {after[max(0, k - 30):k + 30]!r}). The collators find the "
            "labels by rendering prefixes of the conversation; give the tokenizer a template whose rendering of a "
            "conversation starts with the rendering of each of its prefixes (tokenizer chat_template=...)"
        )

    def _answer_texts(self, messages: list[dict], sid: Any) -> list[tuple[str, bool]]:
        """The rendered conversation as ``[(text, is_answer), ...]``: the
        prompt before each assistant turn, then the turn (its content and the
        template's end-of-turn text)."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if not any(p["role"] == "user" for p in messages[:i]):
                raise ValueError(f"{_where(sid, 'conversations')}: an assistant (gpt) turn comes before any user turn")
            prompt = self._render(messages[:i], sid, True)
            if not prompt.startswith(done):
                raise self._not_prefix_stable(sid, i, done, prompt)
            full = self._render(messages[: i + 1], sid, False)
            if not full.startswith(prompt):
                raise self._not_prefix_stable(sid, i, prompt, full)
            pieces.append((prompt[len(done):], False))
            pieces.append((full[len(prompt):], True))
            done = full
        return pieces

    def _expand(self, text: str, frames: int, sid: Any) -> str:
        n = len(_PLACEHOLDER.findall(text))
        return self.processor.expand_placeholders(text, [frames] * n, sample_id=sid) if n else text

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _segment(self, ids: list[int], answer: bool) -> _Segment:
        if not answer:
            return _Segment(ids, False)
        markers = [j for j, t in enumerate(ids) if t in self.special_ids and t not in self._structural]
        label_end = markers[-1] + 1 if markers else len(ids)
        tasks = [j for j, t in enumerate(ids) if t in self._structural]
        head = 0
        if tasks and tasks[0] == 0:  # the answer starts with its task tokens: its text follows the last
            head = tasks[-1] + 1
            tasks = []
        if tasks:
            tail = tasks[0]
        elif markers and markers[-1] >= head:  # the run of end-of-turn tokens the answer ends with
            tail = markers[-1]
            while tail > head and ids[tail - 1] in self.special_ids:
                tail -= 1
        else:
            tail = len(ids)
        return _Segment(ids, True, label_end, tail, head)

    def _encode(self, messages: list[dict], frames: int, sid: Any) -> list[_Segment]:
        pieces = self._answer_texts(messages, sid)
        texts = [text if answer else self._expand(text, frames, sid) for text, answer in pieces]
        return [self._segment(ids, answer) for ids, (_, answer) in zip(self._tokenize(texts), pieces)]

    def _labels(self, seg: _Segment) -> list[int]:
        if not seg.answer:
            return [IGNORE_INDEX] * len(seg.ids)
        unlabelled = self.media_ids | set(self.query_ids.values())
        if self.box_id is not None:
            unlabelled = unlabelled | {self.box_id}
        labels = [IGNORE_INDEX if t in unlabelled else t for t in seg.ids[: seg.label_end]]
        return labels + [IGNORE_INDEX] * (len(seg.ids) - seg.label_end)

    @staticmethod
    def _cut_answer(seg: _Segment, drop: int) -> _Segment:
        """``seg`` with the last ``drop`` tokens of its text removed."""
        keep = seg.tail_start - drop
        ids = seg.ids[:keep] + seg.ids[seg.tail_start:]
        return _Segment(ids, True, seg.label_end - drop, keep, seg.text_start)

    def _too_long(self, sid: Any, prompt: int, media: int, tail: int) -> ValueError:
        return ValueError(
            f"sample {sid!r}: cannot fit max_length={self.max_length}: the prompt takes {prompt} tokens "
            f"({media} of them media tokens) and the answer's task and end-of-turn tokens {tail} more, "
            f"{prompt + tail} in all, and neither media nor task tokens are ever cut; raise max_length, "
            "sample fewer frames or shorten the prompt"
        )

    def _check_media_tokens(self, ids: list[int], frames: int, sid: Any) -> None:
        have = sum(1 for t in ids if t in self.media_ids)
        want = frames * self.tokens_per_frame
        if have != want:
            raise ValueError(
                f"{_where(sid, 'conversations')}: the tokenised text holds {have} media tokens but the media gives "
                f"{want} ({frames} frame(s) x {self.tokens_per_frame}); the tokenizer {self.tokenizer_name} must "
                f"keep {IMAGE_TOKEN}/{VIDEO_TOKEN} as single tokens"
            )

    # ---------------------------------------------------------------- padding
    def _pad(self, seqs: list[list[int]], labels: list[list[int]]):
        longest = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        label_t = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(n, longest, dtype=torch.long)
        offsets = []
        for b, (s, lab) in enumerate(zip(seqs, labels)):
            start = longest - len(s) if self.padding_side == "left" else 0
            input_ids[b, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
            label_t[b, start : start + len(s)] = torch.tensor(lab, dtype=torch.long)
            attention[b, start : start + len(s)] = 1
            offsets.append(start)
        return input_ids, attention, label_t, offsets


class ConversationCollator(_ChatCollator):
    """Dataset items -> a batch for ``model(batch)`` (SFT and TPO).

    Args:
        processor: the model's :class:`~tpo.models.processor.MultimodalProcessor`
            (``model.processor``; the engine passes it in).
        max_length: the longest sequence (tokens, media tokens included), or
            ``None``. A longer sample first loses whole trailing turns (its task
            tokens move to the last answer kept); if its first exchange alone is
            too long, its answer's text is cut (its task and end-of-turn tokens
            stay). Media and task tokens are never cut: when the prompt alone
            is too long the collator raises a ``ValueError``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        tasks: the tasks the model has heads for: ``{name: {"annotation":
            "boxes" | "spans" | "masks" | "tracks"}}`` or a list of default names
            (``region``: boxes, ``temporal``: spans, ``mask``: masks, ``track``:
            tracks); ``None``: no task tokens.
        system_prompt: a system turn put first in conversations without one.
        strict_tasks: an item with an annotation no configured task reads is
            an error (by default it is a plain conversation sample).
        pad_to_multiple_of: pad the length up to a multiple of this.
        task_token_position: ``"end"`` (after the answer's text) or ``"start"``
            (before it: the model emits the task token first, and the head's
            result is there before any text is generated).

    Returns a dict:

    * ``input_ids``, ``attention_mask``, ``labels``: long ``[B, L]`` (labels
      ``-100`` on system/user turns, template text, media and query tokens and
      padding; set on the answers, their end-of-turn tokens and task begin tokens)
    * ``media``: per item ``[T, 3, h, w]`` (a video's frames sampled uniformly
      to ``processor.num_frames``), ``[1, 3, h, w]`` (an image) or ``None``
    * ``ids``: the item ids; ``timestamps``: per item float32 ``[T]`` (the
      sampled frames' normalised times) or ``None``
    * ``task_targets``: ``{task: {"index" [n] (batch rows, ascending), "ids",
      "query_position" [n] (the query token's column), ...}}`` for every
      configured task, with per annotation: boxes: ``boxes [n, 4]``, ``frame
      [n]`` (the box's position among the sampled frames; 0 for an image);
      spans: ``spans [n, 2]``; masks: ``masks [n, T, H, W]`` bool and
      ``frame_valid [n, T]`` (frames padded to the longest, invalid), ``sizes
      [n, 2]`` (each mask's own H, W; masks of other sizes are resized, nearest,
      to the largest H and W); tracks: ``init_boxes [n, 4]`` and
      ``init_frames [n]`` (the box prompt, :func:`track_prompt`), ``boxes [n,
      T, 4]``, ``valid [n, T]``
    * ``input_boxes [n, 4]``, ``input_box_index [n]`` (batch rows),
      ``input_box_position [n]`` (the ``<|box|>`` token's column): the tracking
      prompts, in order of occurrence
    * ``num_truncated`` (items truncated), ``truncated_turns [B]`` (messages
      dropped), ``truncated_tokens [B]``, ``num_tokens`` (labelled tokens)
    * ``assign_mask`` bool ``[B, L]`` (with ``tasks`` only): the labelled
      positions where the model decides whether an answer needs a task: each
      task begin token, and in every answer without one the token a begin
      token would take (its first token with ``task_token_position="start"``,
      its end-of-turn token with ``"end"``). The task-assignment loss is taken
      there, so answering in plain text is learnt as a decision too, not only
      emitting a task token.

    A task annotation counts when it is non-empty on the sampled frames (a
    box, a span, a mask with a foreground pixel on a valid frame, a track
    visible on a frame); only the first box, span and track are used. An item
    whose conversation ends with a human turn and has a preference pair is
    trained on the chosen answer.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = 2048,
        padding_side: str = "right",
        tasks: Mapping[str, Any] | Sequence[str] | None = None,
        system_prompt: str | None = None,
        strict_tasks: bool = False,
        pad_to_multiple_of: int | None = None,
        task_token_position: str = "end",
    ):
        super().__init__(processor, max_length, padding_side, system_prompt, pad_to_multiple_of)
        if task_token_position not in ("end", "start"):
            raise ValueError(f"collator.task_token_position: use 'end' or 'start', got {task_token_position!r}")
        self.task_token_position = task_token_position
        self.tasks = normalize_tasks(tasks)
        self.strict_tasks = bool(strict_tasks)
        for name in self.tasks:
            for token, table in zip(task_tokens(name), (self.begin_ids, self.query_ids)):
                if token not in self._vocab:
                    raise ValueError(
                        f"tasks.{name}: the tokenizer {self.tokenizer_name} has no {token} token; the TPO model adds "
                        "its task tokens when it is built (or call tpo.data.collate.add_task_tokens(tokenizer, tasks) "
                        "and resize the LLM's embeddings)"
                    )
                table[name] = self._vocab[token]
        if "tracks" in self.tasks.values():
            if BOX_TOKEN not in self._vocab:
                raise ValueError(
                    f"tasks: the tokenizer {self.tokenizer_name} has no {BOX_TOKEN} token, which tracking samples "
                    "need for their input box (the TPO model adds it)"
                )
            self.box_id = self._vocab[BOX_TOKEN]
        structural = set(self.begin_ids.values()) | set(self.query_ids.values())
        if self.box_id is not None:
            structural.add(self.box_id)
        self._structural = frozenset(structural)

    # ------------------------------------------------------------ annotations
    @staticmethod
    def _annotations(item: Mapping, sel: np.ndarray | None, sid: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The item's non-empty annotations on its sampled frames (``sel``:
        positions in the item's frames; ``[0]`` for an image)."""
        video = item.get("media_type") == "video"
        found: dict[str, dict[str, torch.Tensor]] = {}
        position = {} if sel is None else {int(p): j for j, p in enumerate(sel)}

        def needs_media(field: str) -> None:
            if sel is None:
                raise ValueError(f"{_where(sid, field)}: an annotation needs media, and the sample has none")

        boxes = item.get("boxes")
        if boxes is not None and len(boxes):
            needs_media("boxes")
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"{_where(sid, 'boxes')}: must be [N, 4] xyxy, got {list(boxes.shape)}")
            frames = item.get("box_frames")
            frames = torch.zeros(len(boxes), dtype=torch.long) if frames is None else torch.as_tensor(frames)
            if frames.shape != (len(boxes),):
                raise ValueError(f"{_where(sid, 'box_frames')}: has shape {list(frames.shape)} for {len(boxes)} boxes")
            for n, f in enumerate(frames.tolist()):
                if int(f) in position:
                    found["boxes"] = {"boxes": boxes[n], "frame": torch.tensor(position[int(f)])}
                    break
        spans = item.get("spans")
        if spans is not None and len(spans):
            needs_media("spans")
            spans = torch.as_tensor(spans, dtype=torch.float32)
            if spans.dim() != 2 or spans.shape[1] != 2:
                raise ValueError(f"{_where(sid, 'spans')}: must be [S, 2] (start, end), got {list(spans.shape)}")
            found["spans"] = {"spans": spans[0]}
        masks = item.get("masks")
        if masks is not None:
            needs_media("masks")
            masks = torch.as_tensor(masks).bool()
            if not video:
                if masks.dim() != 2:
                    raise ValueError(f"{_where(sid, 'masks')}: an image's mask must be [H, W], got {list(masks.shape)}")
                masks, valid = masks[None], torch.ones(1, dtype=torch.bool)
            else:
                total = item["media"].shape[0]
                if masks.dim() != 3 or masks.shape[0] != total:
                    raise ValueError(
                        f"{_where(sid, 'masks')}: a video's masks must be [T, H, W] with T = {total} frames, "
                        f"got {list(masks.shape)}"
                    )
                valid = item.get("mask_valid")
                valid = torch.ones(total, dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool()
                if valid.shape != (total,):
                    raise ValueError(f"{_where(sid, 'mask_valid')}: must be [{total}], got {list(valid.shape)}")
                index = torch.from_numpy(sel)
                masks, valid = masks[index], valid[index]
            if (valid & masks.flatten(1).any(1)).any():
                found["masks"] = {"masks": masks, "frame_valid": valid}
        tracks = item.get("tracks") or []
        if tracks:
            needs_media("tracks")
            if not video:
                raise ValueError(f"{_where(sid, 'tracks')}: tracks need a video")
            track = tracks[0]
            total = item["media"].shape[0]
            tboxes = torch.as_tensor(track["boxes"], dtype=torch.float32)
            tvalid = torch.as_tensor(track["valid"]).bool()
            if tboxes.shape != (total, 4) or tvalid.shape != (total,):
                raise ValueError(
                    f"{_where(sid, 'tracks[0]')}: needs boxes [{total}, 4] and valid [{total}], got "
                    f"{list(tboxes.shape)} and {list(tvalid.shape)}"
                )
            index = torch.from_numpy(sel)
            boxes, valid = tboxes[index], tvalid[index]
            prompt = track_prompt(boxes, valid)
            if prompt is not None:
                found["tracks"] = {"init_boxes": prompt[1], "init_frames": prompt[0], "boxes": boxes, "valid": valid}
        return found

    # -------------------------------------------------------------- one item
    def _prepare(self, item: Mapping) -> dict[str, Any]:
        if not isinstance(item, Mapping) or "id" not in item:
            raise TypeError(f"a collator takes SampleDataset items (dicts with an 'id'), got {type(item).__name__}")
        sid = item["id"]
        pixels, sel, stamps = self._media(item, sid)
        frames = 0 if pixels is None else int(pixels.shape[0])
        messages = self._messages(item, sid)
        if messages[-1]["role"] != "assistant":
            pref = item.get("preference")
            if not isinstance(pref, Mapping) or not isinstance(pref.get("chosen"), str):
                raise ValueError(
                    f"{_where(sid, 'conversations')}: ends with a {messages[-1]['role']} turn and the sample has no "
                    "preference pair; a training conversation ends with a gpt turn"
                )
            messages.append({"role": "assistant", "content": pref["chosen"]})
        self._check_text(messages, pixels is not None, sid)
        found = self._annotations(item, sel, sid)
        if self.strict_tasks:
            read = set(self.tasks.values())
            stray = [a for a in found if a not in read]
            if stray:
                raise ValueError(
                    f"{_where(sid, stray[0])}: the sample has {stray[0]} but no configured task reads them "
                    f"(tasks: {dict(self.tasks) or 'none'}); strict_tasks=True makes this an error"
                )
        tasks = [name for name, annotation in self.tasks.items() if annotation in found]
        if any(self.tasks[name] == "tracks" for name in tasks):
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first_user] = dict(messages[first_user], content=messages[first_user]["content"] + f" {BOX_TOKEN}")
        return {"sid": sid, "pixels": pixels, "frames": frames, "stamps": stamps, "messages": messages,
                "tasks": tasks, "found": found}

    def _with_tasks(self, messages: list[dict], tasks: list[str]) -> list[dict]:
        """``messages`` with the task tokens at the end (or, with
        ``task_token_position="start"``, at the start) of the last assistant turn."""
        if not tasks:
            return messages
        tokens = ["".join(pair) for pair in map(task_tokens, tasks)]
        out = list(messages)
        content = out[-1]["content"]
        if self.task_token_position == "start":
            content = " ".join(tokens) + " " + content
        else:
            content = content + "".join(f" {t}" for t in tokens)
        out[-1] = dict(out[-1], content=content)
        return out

    def _fit(self, p: dict[str, Any], segments: list[_Segment]) -> tuple[list[_Segment], int, int]:
        """Truncate to ``max_length``: ``(segments, messages dropped, tokens dropped)``."""
        total = sum(len(s.ids) for s in segments)
        if self.max_length is None or total <= self.max_length:
            return segments, 0, 0
        sid, messages = p["sid"], p["messages"]
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        kept = len(answers)
        while kept > 1 and sum(len(s.ids) for s in segments) > self.max_length:
            kept -= 1
            if p["tasks"]:  # the task tokens move to the last answer kept
                kept_messages = self._with_tasks(messages[: answers[kept - 1] + 1], p["tasks"])
                segments = self._encode(kept_messages, p["frames"], sid)
            else:  # prefix-stable: the first exchanges are the first segments
                segments = segments[: 2 * kept]
        dropped = len(messages) - (answers[kept - 1] + 1)
        length = sum(len(s.ids) for s in segments)
        if length > self.max_length:
            prompt, answer = segments[0], segments[1]
            over = length - self.max_length
            if over > answer.tail_start - answer.text_start:
                media = sum(1 for t in prompt.ids if t in self.media_ids)
                raise self._too_long(sid, len(prompt.ids), media, answer.fixed)
            segments = [prompt, self._cut_answer(answer, over)]
        return segments, dropped, total - sum(len(s.ids) for s in segments)

    # ------------------------------------------------------------------ batch
    def __call__(self, items: Sequence[Mapping]) -> dict[str, Any]:
        if not items:
            raise ValueError("the collator got an empty list of items")
        prepared = [self._prepare(item) for item in items]
        # render every item, then tokenise all pieces in one call
        pieces, owners = [], []
        for b, p in enumerate(prepared):
            for text, answer in self._answer_texts(self._with_tasks(p["messages"], p["tasks"]), p["sid"]):
                pieces.append((text if answer else self._expand(text, p["frames"], p["sid"]), answer))
                owners.append(b)
        encoded = self._tokenize([text for text, _ in pieces])
        per_item: list[list[_Segment]] = [[] for _ in prepared]
        for b, ids, (_, answer) in zip(owners, encoded, pieces):
            per_item[b].append(self._segment(ids, answer))

        seqs, labels, turns, cut, decisions = [], [], [], [], []
        for p, segments in zip(prepared, per_item):
            segments, dropped, removed = self._fit(p, segments)
            ids = [t for s in segments for t in s.ids]
            self._check_media_tokens(ids, p["frames"], p["sid"])
            seqs.append(ids)
            labels.append([t for s in segments for t in self._labels(s)])
            turns.append(dropped)
            cut.append(removed)
            if self.tasks:
                decisions.append(self._decisions(segments, p["sid"]))
        input_ids, attention_mask, label_t, offsets = self._pad(seqs, labels)
        ids = [p["sid"] for p in prepared]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_t,
            "media": [p["pixels"] for p in prepared],
            "ids": ids,
            "timestamps": [p["stamps"] for p in prepared],
        }
        batch["task_targets"] = self._targets(prepared, seqs, offsets)
        batch.update(self._input_boxes(prepared, seqs, offsets))
        batch["num_truncated"] = sum(1 for t, c in zip(turns, cut) if t or c)
        batch["truncated_turns"] = torch.tensor(turns, dtype=torch.long)
        batch["truncated_tokens"] = torch.tensor(cut, dtype=torch.long)
        batch["num_tokens"] = int((label_t != IGNORE_INDEX).sum())
        if self.tasks:
            assign = torch.zeros_like(label_t, dtype=torch.bool)
            for b, (positions, start) in enumerate(zip(decisions, offsets)):
                assign[b, [start + j for j in positions]] = True
            batch["assign_mask"] = assign & (label_t != IGNORE_INDEX)
        return batch

    def _decisions(self, segments: list[_Segment], sid: Any) -> list[int]:
        """The positions (in the item's unpadded sequence) of its task
        decisions: every begin token, and for each answer without one, where
        the first would be."""
        begins = set(self.begin_ids.values())
        out, at = [], 0
        for seg in segments:
            if seg.answer:
                where = 0 if self.task_token_position == "start" else seg.tail_start  # of the first begin token
                found = [at + j for j, t in enumerate(seg.ids[: seg.label_end]) if t in begins]
                if found and found[0] - at != where:
                    raise ValueError(
                        f"{_where(sid, 'conversations')}: the answer's first task token is its token "
                        f"{found[0] - at}, where task_token_position={self.task_token_position!r} puts it at "
                        f"{where}; the chat template adds text around the answer's content, which the "
                        "task-assignment decision cannot be placed by (use a template whose generation prompt ends "
                        "where the answer starts)"
                    )
                out += found or ([at + where] if where < seg.label_end else [])
            at += len(seg.ids)
        return out

    def _position(self, seq: list[int], token: int, sid: Any, name: str) -> int:
        where = [j for j, t in enumerate(seq) if t == token]
        if len(where) != 1:
            raise ValueError(
                f"{_where(sid, 'conversations')}: expected one {name} token after collation, found {len(where)}"
            )
        return where[0]

    def _targets(self, prepared: list[dict], seqs: list[list[int]], offsets: list[int]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, annotation in self.tasks.items():
            rows = [b for b, p in enumerate(prepared) if name in p["tasks"]]
            query = task_tokens(name)[1]
            target: dict[str, Any] = {
                "index": torch.tensor(rows, dtype=torch.long),
                "ids": [prepared[b]["sid"] for b in rows],
                "query_position": torch.tensor(
                    [offsets[b] + self._position(seqs[b], self.query_ids[name], prepared[b]["sid"], query)
                     for b in rows],
                    dtype=torch.long,
                ),
            }
            values = [prepared[b]["found"][annotation] for b in rows]
            if annotation == "boxes":
                target["boxes"] = torch.stack([v["boxes"] for v in values]) if values else torch.zeros(0, 4)
                target["frame"] = torch.tensor([int(v["frame"]) for v in values], dtype=torch.long)
            elif annotation == "spans":
                target["spans"] = torch.stack([v["spans"] for v in values]) if values else torch.zeros(0, 2)
            elif annotation == "masks":
                target.update(self._stack_masks([v["masks"] for v in values], [v["frame_valid"] for v in values]))
            else:
                target["init_boxes"] = torch.stack([v["init_boxes"] for v in values]) if values else torch.zeros(0, 4)
                target["init_frames"] = torch.tensor([v["init_frames"] for v in values], dtype=torch.long)
                frames = max((len(v["valid"]) for v in values), default=0)
                boxes = torch.zeros(len(values), frames, 4)
                valid = torch.zeros(len(values), frames, dtype=torch.bool)
                for i, v in enumerate(values):
                    boxes[i, : len(v["valid"])] = v["boxes"]
                    valid[i, : len(v["valid"])] = v["valid"]
                target["boxes"], target["valid"] = boxes, valid
            out[name] = target
        return out

    @staticmethod
    def _stack_masks(masks: list[torch.Tensor], valid: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = torch.tensor([list(m.shape[-2:]) for m in masks], dtype=torch.long).reshape(-1, 2)
        if not masks:
            return {"masks": torch.zeros(0, 0, 0, 0, dtype=torch.bool),
                    "frame_valid": torch.zeros(0, 0, dtype=torch.bool), "sizes": sizes}
        frames = max(m.shape[0] for m in masks)
        h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        out = torch.zeros(len(masks), frames, h, w, dtype=torch.bool)
        frame_valid = torch.zeros(len(masks), frames, dtype=torch.bool)
        for i, (m, v) in enumerate(zip(masks, valid)):
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m[None].float(), size=(h, w), mode="nearest")[0] > 0.5
            out[i, : m.shape[0]] = m
            frame_valid[i, : m.shape[0]] = v
        return {"masks": out, "frame_valid": frame_valid, "sizes": sizes}

    def _input_boxes(self, prepared: list[dict], seqs: list[list[int]], offsets: list[int]) -> dict[str, torch.Tensor]:
        boxes, index, position = [], [], []
        track_tasks = [name for name, annotation in self.tasks.items() if annotation == "tracks"]
        for b, p in enumerate(prepared):
            if any(name in p["tasks"] for name in track_tasks):
                boxes.append(p["found"]["tracks"]["init_boxes"])
                index.append(b)
                position.append(offsets[b] + self._position(seqs[b], self.box_id, p["sid"], BOX_TOKEN))
        return {
            "input_boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
            "input_box_index": torch.tensor(index, dtype=torch.long),
            "input_box_position": torch.tensor(position, dtype=torch.long),
        }


class PreferenceCollator(_ChatCollator):
    """Preference items -> chosen and rejected sequences in one batch (DPO,
    reward models).

    Args:
        processor: the model's processor (``model.processor``).
        max_length: the longest sequence, or ``None``; a longer answer's text is
            cut (its end-of-turn tokens stay); a prompt (with its media) that
            alone is too long raises a ``ValueError``.
        padding_side: ``"right"`` or ``"left"``.
        system_prompt: a system turn put first in conversations without one.
        pad_to_multiple_of: pad the length up to a multiple of this.

    Each item needs ``preference = {"prompt", "chosen", "rejected"}``; its
    conversation up to its last human turn (which equals the prompt) is the
    context, rendered once and shared by both answers. Returns ``input_ids``,
    ``attention_mask``, ``labels`` ``[2B, L]`` (rows ``0..B-1`` chosen, ``B..2B-1``
    rejected; labels on the answer and its end-of-turn tokens only), ``media``
    and ``timestamps`` (``2B``: the same tensor object for both rows of a pair),
    ``ids`` (``2B``), ``num_pairs`` (``B``), ``num_truncated`` (rows whose
    answer was cut), ``truncated_tokens [2B]`` and ``num_tokens``.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = 2048,
        padding_side: str = "right",
        system_prompt: str | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        super().__init__(processor, max_length, padding_side, system_prompt, pad_to_multiple_of)

    def _pair(self, item: Mapping) -> dict[str, Any]:
        if not isinstance(item, Mapping) or "id" not in item:
            raise TypeError(f"a collator takes SampleDataset items (dicts with an 'id'), got {type(item).__name__}")
        sid = item["id"]
        pref = item.get("preference")
        if pref is None:
            raise ValueError(f"{_where(sid, 'preference')}: the preference collator needs a preference pair, "
                             "and the sample has none")
        if not isinstance(pref, Mapping):
            raise TypeError(
                f"{_where(sid, 'preference')}: must be a dict with prompt, chosen and rejected, got {pref!r}"
            )
        for key in ("prompt", "chosen", "rejected"):
            if pref.get(key) is None:
                raise ValueError(f"{_where(sid, f'preference.{key}')}: missing")
            if not isinstance(pref[key], str):
                raise TypeError(f"{_where(sid, f'preference.{key}')}: must be a string, got {pref[key]!r}")
        pixels, _, stamps = self._media(item, sid)
        frames = 0 if pixels is None else int(pixels.shape[0])
        messages = self._messages(item, sid)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError(f"{_where(sid, 'conversations')}: has no human turn for the preference prompt")
        context = messages[: users[-1] + 1]
        if context[-1]["content"].strip() != pref["prompt"].strip():
            raise ValueError(
                f"{_where(sid, 'preference.prompt')}: differs from the last human turn "
                f"({pref['prompt']!r} vs {context[-1]['content']!r})"
            )
        self._check_text(context, pixels is not None, sid)
        prompt = self._render(context, sid, True)
        answers = []
        for key in ("chosen", "rejected"):
            full = self._render(context + [{"role": "assistant", "content": pref[key]}], sid, False)
            if not full.startswith(prompt):
                raise self._not_prefix_stable(sid, len(context), prompt, full)
            answers.append(full[len(prompt):])
        return {"sid": sid, "pixels": pixels, "frames": frames, "stamps": stamps,
                "texts": [self._expand(prompt, frames, sid), *answers]}

    def __call__(self, items: Sequence[Mapping]) -> dict[str, Any]:
        if not items:
            raise ValueError("the collator got an empty list of items")
        pairs = [self._pair(item) for item in items]
        encoded = self._tokenize([text for p in pairs for text in p["texts"]])
        rows: list[list[int]] = [[], []]
        labels: list[list[list[int]]] = [[], []]
        cut: list[list[int]] = [[], []]
        for k, p in enumerate(pairs):
            prompt = encoded[3 * k]
            self._check_media_tokens(prompt, p["frames"], p["sid"])
            for side in (0, 1):
                answer = self._segment(encoded[3 * k + 1 + side], True)
                over = 0 if self.max_length is None else len(prompt) + len(answer.ids) - self.max_length
                if over > 0:
                    if over > answer.tail_start - answer.text_start:
                        media = sum(1 for t in prompt if t in self.media_ids)
                        raise self._too_long(p["sid"], len(prompt), media, answer.fixed)
                    answer = self._cut_answer(answer, over)
                rows[side].append(prompt + answer.ids)
                labels[side].append([IGNORE_INDEX] * len(prompt) + self._labels(answer))
                cut[side].append(max(over, 0))
        input_ids, attention_mask, label_t, _ = self._pad(rows[0] + rows[1], labels[0] + labels[1])
        media = [p["pixels"] for p in pairs]
        stamps = [p["stamps"] for p in pairs]
        ids = [p["sid"] for p in pairs]
        truncated = cut[0] + cut[1]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_t,
            "media": media + media,
            "ids": ids + ids,
            "timestamps": stamps + stamps,
            "num_pairs": len(pairs),
            "num_truncated": sum(1 for c in truncated if c),
            "truncated_tokens": torch.tensor(truncated, dtype=torch.long),
            "num_tokens": int((label_t != IGNORE_INDEX).sum()),
        }


COLLATORS = {"ConversationCollator": ConversationCollator, "PreferenceCollator": PreferenceCollator}


def build_collator(cfg: Mapping[str, Any], processor):
    """A collator from a config dict ``dict(type="ConversationCollator" |
    "PreferenceCollator", **arguments)``; ``processor`` is the model's."""
    import inspect

    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ValueError(f"collator: give a dict with a 'type' ({' or '.join(COLLATORS)}), got {cfg!r}")
    args = dict(cfg)
    kind = args.pop("type")
    cls = COLLATORS.get(kind) if isinstance(kind, str) else kind if kind in COLLATORS.values() else None
    if cls is None:
        raise KeyError(f"collator.type: unknown collator {kind!r}; use one of {', '.join(COLLATORS)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "processor"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise KeyError(
            f"collator.{unknown[0]}: {cls.__name__} got an unexpected argument; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    return cls(processor, **args)
