"""The MLLM in TPO mode: learnable task tokens route the LLM's hidden state to
dense task heads (Yan et al., 2024, "Task Preference Optimization").

For each task (``region``, ``temporal``, ``mask``, ``track``, or any name with
a registered head) the tokenizer holds a *begin* token ``<|task|>``, which the
LLM learns to emit (task assignment), and a *query* token ``<|task_query|>``
that follows it: its input embedding is replaced by the task's learnable
embedding, and the LLM's last hidden state there is the head's query. A box
given as input (a tracking prompt) stands at a ``<|box|>`` token whose
embedding is the box encoder's output.

``forward(batch)`` returns ``{"loss", "losses": {"lm", "assign", "region.l1",
...}, "predictions": {task: ...}, "hidden_states"}``; ``predict`` generates
text and, whenever a begin token is emitted, runs that task's head.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

# The token names are the collators' contract (tpo.data.collate).
from tpo.data.collate import ANNOTATIONS, BOX_TOKEN, task_tokens
from tpo.data.collate import DEFAULT_TASKS as DEFAULT_ANNOTATIONS
from tpo.registry import MODELS, TASK_HEADS, build_child, current_config_key

from .mllm import IGNORE_INDEX, MultimodalLLM


def _same_numbers(given: Any, want: tuple[float, ...]) -> bool:
    try:
        return len(given) == len(want) and all(math.isclose(float(a), b, abs_tol=1e-6) for a, b in zip(given, want))
    except (TypeError, ValueError):
        return False


@MODELS.register_module()
class TPOModel(MultimodalLLM):
    """A :class:`MultimodalLLM` with task tokens and task heads.

    Args:
        tasks: ``{name: dict(head=dict(type=...), annotation="boxes", weight=1.0)}``;
            ``annotation`` (which sample field trains the head) defaults by name
            (region: boxes, temporal: spans, mask: masks, track: tracks);
            ``weight`` scales the head's total loss. A head that reads the
            images or videos (a ``Sam2MaskHead``) gets them as the vision
            encoder normalised them: its ``input_mean``/``input_std`` default
            to the encoder's ``image_mean``/``image_std``.
        assign_weight: weight of the task-assignment loss, reported apart
            from ``lm``: the LM loss at the task decisions the collator marks
            in ``batch["assign_mask"]`` (each begin token, and in answers
            without one the token in its place, so that not emitting a task
            token is learnt with the same weight); on the begin tokens alone
            when the batch has no mask.
        box_encoder: config of the encoder of input boxes (``BoxEncoder``), or
            ``None`` when no task takes a box prompt.
        **kwargs: the :class:`MultimodalLLM` arguments.
    """

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        assign_weight: float = 1.0,
        box_encoder: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError(f"{current_config_key('tasks')}: give at least one task, e.g. region=dict(head=...)")
        self.task_specs: dict[str, dict[str, Any]] = {}
        for name, spec in tasks.items():
            if not isinstance(spec, Mapping) or "head" not in spec:
                raise KeyError(f"{current_config_key(f'tasks.{name}')}: needs a 'head' config, e.g. head=dict(type='RegionHead')")
            unknown = set(spec) - {"head", "annotation", "weight"}
            if unknown:
                raise KeyError(
                    f"{current_config_key(f'tasks.{name}')}: unknown key(s) {sorted(unknown)}; "
                    "a task takes head, annotation and weight"
                )
            annotation = spec.get("annotation", DEFAULT_ANNOTATIONS.get(name))
            if annotation not in ANNOTATIONS:
                raise ValueError(
                    f"{current_config_key(f'tasks.{name}.annotation')}: must be one of {', '.join(ANNOTATIONS)}, "
                    f"got {annotation!r}"
                )
            self.task_specs[name] = dict(spec, annotation=annotation, weight=float(spec.get("weight", 1.0)))
        super().__init__(**kwargs)
        self.assign_weight = float(assign_weight)
        hidden = self.llm.hidden_size
        visual_dim = self.vision_encoder.out_dim
        self.heads = nn.ModuleDict()
        for name, spec in self.task_specs.items():
            head_cfg = dict(spec["head"])
            head_cls = TASK_HEADS.get(head_cfg.get("type")) if isinstance(head_cfg.get("type"), str) else head_cfg.get("type")
            defaults = {"in_dim": hidden}
            if getattr(head_cls, "requires_visual", False):
                defaults["visual_dim"] = visual_dim
            if {"images", "videos"} & set(getattr(head_cls, "input_keys", ())):
                defaults.update(self._pixel_normalisation(name, head_cfg))
            self.heads[name] = build_child(head_cfg, TASK_HEADS, f"tasks.{name}.head", default_args=defaults)
        # learnable task embeddings, initialised at the mean token embedding
        table = self.llm.get_input_embeddings().weight
        mean = table.detach().float().mean(0).to(table.dtype)
        self.task_embeddings = nn.ParameterDict(
            {name: nn.Parameter(mean.clone()) for name in self.task_specs}
        )
        needs_box = any(spec["annotation"] == "tracks" for spec in self.task_specs.values())
        if box_encoder is None and needs_box:
            box_encoder = dict(type="BoxEncoder")
        self.box_encoder = (
            build_child(dict(box_encoder), TASK_HEADS, "box_encoder", default_args={"in_dim": hidden})
            if box_encoder is not None
            else None
        )
        vocab = self.tokenizer.convert_tokens_to_ids
        self.begin_ids = {name: vocab(task_tokens(name)[0]) for name in self.task_specs}
        self.query_ids = {name: vocab(task_tokens(name)[1]) for name in self.task_specs}
        self.box_token_id = vocab(BOX_TOKEN)

    def _pixel_normalisation(self, name: str, head_cfg: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
        """``input_mean``/``input_std`` of a head that reads the images or
        videos: the batch holds them as the vision encoder normalised them, so
        the encoder's ``image_mean``/``image_std``; a head config that gives
        other values is an error."""
        encoder = self.vision_encoder
        out = {}
        for key, value in (("input_mean", encoder.image_mean), ("input_std", encoder.image_std)):
            given = head_cfg.get(key)
            if given is not None and not _same_numbers(given, value):
                raise ValueError(
                    f"{current_config_key(f'tasks.{name}.head.{key}')}: {given!r}, but the head reads the pixels "
                    f"as the vision encoder normalised them, with {key.replace('input', 'image')}={tuple(value)}; "
                    f"leave {key} out (it defaults to the encoder's) or give the encoder's"
                )
            out[key] = tuple(value)
        return out

    def extra_special_tokens(self) -> list[str]:
        return [tok for name in self.task_specs for tok in task_tokens(name)] + [BOX_TOKEN]

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """``{task: {"annotation": ...}}``: what the collators need."""
        return {name: {"annotation": spec["annotation"]} for name, spec in self.task_specs.items()}

    # ----------------------------------------------------------- embeddings
    def insert_task_embeddings(self, embeds: torch.Tensor, input_ids: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """Task embeddings at the query tokens; encoded boxes at ``<|box|>``."""
        for name, token in self.query_ids.items():
            mask = input_ids == token
            if mask.any():
                embeds = torch.where(mask.unsqueeze(-1), self.task_embeddings[name].to(embeds.dtype), embeds)
        box_mask = input_ids == self.box_token_id
        count = int(box_mask.sum())
        boxes = batch.get("input_boxes")
        given = 0 if boxes is None else len(boxes)
        if count != given:
            raise ValueError(
                f"the batch holds {count} {BOX_TOKEN} token(s) but {given} input box(es) in batch['input_boxes']; "
                "give one box per box token, in order"
            )
        if count:
            if self.box_encoder is None:
                raise ValueError(f"the batch has {BOX_TOKEN} tokens but the model has no box_encoder; configure one")
            encoded = self.box_encoder(torch.as_tensor(boxes, dtype=torch.float32, device=embeds.device))
            embeds = embeds.masked_scatter(box_mask.unsqueeze(-1), encoded.to(embeds.dtype))
        return embeds

    # -------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = batch.get("ids")
        embeds, features = self.embed_inputs(input_ids, batch.get("media"), ids, return_features=True)
        embeds = self.insert_task_embeddings(embeds, input_ids, batch)
        hidden = self.decode(embeds, attention_mask)
        out: dict[str, Any] = {"hidden_states": hidden, "losses": {}, "predictions": {}}
        total = hidden.new_zeros((), dtype=torch.float32)
        labels = batch.get("labels")
        if labels is not None:
            labels = self.mask_media_labels(input_ids, labels)
            for token in self.query_ids.values():  # the query token is fed, never predicted
                labels = labels.masked_fill(input_ids == token, IGNORE_INDEX)
            begin = torch.isin(labels, torch.tensor(list(self.begin_ids.values()), device=labels.device))
            lm, count = self.lm_loss(hidden, labels.masked_fill(begin, IGNORE_INDEX))
            out["losses"]["lm"], out["num_tokens"] = lm, count
            total = total + lm
            # the task decisions: the collator's assign_mask (begin tokens, and where one would be in answers
            # without any) when given, else the begin tokens alone
            decision = batch.get("assign_mask")
            decision = begin if decision is None else decision.to(begin.device).bool() & (labels != IGNORE_INDEX)
            if decision.any():
                assign, _ = self.lm_loss(hidden, labels.masked_fill(~decision, IGNORE_INDEX))
                out["losses"]["assign"] = assign
                total = total + self.assign_weight * assign
        task_targets = batch.get("task_targets") or {}
        unknown = set(task_targets) - set(self.heads)
        if unknown:
            raise ValueError(
                f"batch['task_targets'] has task(s) {sorted(unknown)} the model has no head for "
                f"(heads: {', '.join(self.heads)}); add them to the config's tasks or leave them out of the data"
            )
        for name, head in self.heads.items():
            rows, positions = (input_ids == self.query_ids[name]).nonzero(as_tuple=True)
            if rows.numel() == 0:
                if name in task_targets and len(task_targets[name].get("index", [])):
                    raise ValueError(f"batch['task_targets'][{name!r}] has targets but no {task_tokens(name)[1]} token")
                continue
            query = hidden[rows, positions]
            visual = self._visual_for(rows, features, ids, name, head)
            inputs = self._head_inputs(name, head, rows, batch)
            predictions = head(query, visual=visual, **inputs)
            out["predictions"][name] = predictions
            if name in task_targets:
                targets = self._check_targets(name, task_targets[name], rows, ids)
                losses = head.loss(predictions, targets)
                for key, value in losses.items():
                    if key != "loss":
                        out["losses"][f"{name}.{key}"] = value
                total = total + self.task_specs[name]["weight"] * losses["loss"]
        if labels is not None or task_targets:
            out["loss"] = total
        return out

    def _visual_for(self, rows: torch.Tensor, features, ids, name: str, head) -> dict | None:
        """The encoder features of the task rows, frames padded: ``features
        [n, T, N, C]`` with ``frame_mask [n, T]``."""
        if not getattr(head, "requires_visual", False):
            return None
        chosen = []
        for b in rows.tolist():
            if features[b] is None:
                sample = ids[b] if ids is not None else b
                raise ValueError(
                    f"sample {sample!r}: has a {task_tokens(name)[1]} token but no media; "
                    f"the {name} head reads the image or video features"
                )
            chosen.append(features[b])
        frames = max(f.shape[0] for f in chosen)
        padded = chosen[0].new_zeros(len(chosen), frames, *chosen[0].shape[1:])
        frame_mask = torch.zeros(len(chosen), frames, dtype=torch.bool, device=padded.device)
        for i, f in enumerate(chosen):
            padded[i, : f.shape[0]] = f
            frame_mask[i, : f.shape[0]] = True
        encoder = self.vision_encoder
        return dict(features=padded, frame_mask=frame_mask, grid_size=encoder.grid_size, image_size=encoder.image_size)

    def _head_inputs(self, name: str, head, rows: torch.Tensor, batch: Mapping) -> dict:
        """The extra inputs a head reads (``init_boxes`` of a tracking prompt,
        the pixels for a SAM2 head)."""
        wanted = set(getattr(head, "input_keys", ()))
        inputs: dict[str, Any] = {}
        targets = (batch.get("task_targets") or {}).get(name, {})
        if "init_boxes" in wanted:
            if "init_boxes" not in targets:
                raise KeyError(f"the {name} head needs batch['task_targets'][{name!r}]['init_boxes']")
            inputs["init_boxes"] = targets["init_boxes"]
            if "init_frames" in wanted and "init_frames" in targets:
                inputs["init_frames"] = targets["init_frames"]
        if wanted & {"images", "videos"}:
            media = self._media_list(batch.get("media"), batch["input_ids"].shape[0])
            chosen = [media[b] for b in rows.tolist()]
            if all(m.shape[0] == 1 for m in chosen):
                inputs["images"] = torch.cat(chosen)
            else:
                inputs["videos"] = torch.stack(chosen)
        return inputs

    @staticmethod
    def _check_targets(name: str, targets: Mapping, rows: torch.Tensor, ids) -> Mapping:
        index = targets.get("index")
        if index is None:
            raise KeyError(f"batch['task_targets'][{name!r}] needs 'index' (the batch row of each target)")
        index = torch.as_tensor(index).tolist()
        if index != rows.tolist():
            raise ValueError(
                f"batch['task_targets'][{name!r}]['index'] is {index} but the {name} query tokens stand in rows "
                f"{rows.tolist()}; one target per query token, in row order"
            )
        if "ids" not in targets and ids is not None:
            targets = dict(targets, ids=[ids[b] for b in index])
        return targets

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self,
        prompt: str,
        image=None,
        video=None,
        input_box=None,
        max_new_tokens: int = 32,
        head_inputs: Mapping[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """Answer one prompt; when the LLM emits a task's begin token, the task
        embedding is fed at the query token, the head runs on the hidden state
        there, and generation goes on. Returns ``{"text", "tasks": {task:
        result}}``. ``input_box`` (normalised xyxy) is a box prompt, placed at
        a ``<|box|>`` token after the prompt (tracking). ``head_inputs`` are
        extra inputs for the heads that read them (``output_size`` of masks)."""
        if image is not None and video is not None:
            raise ValueError("give an image or a video, not both")
        kind = "image" if image is not None else "video" if video is not None else None
        media = None if kind is None else self.processor.prepare_media(image if kind == "image" else video, kind)
        text = prompt if input_box is None else f"{prompt} {BOX_TOKEN}"
        inputs = self.processor([self.processor.chat_prompt(text, kind)], [media])
        device = next(self.parameters()).device
        ids = inputs["input_ids"].to(device)
        batch = {"media": [None if media is None else media.to(device)]}
        if input_box is not None:
            batch["input_boxes"] = torch.as_tensor([input_box], dtype=torch.float32)
        visual, features = self.encode_media(batch["media"], return_features=True)
        stops = [self.tokenizer.eos_token_id, *self.begin_ids.values()]
        generated: list[int] = []
        results: dict[str, Any] = {}
        while len(generated) < max_new_tokens:
            embeds = self._embed_with_visual(ids, visual, batch)
            new = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens - len(generated),
                eos_token_id=stops,
                pad_token_id=self.tokenizer.pad_token_id,
                **{"suppress_tokens": self.input_only_token_ids(), **generate_kwargs},
            )[0]
            generated += new.tolist()
            ids = torch.cat([ids, new.unsqueeze(0).to(device)], dim=1)
            task = next((n for n, t in self.begin_ids.items() if new.numel() and new[-1].item() == t), None)
            if task is None or task in results:
                break
            query = torch.tensor([[self.query_ids[task]]], device=device)
            ids = torch.cat([ids, query], dim=1)
            generated.append(self.query_ids[task])
            hidden = self.decode(self._embed_with_visual(ids, visual, batch), torch.ones_like(ids))
            head = self.heads[task]
            if "init_boxes" in getattr(head, "input_keys", ()) and input_box is None:
                # the model asked for a task whose head needs a box prompt no one gave
                results[task] = {"skipped": f"the {task} head needs input_box, which was not given"}
                continue
            head_visual = self._visual_for(torch.zeros(1, dtype=torch.long), features, None, task, head)
            head_batch = dict(batch, input_ids=ids, task_targets={task: {"init_boxes": batch.get("input_boxes")}})
            extra = {k: v for k, v in (head_inputs or {}).items() if k in getattr(head, "input_keys", ())}
            extra.update(self._head_inputs(task, head, torch.zeros(1, dtype=torch.long), head_batch))
            results[task] = head.predict(hidden[:, -1], visual=head_visual, **extra)
        answer = self.tokenizer.decode(generated, skip_special_tokens=True)
        return {"text": answer, "tasks": results, "token_ids": generated}

    def input_only_token_ids(self) -> list[int]:
        """Media placeholders, the task query tokens (fed after a begin token,
        never predicted) and the box-prompt token: never generated."""
        return super().input_only_token_ids() + list(self.query_ids.values()) + [self.box_token_id]

    def _embed_with_visual(self, ids: torch.Tensor, visual, batch: Mapping) -> torch.Tensor:
        is_media = torch.isin(ids, self.media_token_ids.to(ids.device))
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(is_media, 0))
        if visual[0] is not None:
            embeds = embeds.masked_scatter(is_media.unsqueeze(-1), visual[0].to(embeds.dtype))
        return self.insert_task_embeddings(embeds, ids, batch)
