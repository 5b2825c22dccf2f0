"""The MLLM in TPO mode: task tokens, heads, named losses, gradients,
memorisation, predict, user-defined heads, bad input, the pixels a SAM2 head reads."""
from pathlib import Path

import pytest
import torch
from sam2_testkit import tiny_sam2_config
from tpo.registry import TASK_HEADS, build_model, load_config

from tpo.models.mllm import IGNORE_INDEX
from tpo.models.tpo_model import BOX_TOKEN, task_tokens

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tpo" / "timm_mlp_llama.py"


def _frames(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _disk_mask(t, h=32, w=32):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([((yy - 10 - 2 * i) ** 2 + (xx - 12) ** 2) < 36 for i in range(t)])


# (prompt, kind, task, media seed) of each sample; None task = plain conversation
SAMPLES = [
    ("Where is the red circle?", "image", "region", 0),
    ("When does the square enter?", "video", "temporal", 1),
    ("Segment the triangle.", "video", "mask", 2),
    ("Track the object.", "video", "track", 3),
    ("What colour is it?", "image", None, 4),
]
BOX = torch.tensor([[0.1, 0.2, 0.6, 0.7]])
SPAN = torch.tensor([[0.25, 0.75]])
INIT = torch.tensor([[0.2, 0.2, 0.5, 0.5]])
TRACK = torch.tensor([[[0.2, 0.2, 0.5, 0.5], [0.3, 0.25, 0.6, 0.55], [0.4, 0.3, 0.7, 0.6], [0.5, 0.35, 0.8, 0.65]]])


def make_batch(model):
    proc, tok = model.processor, model.tokenizer
    texts, media, labels_from = [], [], []
    for prompt, kind, task, seed in SAMPLES:
        m = proc.prepare_media(_frames(seed, 1)[0] if kind == "image" else _frames(seed, 4), kind)
        text_prompt = prompt + (f" {BOX_TOKEN}" if task == "track" else "")
        head = proc.expand_placeholders(proc.chat_prompt(text_prompt, kind), [m.shape[0]])
        answer = "ok" + ("".join(task_tokens(task)) if task else "") + tok.eos_token
        texts.append(head + answer)
        labels_from.append(len(tok(head, add_special_tokens=False).input_ids))
        media.append(m)
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc.input_ids.clone()
    for b, start in enumerate(labels_from):
        labels[b, :start] = IGNORE_INDEX
    labels[enc.attention_mask == 0] = IGNORE_INDEX
    ids = [f"s{b}" for b in range(len(SAMPLES))]
    task_targets = {
        "region": {"index": torch.tensor([0]), "boxes": BOX},
        "temporal": {"index": torch.tensor([1]), "spans": SPAN},
        "mask": {"index": torch.tensor([2]), "masks": _disk_mask(4)[None], "frame_valid": torch.ones(1, 4, dtype=torch.bool)},
        "track": {"index": torch.tensor([3]), "init_boxes": INIT, "boxes": TRACK, "valid": torch.ones(1, 4, dtype=torch.bool)},
    }
    return dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels, media=media, ids=ids,
                task_targets=task_targets, input_boxes=INIT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CONFIG)


def test_task_tokens_extend_the_tokenizer(model):
    vocab = model.tokenizer.get_vocab()
    for task in ("region", "temporal", "mask", "track"):
        for token in task_tokens(task):
            assert token in vocab
    assert model.llm.get_input_embeddings().num_embeddings >= len(model.tokenizer)
    assert model.tasks["mask"] == {"annotation": "masks"}


def test_named_losses_and_gradients(model):
    batch = make_batch(model)
    model.train()
    out = model(batch)
    names = set(out["losses"])
    assert {"lm", "assign", "region.l1", "region.giou"} <= names
    assert any(n.startswith("temporal.") for n in names) and any(n.startswith("mask.") for n in names)
    assert any(n.startswith("track.") for n in names)
    assert torch.isfinite(out["loss"])
    assert out["predictions"]["region"]["boxes"].shape == (1, 4)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    for task in ("region", "temporal", "mask", "track"):
        assert model.task_embeddings[task].grad is not None and model.task_embeddings[task].grad.abs().sum() > 0, task
        assert all(p.grad is not None for p in model.heads[task].parameters() if p.requires_grad), task
    assert all(p.grad is not None for p in model.box_encoder.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_gradients_reach_lora_weights():
    torch.manual_seed(0)
    lora_model = build_model(CONFIG, cfg_options={
        "model.llm.lora": dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])})
    out = lora_model(make_batch(lora_model))
    out["loss"].backward()
    lora = [p for n, p in lora_model.llm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert lora_model.task_embeddings["region"].grad is not None


def test_overfit_then_predict_returns_the_memorised_results():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    batch = make_batch(model)
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = None
    for step in range(150):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        first = first if first is not None else {k: v.item() for k, v in out["losses"].items()}
    last = {k: v.item() for k, v in out["losses"].items()}
    model.eval()
    for key in ("region.l1", "region.giou", "lm", "assign"):
        assert last[key] < 0.1 * first[key] + 1e-3, (key, first[key], last[key])
    for task in ("region", "temporal", "mask", "track"):  # every head's loss near zero
        start = sum(v for k, v in first.items() if k.startswith(task + "."))
        end = sum(v for k, v in last.items() if k.startswith(task + "."))
        assert end < 0.15 * start, (task, start, end)
    region = model.predict("Where is the red circle?", image=_frames(0, 1)[0], max_new_tokens=8)
    assert "region" in region["tasks"], region
    torch.testing.assert_close(region["tasks"]["region"]["boxes"], BOX, atol=0.05, rtol=0)
    temporal = model.predict("When does the square enter?", video=_frames(1, 4), max_new_tokens=8)
    assert "temporal" in temporal["tasks"], temporal
    torch.testing.assert_close(temporal["tasks"]["temporal"]["spans"], SPAN, atol=0.08, rtol=0)
    mask = model.predict("Segment the triangle.", video=_frames(2, 4), max_new_tokens=8)
    predicted = mask["tasks"]["mask"]["masks"][0]
    target = _disk_mask(4)
    iou = (predicted & target).sum() / (predicted | target).sum()
    assert iou > 0.8, iou
    track = model.predict("Track the object.", video=_frames(3, 4), input_box=INIT[0].tolist(), max_new_tokens=8)
    torch.testing.assert_close(track["tasks"]["track"]["boxes"], TRACK, atol=0.06, rtol=0)


@TASK_HEADS.register_module(force=True)
class CountingHead(torch.nn.Module):
    """A user's head written outside the package: predicts a count."""

    task = "count"
    requires_visual = False
    input_keys = ()

    def __init__(self, in_dim, scale=1.0):
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, 1)
        self.scale = scale

    def forward(self, query, visual=None, **inputs):
        return {"count": self.proj(query).squeeze(-1) * self.scale}

    def loss(self, predictions, targets):
        mse = ((predictions["count"] - targets["count"]) ** 2).mean()
        return {"mse": mse, "loss": mse}

    def predict(self, query, visual=None, **inputs):
        return self.forward(query)


def test_user_defined_head_plugs_in_through_config():
    model = build_model(CONFIG, cfg_options={
        "model.tasks": dict(count=dict(head=dict(type="CountingHead", scale=2.0), annotation="spans"))})
    proc, tok = model.processor, model.tokenizer
    m = proc.prepare_media(_frames(0, 1)[0], "image")
    text = proc.expand_placeholders(proc.chat_prompt("How many?", "image"), [1]) + "".join(task_tokens("count"))
    enc = tok([text], add_special_tokens=False, return_tensors="pt")
    out = model(dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, media=[m],
                     task_targets={"count": {"index": torch.tensor([0]), "count": torch.tensor([3.0])}}))
    assert "count.mse" in out["losses"] and model.heads["count"].scale == 2.0
    out["loss"].backward()
    assert model.task_embeddings["count"].grad is not None


def test_bad_input_is_named(model):
    batch = make_batch(model)
    with pytest.raises(ValueError, match="no head for"):
        model(dict(batch, task_targets=dict(batch["task_targets"], ocr={"index": torch.tensor([0])})))
    with pytest.raises(ValueError, match="index"):
        model(dict(batch, task_targets=dict(batch["task_targets"], region={"index": torch.tensor([4]), "boxes": BOX})))
    bad_box = dict(batch["task_targets"], region={"index": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.2, 0.1, 0.7]])})
    with pytest.raises(ValueError, match="s0"):
        model(dict(batch, task_targets=bad_box))
    proc, tok = model.processor, model.tokenizer
    text = proc.chat_prompt("Segment it.", None) + "ok" + "".join(task_tokens("mask"))
    enc = tok([text], add_special_tokens=False, return_tensors="pt")
    with pytest.raises(ValueError, match=r"sample 'x0'.*no media"):
        model(dict(input_ids=enc.input_ids, media=[None], ids=["x0"],
                   task_targets={"mask": {"index": torch.tensor([0]), "masks": _disk_mask(1)[None]}}))
    with pytest.raises(ValueError, match="input box"):
        model(dict(batch, input_boxes=None))


def test_task_config_errors():
    cfg = load_config(CONFIG)
    cfg.model.tasks = dict(region=dict(annotation="boxes"))
    with pytest.raises(KeyError, match=r"model\.tasks\.region: needs a 'head'"):
        build_model(cfg)
    with pytest.raises(ValueError, match=r"tasks\.region\.annotation"):
        build_model(CONFIG, cfg_options={"model.tasks.region.annotation": "points"})


@pytest.mark.parametrize("name", ["openclip_linear_qwen2", "siglip_pool_mistral"])
def test_every_tpo_config_trains_all_heads(name):
    torch.manual_seed(0)
    other = build_model(ROOT / "configs" / "tpo" / f"{name}.py")
    out = other(make_batch(other))
    assert {"region.l1", "lm", "assign"} <= set(out["losses"])
    assert {n.split(".")[0] for n in out["losses"]} >= {"region", "temporal", "mask", "track"}
    out["loss"].backward()
    assert other.task_embeddings["mask"].grad is not None


def test_assign_loss_covers_the_decision_not_to_emit_a_task_token(model):
    """With the collator's assign_mask, a plain-text answer's first token is a
    task decision too: the assign loss is the mean cross-entropy at the marked
    positions (begin tokens and plain answers' first tokens alike)."""
    from tpo.data.collate import ConversationCollator

    gen = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    chat = {"id": "qa", "media_type": "video", "media": video, "conversations": [
        {"from": "human", "value": "<video>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]}
    grounding = {"id": "box", "media_type": "video", "media": video, "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]),
                 "box_frames": torch.tensor([0]), "conversations": [
        {"from": "human", "value": "<video>\nWhere is the circle?"}, {"from": "gpt", "value": "here"}]}
    collator = ConversationCollator(model.processor, tasks=model.tasks, task_token_position="start")
    batch = collator([chat, grounding])
    mask = batch["assign_mask"]
    assert mask.sum(1).tolist() == [1, 1]
    begin = model.tokenizer.convert_tokens_to_ids(task_tokens("region")[0])
    assert batch["labels"][1][mask[1]].tolist() == [begin]
    assert batch["labels"][0][mask[0]].tolist() == model.tokenizer("red", add_special_tokens=False)["input_ids"][:1]
    with torch.no_grad():
        out = model(batch)
        logits = model.llm.get_output_embeddings()(out["hidden_states"]).double()
    rows, cols = mask.nonzero(as_tuple=True)
    want = -logits[rows, cols - 1].log_softmax(-1)[torch.arange(len(rows)), batch["labels"][rows, cols]].mean()
    torch.testing.assert_close(out["losses"]["assign"].double(), want, rtol=1e-4, atol=1e-5)
    # without the mask (a batch from elsewhere): the begin tokens alone
    legacy = {k: v for k, v in batch.items() if k != "assign_mask"}
    with torch.no_grad():
        alone = model(legacy)["losses"]["assign"].double()
    want_begin = -logits[1, cols[1] - 1].log_softmax(-1)[begin]
    torch.testing.assert_close(alone, want_begin, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a chat-only batch still learns its decision
        assert "assign" in model(collator([chat]))["losses"]
        assert "assign" not in model({k: v for k, v in collator([chat]).items() if k != "assign_mask"})["losses"]


def test_generation_never_emits_input_only_tokens():
    """An LM head that prefers the box-prompt, query and media tokens over everything: generation (predict and
    chat) skips them all and ends at the end-of-sequence token, the best token left."""
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    head = model.llm.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    torch.nn.init.zeros_(biased.weight)
    torch.nn.init.zeros_(biased.bias)
    banned = model.input_only_token_ids()
    assert model.box_token_id in banned and set(model.query_ids.values()) <= set(banned)
    assert set(model.media_token_ids.tolist()) <= set(banned)
    with torch.no_grad():
        biased.bias[banned] = 100.0
        biased.bias[model.tokenizer.eos_token_id] = 10.0
    model.llm.causal_lm.set_output_embeddings(biased)
    video = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    result = model.predict("Where is it?", video=video, max_new_tokens=5)
    assert result["token_ids"] == [model.tokenizer.eos_token_id] and result["tasks"] == {}
    media = model.processor.prepare_media(video, "video")
    inputs = model.processor([model.processor.chat_prompt("Where is it?", "video")], [media])
    new = model.generate(inputs["input_ids"], inputs["attention_mask"], media=[media], max_new_tokens=5)
    assert new[0].tolist() == [model.tokenizer.eos_token_id]  # what chat decodes
    # a caller may still ask for other suppressions
    assert model.predict("Where is it?", video=video, max_new_tokens=3, suppress_tokens=[])["token_ids"][0] in banned


def _sam2_tpo_model(**head):
    cfg = load_config(CONFIG).to_dict()["model"]
    sam = dict(type="Sam2MaskHead", sam2_config=tiny_sam2_config(), adapter_hidden_dim=16, **head)
    cfg["tasks"] = {"mask": {"head": sam}}
    torch.manual_seed(0)
    return build_model(cfg)


def test_a_sam2_head_reads_the_pixels_as_the_encoder_normalised_them():
    model = _sam2_tpo_model()
    head, encoder = model.heads["mask"], model.vision_encoder
    assert head.input_mean.flatten().tolist() == pytest.approx(encoder.image_mean)
    assert head.input_std.flatten().tolist() == pytest.approx(encoder.image_std)
    plain = torch.tensor([0.2, 0.5, 0.8]).view(3, 1, 1).expand(3, 32, 32)  # a flat colour in [0, 1]
    media = model.processor.prepare_media(plain, "image")  # as batch["media"] holds it
    inputs = model._head_inputs("mask", head, torch.tensor([0]), {"input_ids": torch.zeros(1, 1, dtype=torch.long),
                                                                  "media": [media]})
    seen, *_ = head._pixels(inputs["images"], None)
    want = (plain[:, :1, :1] - head.sam_mean) / head.sam_std  # what SAM2 must see for that colour
    torch.testing.assert_close(seen.mean((0, 2, 3)), want.flatten(), rtol=0, atol=1e-4)
    _sam2_tpo_model(input_mean=encoder.image_mean)  # the encoder's own values are fine
    with pytest.raises(ValueError, match=r"model\.tasks\.mask\.head\.input_std: \(1, 1, 1\).*image_std=\(0\.5"):
        _sam2_tpo_model(input_std=(1, 1, 1))
