"""Task heads: built from configs, forward/loss/backward, gradients, overfitting
one tiny batch, the SAM2 adapter on a tiny random SAM2, Hungarian matching,
and clear errors on bad targets and inputs."""

import pytest
import torch
from sam2_testkit import tiny_sam2_config
from tpo.registry import TASK_HEADS, build_task_head, registered_names

from tpo.models.matching import SpanMatcher, hungarian_match

B, T, GRID, C, D = 2, 3, (4, 4), 16, 32
IMAGE = (16, 16)


def visual(t=T, batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(features=torch.randn(batch, t, GRID[0] * GRID[1], C, generator=g), grid_size=GRID, image_size=IMAGE)


BOXES = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]])
TRACK = BOXES[:, None].repeat(1, T, 1) + torch.linspace(0, 0.08, T)[None, :, None]
MASKS = torch.zeros(B, T, *IMAGE, dtype=torch.bool)
MASKS[0, :, 2:9, 3:12] = True
MASKS[1, :, 8:16, 0:6] = True
MASKS[1, 2, 8:16, 0:9] = True

HEADS = {
    "region": (dict(type="RegionHead", in_dim=D, hidden_dim=32), dict(boxes=BOXES), {}),
    "region_decoder": (
        dict(type="RegionDecoderHead", in_dim=D, visual_dim=C, hidden_dim=32, num_heads=4, num_layers=1),
        dict(boxes=BOXES),
        {},
    ),
    "span": (dict(type="SpanHead", in_dim=D, hidden_dim=32), dict(spans=torch.tensor([[0.1, 0.5], [0.3, 0.9]])), {}),
    "moment": (
        dict(
            type="MomentDETRHead",
            in_dim=D,
            visual_dim=C,
            hidden_dim=32,
            num_heads=4,
            num_queries=4,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dropout=0.0,
        ),
        dict(spans=[torch.tensor([[0.1, 0.5]]), torch.tensor([[0.2, 0.6], [0.7, 1.0]])]),
        {},
    ),
    "mask": (
        dict(type="MaskDecoderHead", in_dim=D, visual_dim=C, hidden_dim=32, num_heads=4, num_layers=1),
        dict(masks=MASKS),
        {},
    ),
    "track": (
        dict(type="TrackHead", in_dim=D, visual_dim=C, hidden_dim=32, num_heads=4, num_layers=1),
        dict(boxes=TRACK),
        dict(init_boxes=TRACK[:, 0]),
    ),
}


def test_every_head_is_registered():
    names = registered_names(TASK_HEADS)
    for name in (
        "RegionHead",
        "RegionDecoderHead",
        "SpanHead",
        "MomentDETRHead",
        "MaskDecoderHead",
        "Sam2MaskHead",
        "TrackHead",
        "BoxEncoder",
    ):
        assert name in names


@pytest.mark.parametrize("key", list(HEADS))
def test_forward_loss_backward_gradients(key):
    cfg, targets, inputs = HEADS[key]
    head = build_task_head(dict(cfg))
    assert head.task and head.in_dim == D
    query = torch.randn(B, D, requires_grad=True)
    predictions = head(query, visual(), **inputs)
    losses = head.loss(predictions, targets)
    assert "loss" in losses and len(losses) >= 3
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    losses["loss"].backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None, f"{key}: no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{key}: zero gradient at {name}"


def overfit(head, targets, inputs, steps, lr):
    torch.manual_seed(0)
    query, vis = torch.randn(B, D), visual()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        losses = head.loss(head(query, vis, **inputs), targets)
        first = float(losses["loss"].detach()) if first is None else first
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        final = float(head.loss(head(query, vis, **inputs), targets)["loss"])
    return first, final, head.predict(query, vis, **inputs)


def test_region_head_overfits():
    cfg, targets, inputs = HEADS["region"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 250, 3e-3)
    assert final < 0.05 * first
    assert torch.allclose(out["boxes"], BOXES, atol=0.02)
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 1


def test_region_decoder_head_overfits():
    cfg, targets, inputs = HEADS["region_decoder"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 250, 3e-3)
    assert final < 0.05 * first
    assert torch.allclose(out["boxes"], BOXES, atol=0.02)


def test_span_head_overfits():
    cfg, targets, inputs = HEADS["span"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 250, 3e-3)
    assert final < 0.05 * first
    assert torch.allclose(out["spans"], targets["spans"], atol=0.02)
    assert (out["spans"][:, 1] >= out["spans"][:, 0]).all()


def test_moment_head_overfits():
    cfg, targets, inputs = HEADS["moment"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 200, 5e-3)
    assert final < 0.05 * first
    assert torch.allclose(out["spans"][0], targets["spans"][0][0], atol=0.03)
    # sample 1 has two moments: the two best-scored spans are them, in some order
    top2 = out["all_spans"][1, :2]
    order = top2[:, 0].argsort()
    assert torch.allclose(top2[order], targets["spans"][1], atol=0.03)
    assert (out["scores"][1, :2] > 0.9).all() and (out["scores"][:, 2:] < 0.1).all()
    assert out["all_spans"].shape == (B, 4, 2) and out["saliency"].shape == (B, T)


def test_mask_head_overfits():
    cfg, targets, inputs = HEADS["mask"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 120, 5e-3)
    assert final < 0.02 * first
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (B, T, *IMAGE)
    assert torch.equal(out["masks"], MASKS)


def test_track_head_overfits():
    cfg, targets, inputs = HEADS["track"]
    first, final, out = overfit(build_task_head(dict(cfg)), targets, inputs, 150, 3e-3)
    assert final < 0.1 * first
    assert out["boxes"].shape == (B, T, 4)
    assert torch.allclose(out["boxes"], TRACK, atol=0.02)


def test_mask_head_image_targets_and_output_size():
    head = build_task_head(dict(HEADS["mask"][0]))
    vis = visual(t=1)
    out = head(torch.randn(B, D), vis)
    assert out["mask_logits"].shape == (B, 1, *IMAGE)
    losses = head.loss(out, dict(masks=MASKS[:, 0]))  # [B, H, W] image masks
    assert torch.isfinite(losses["loss"])
    big = head.loss(out, dict(masks=MASKS[:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2)))  # logits resized
    assert torch.isfinite(big["loss"])
    assert head.postprocess(out, output_size=(8, 8))["masks"].shape == (B, 1, 8, 8)
    assert head(torch.randn(B, D), vis, output_size=(24, 20))["mask_logits"].shape == (B, 1, 24, 20)


def test_moment_head_padding_and_given_saliency():
    cfg, targets, _ = HEADS["moment"]
    head = build_task_head(dict(cfg))
    vis = visual(t=5)
    vis["frame_mask"] = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = head(torch.randn(B, D), vis)
    post = head.postprocess(out)
    assert torch.isinf(post["saliency"][1, 3:]).all() and torch.isfinite(post["saliency"][0]).all()
    sal = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0], [2.0, 0.0, 0.0, 9.0, 9.0]])
    losses = head.loss(out, dict(targets, saliency=sal))
    losses["loss"].backward()
    # the padded frames' saliency gets no gradient
    feats = vis["features"].clone().requires_grad_()
    out = head(torch.randn(B, D), dict(vis, features=feats))
    head.loss(out, dict(targets, saliency=sal))["saliency"].backward()
    assert feats.grad[1, 3:].abs().sum() == 0 and feats.grad[1, :3].abs().sum() > 0


def test_track_head_ignores_unannotated_frames():
    cfg, targets, inputs = HEADS["track"]
    head = build_task_head(dict(cfg))
    out = head(torch.randn(B, D), visual(), **inputs)
    boxes = TRACK.clone()
    boxes[0, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # garbage on an unannotated frame
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 2] = False
    losses = head.loss(out, dict(boxes=boxes, valid=valid))
    (grad,) = torch.autograd.grad(losses["loss"], out["boxes"])
    assert grad[0, 2].abs().sum() == 0 and grad[0, 1].abs().sum() > 0
    with pytest.raises(ValueError, match=r"sample 0\[2\].*x2 < x1"):
        head.loss(out, dict(boxes=boxes))


# ----------------------------------------------------------------------------- box encoder
def test_box_encoder_from_config_gradients_and_errors():
    enc = build_task_head(dict(type="BoxEncoder", in_dim=D, hidden_dim=16))
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.61], [0.0, 0.0, 1.0, 1.0]])
    emb = enc(boxes)
    assert emb.shape == (3, D)
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)  # a 0.01 move changes the embedding
    assert enc(boxes[None]).shape == (1, 3, D)
    (emb * torch.randn_like(emb)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="x2 < x1"):
        enc(torch.tensor([[0.5, 0.2, 0.1, 0.6]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc(torch.tensor([[0.1, 0.2, 1.5, 0.6]]))


def test_track_head_box_encoder_gets_gradients():
    cfg, targets, inputs = HEADS["track"]
    head = build_task_head(dict(cfg))
    head.loss(head(torch.randn(B, D), visual(), **inputs), targets)["loss"].backward()
    grads = [p.grad for p in head.box_encoder.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- Hungarian matching
def test_hungarian_beats_greedy_on_hand_made_cost():
    # greedy would take (0, 0) = 1 first and then pay 100; the optimum is 0->1, 1->0 (cost 4)
    cost = torch.tensor([[1.0, 2.0], [2.0, 100.0]])
    rows, cols = hungarian_match(cost)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_hungarian_rectangular_and_empty():
    cost = torch.tensor([[5.0, 9.0], [1.0, 8.0], [7.0, 0.5], [3.0, 3.0]])  # 4 predictions, 2 targets
    rows, cols = hungarian_match(cost)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(1, 0), (2, 1)]
    rows, cols = hungarian_match(torch.zeros(3, 0))
    assert rows.numel() == cols.numel() == 0
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="matrix"):
        hungarian_match(torch.zeros(3))


def test_span_matcher_hand_made():
    pred = torch.tensor([[[0.70, 0.90], [0.00, 0.20], [0.40, 0.60]]])
    targets = [torch.tensor([[0.41, 0.62], [0.72, 0.88]])]
    [(rows, cols)] = SpanMatcher(cost_class=0.0)(pred, None, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {2: 0, 0: 1}
    # a strongly foreground query wins a tie in span cost
    pred = torch.tensor([[[0.4, 0.6], [0.4, 0.6]]])
    logits = torch.tensor([[[-5.0, 5.0], [5.0, -5.0]]])
    [(rows, cols)] = SpanMatcher()(pred, logits, [torch.tensor([[0.4, 0.6]])])
    assert rows.tolist() == [1] and cols.tolist() == [0]


# ----------------------------------------------------------------------------- bad targets and inputs
def test_bad_targets_raise_with_sample_ids():
    region = build_task_head(dict(HEADS["region"][0]))
    out = region(torch.randn(B, D))
    with pytest.raises(ValueError, match=r"sample 1 \(id 'img_b'\).*x2 < x1"):
        region.loss(out, dict(boxes=torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.6, 0.1, 0.3, 0.4]]), ids=["img_a", "img_b"]))
    with pytest.raises(ValueError, match=r"sample 0 .*outside \[0, 1\]"):
        region.loss(out, dict(boxes=torch.tensor([[0.1, 0.1, 1.2, 0.2], [0.1, 0.1, 0.3, 0.4]])))
    with pytest.raises(ValueError, match="2 samples|has 3 samples"):
        region.loss(out, dict(boxes=torch.rand(3, 4).sort(-1).values))
    with pytest.raises(KeyError, match="boxes"):
        region.loss(out, dict(spans=torch.rand(2, 2)))

    span = build_task_head(dict(HEADS["span"][0]))
    with pytest.raises(ValueError, match=r"sample 1 \(id 'v2'\).*end < start"):
        span.loss(span(torch.randn(B, D)), dict(spans=torch.tensor([[0.1, 0.4], [0.8, 0.3]]), ids=["v1", "v2"]))

    moment = build_task_head(dict(HEADS["moment"][0]))
    out = moment(torch.randn(B, D), visual())
    with pytest.raises(ValueError, match=r"sample 0 \(id 'q7'\).*end < start"):
        moment.loss(out, dict(spans=[torch.tensor([[0.5, 0.2]]), torch.tensor([[0.1, 0.2]])], ids=["q7", "q8"]))
    with pytest.raises(ValueError, match="more than num_queries"):
        moment.loss(out, dict(spans=[torch.tensor([[0.1, 0.2]] * 5), torch.tensor([[0.1, 0.2]])]))
    with pytest.raises(ValueError, match="sample 1.*empty"):
        moment.loss(out, dict(spans=[torch.tensor([[0.1, 0.2]]), torch.zeros(0, 2)]))

    mask = build_task_head(dict(HEADS["mask"][0]))
    out = mask(torch.randn(B, D), visual())
    empty = MASKS.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"sample 1 \(id 'm2'\) is empty"):
        mask.loss(out, dict(masks=empty, ids=["m1", "m2"]))
    with pytest.raises(ValueError, match="not binary"):
        mask.loss(out, dict(masks=MASKS.float() * 0.5))
    with pytest.raises(ValueError, match="frames"):
        mask.loss(out, dict(masks=MASKS[:, :2]))


def test_bad_inputs_and_configs_raise():
    region = build_task_head(dict(HEADS["region"][0]))
    with pytest.raises(ValueError, match=r"\[B, in_dim=32\]"):
        region(torch.randn(B, 16))
    mask = build_task_head(dict(HEADS["mask"][0]))
    with pytest.raises(ValueError, match="visual_dim=16"):
        mask(torch.randn(B, D), dict(visual(), features=torch.randn(B, T, 16, 8)))
    with pytest.raises(ValueError, match="grid_size"):
        mask(torch.randn(B, D), dict(visual(), grid_size=(3, 4)))
    with pytest.raises(ValueError, match="needs visual"):
        mask(torch.randn(B, D))
    decoder = build_task_head(dict(HEADS["region_decoder"][0]))
    with pytest.raises(ValueError, match="needs visual"):
        decoder(torch.randn(B, D))
    with pytest.raises(ValueError, match="frame_mask"):
        decoder(torch.randn(B, D), dict(visual(), frame_mask=torch.ones(B, T + 1, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"task_head\.hidden_dim.*num_heads=4"):
        build_task_head(dict(HEADS["region_decoder"][0], hidden_dim=30))
    track = build_task_head(dict(HEADS["track"][0]))
    with pytest.raises(ValueError, match="init_boxes"):
        track(torch.randn(B, D), visual())
    with pytest.raises(KeyError, match=r"task_head\.loss_l1\.type.*'L1Los'"):
        build_task_head(dict(type="RegionHead", in_dim=D, loss_l1=dict(type="L1Los")))
    with pytest.raises(ValueError, match=r"task_head\.in_dim"):
        build_task_head(dict(type="RegionHead", in_dim=0))
    with pytest.raises(ValueError, match=r"task_head\.hidden_dim"):
        build_task_head(dict(type="MomentDETRHead", in_dim=D, visual_dim=C, hidden_dim=30, num_heads=4))
    with pytest.raises(ValueError, match="switched off"):
        head = build_task_head(dict(type="RegionHead", in_dim=D, loss_l1=None, loss_giou=None))
        head.loss(head(torch.randn(B, D)), dict(boxes=BOXES))


def test_user_head_must_name_its_task():
    from tpo.models.heads import TaskHead

    class NoTask(TaskHead):
        def forward(self, query, visual=None, **inputs):
            return {}

        def loss(self, predictions, targets):
            return {}

        def postprocess(self, predictions, **inputs):
            return {}

    with pytest.raises(TypeError, match="task"):
        NoTask(in_dim=4)


# ----------------------------------------------------------------------------- SAM2 adapter
def sam_head(video=False, **kw):
    return build_task_head(
        dict(
            type="Sam2MaskHead", in_dim=D, sam2_config=tiny_sam2_config(video), video=video, adapter_hidden_dim=32, **kw
        )
    )


def test_sam2_adapter_trains_and_sam2_stays_frozen():
    head = sam_head()
    head.train()
    assert not head.sam.training and head.adapter.training
    images = torch.rand(B, 3, 24, 24)
    query = torch.randn(B, D, requires_grad=True)
    out = head(query, images=images)
    assert out["mask_logits"].shape == (B, 1, 24, 24)
    losses = head.loss(out, dict(masks=MASKS[:, 0].repeat_interleave(2, 1)[:, :24].repeat_interleave(2, 2)[:, :, :24]))
    losses["loss"].backward()
    assert query.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.adapter.parameters())
    assert all(not p.requires_grad and p.grad is None for p in head.sam.parameters())
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {
        n for n, _ in head.named_parameters() if n.startswith("adapter.")
    }


def test_sam2_adapter_overfits_a_realisable_mask():
    head = sam_head()
    images = torch.rand(B, 3, 24, 24)
    with torch.no_grad():  # a mask this frozen SAM2 can make: from some sparse prompts
        teacher = torch.randn(B, head.num_prompt_tokens, head.sam_hidden, generator=torch.Generator().manual_seed(1))
        pixels = head._pixels(images, None)[0]
        low = head._decode(head._image_embeddings(pixels), teacher)
        target = torch.nn.functional.interpolate(low[:, None], size=(24, 24), mode="bilinear")[:, 0] > 0
    assert 0.1 < target.float().mean() < 0.9
    query = torch.randn(B, D)
    opt = torch.optim.Adam(head.adapter.parameters(), lr=1e-2)
    start = head.predict(query, images=images)["masks"][:, 0]
    first = None
    for _ in range(150):
        losses = head.loss(head(query, images=images), dict(masks=target))
        first = float(losses["loss"].detach()) if first is None else first
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    with torch.no_grad():
        final = float(head.loss(head(query, images=images), dict(masks=target))["loss"])
    masks = head.predict(query, images=images)["masks"][:, 0]
    # a random SAM2's logits are small (|logit| ~ 1), so the loss cannot reach zero; the masks must match
    assert final < 0.3 * first
    assert (masks == target).float().mean() > 0.93 > (start == target).float().mean()


def test_sam2_video_head_per_frame_and_propagation():
    head = sam_head(video=True)
    videos = torch.rand(B, T, 3, 24, 24)
    query = torch.randn(B, D, requires_grad=True)
    out = head(query, videos=videos)
    assert out["mask_logits"].shape == (B, T, 24, 24)
    head.loss(out, dict(masks=torch.rand(B, T, 24, 24) > 0.5))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.adapter.parameters())
    assert all(p.grad is None for p in head.sam.parameters())
    per_frame = head.predict(query, videos=videos, propagate=False)["masks"]
    propagated = head.predict(query, videos=videos)["masks"]
    assert propagated.shape == per_frame.shape == (B, T, 24, 24) and propagated.dtype == torch.bool
    # the prompted first frame is the same; the later frames come from SAM2's memory, not the prompts
    assert (propagated[:, 0] == per_frame[:, 0]).float().mean() > 0.99
    assert not torch.equal(propagated[:, 1:], per_frame[:, 1:])


def test_sam2_pretrained_folder_and_config_errors(tmp_path):
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(3)
    reference = Sam2Model(Sam2Config(**tiny_sam2_config()))
    reference.save_pretrained(tmp_path / "sam2")
    head = build_task_head(
        dict(type="Sam2MaskHead", in_dim=D, pretrained=str(tmp_path / "sam2"), adapter_hidden_dim=32)
    )
    for (name, p), q in zip(reference.state_dict().items(), head.sam.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(FileNotFoundError, match=r"task_head\.pretrained"):
        build_task_head(dict(type="Sam2MaskHead", in_dim=D, pretrained=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="exactly one"):
        build_task_head(dict(type="Sam2MaskHead", in_dim=D))
    with pytest.raises(ValueError, match="exactly one of images"):
        head(torch.randn(1, D))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        head(torch.randn(1, D), images=torch.rand(1, 1, 8, 8))


def _moving_patch(n, generator, grid=6, frames=4, channels=16, objects=1, enters=0):
    """Clips where ``objects`` patches are lit (each on one of its own 4 channels, drawn per clip) and each moves
    one cell a frame, or stays; the box is the cell of one of them, drawn per clip, which is dark before frame
    ``enters`` (its box there is its first visible one)."""
    feats = 0.1 * torch.randn(n, frames, grid * grid, channels, generator=generator)
    boxes = torch.zeros(n, frames, 4)
    tracked = torch.randint(0, objects, (n,), generator=generator)
    for k in range(objects):
        x0 = torch.randint(1, grid - 1, (n,), generator=generator)
        y0 = torch.randint(1, grid - 1, (n,), generator=generator)
        vx = torch.randint(-1, 2, (n,), generator=generator)
        vy = torch.randint(-1, 2, (n,), generator=generator)
        channel = 4 * k + torch.randint(0, 4, (n,), generator=generator)
        for t in range(frames):
            x, y = (x0 + vx * t).clamp(0, grid - 1), (y0 + vy * t).clamp(0, grid - 1)
            lit = ((tracked != k) | (t >= enters)).float()
            feats[torch.arange(n), t, y * grid + x, channel] += lit
            box = torch.stack((x / grid, y / grid, (x + 1) / grid, (y + 1) / grid), 1).float()
            boxes[tracked == k, t] = box[tracked == k]
    return dict(features=feats, grid_size=(grid, grid), image_size=(48, 48)), boxes


def _mean_iou(a, b):
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return (inter / ((a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter)).mean()


@pytest.mark.parametrize("objects, steps, bound", [(1, 200, 0.8), (2, 500, 0.6)], ids=["alone", "with-a-distractor"])
def test_track_head_follows_a_moving_object_on_held_out_clips(objects, steps, bound):
    """Not memorising: trained on random clips of moving patches, the head tracks the one its initial box shows on
    new clips, where keeping the first box (where it starts) is mostly wrong; with a second moving object, the
    template of the initial box tells them apart."""
    torch.manual_seed(0)
    head = build_task_head(dict(type="TrackHead", in_dim=D, visual_dim=16, hidden_dim=32, num_heads=4, num_layers=2))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    g, query = torch.Generator().manual_seed(1), torch.zeros(16, D)
    for _ in range(steps):
        vis, boxes = _moving_patch(16, g, objects=objects)
        loss = head.loss(head(query, vis, init_boxes=boxes[:, 0]), dict(boxes=boxes))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vis, boxes = _moving_patch(128, torch.Generator().manual_seed(99), objects=objects)
    with torch.no_grad():
        pred = head.predict(torch.zeros(128, D), vis, init_boxes=boxes[:, 0])["boxes"]
    keep_first = _mean_iou(boxes[:, :1].expand(-1, 3, 4), boxes[:, 1:])
    assert keep_first < 0.3
    assert _mean_iou(pred[:, 1:], boxes[:, 1:]) > bound


def test_track_head_takes_its_template_on_the_frame_of_the_initial_box():
    """The tracked object enters on frame 1 (a distractor moves from frame 0): with ``init_frames`` the template
    comes from frame 1, where the initial box shows the object, not from frame 0's empty background."""
    torch.manual_seed(0)
    head = build_task_head(dict(type="TrackHead", in_dim=D, visual_dim=16, hidden_dim=32, num_heads=4, num_layers=2))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    g, query, enter = torch.Generator().manual_seed(1), torch.zeros(16, D), torch.ones(16, dtype=torch.long)
    valid = torch.tensor([False, True, True, True]).expand(16, 4)
    for _ in range(500):
        vis, boxes = _moving_patch(16, g, objects=2, enters=1)
        out = head(query, vis, init_boxes=boxes[:, 1], init_frames=enter)
        loss = head.loss(out, dict(boxes=boxes, valid=valid))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vis, boxes = _moving_patch(128, torch.Generator().manual_seed(99), objects=2, enters=1)
    with torch.no_grad():
        pred = head.predict(torch.zeros(128, D), vis, init_boxes=boxes[:, 1],
                            init_frames=torch.ones(128, dtype=torch.long))["boxes"]
    assert _mean_iou(boxes[:, 1:2].expand(-1, 2, 4), boxes[:, 2:]) < 0.3  # keeping the initial box
    assert _mean_iou(pred[:, 2:], boxes[:, 2:]) > 0.6
    with pytest.raises(ValueError, match="init_frames must be"):
        head(query[:2], _moving_patch(2, g)[0], init_boxes=boxes[:2, 0], init_frames=torch.tensor([0, 4]))


def test_box_cell_overlap_by_hand():
    from tpo.models.heads.base import box_cell_overlap

    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.6, 0.6, 0.6, 0.6]])
    out = box_cell_overlap(boxes, (2, 2))  # cells: top-left, top-right, bottom-left, bottom-right
    assert torch.allclose(out, torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1.0]]))


def test_moment_head_finds_an_event_on_held_out_clips():
    """Trained on random clips where frames [s, e) light up (channel 0), the temporal head finds the event on
    new clips, which the whole clip (the no-input answer) never matches at tIoU 0.5."""
    torch.manual_seed(0)
    frames = 12

    def clips(n, generator):
        start = torch.randint(0, frames - 2, (n,), generator=generator)
        end = torch.clamp(start + torch.randint(2, 6, (n,), generator=generator), max=frames)
        feats = 0.1 * torch.randn(n, frames, 4, 16, generator=generator)
        t = torch.arange(frames)[None]
        feats[..., 0] += ((t >= start[:, None]) & (t < end[:, None]))[..., None].float()
        return dict(features=feats, grid_size=(2, 2), image_size=(16, 16)), torch.stack((start, end), 1) / frames

    def tiou(a, b):
        inter = (torch.minimum(a[:, 1], b[:, 1]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
        return inter / (torch.maximum(a[:, 1], b[:, 1]) - torch.minimum(a[:, 0], b[:, 0]))

    cfg, _, _ = HEADS["moment"]
    head = build_task_head(dict(cfg, visual_dim=16))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        vis, spans = clips(16, g)
        loss = head.loss(head(torch.zeros(16, D), vis), dict(spans=spans))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vis, spans = clips(128, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = head.predict(torch.zeros(128, D), vis)["spans"]
    assert (tiou(torch.tensor([[0.0, 1.0]]).expand(128, 2), spans) > 0.5).float().mean() == 0
    assert (tiou(pred, spans) > 0.5).float().mean() > 0.8


def _lit_objects(n, generator, grid=6, channels=16, objects=3):
    """Images where ``objects`` cells are lit, each object on its own channel (its colour) at its own cell, both
    drawn per image; the query names one object by its colour (a one-hot of the channel), its box is its cell."""
    feats = 0.1 * torch.randn(n, 1, grid * grid, channels, generator=generator)
    cells = torch.stack([torch.randperm(grid * grid, generator=generator)[:objects] for _ in range(n)])
    colours = torch.stack([torch.randperm(channels, generator=generator)[:objects] for _ in range(n)])
    rows = torch.arange(n)
    for k in range(objects):
        feats[rows, 0, cells[:, k], colours[:, k]] += 1.0
    named = torch.randint(0, objects, (n,), generator=generator)
    cell = cells[rows, named]
    x, y = (cell % grid).float(), (cell // grid).float()
    boxes = torch.stack((x / grid, y / grid, (x + 1) / grid, (y + 1) / grid), 1)
    query = torch.nn.functional.one_hot(colours[rows, named], D).float()
    return query, dict(features=feats, grid_size=(grid, grid), image_size=(48, 48)), boxes


def test_region_decoder_head_finds_the_named_object_on_held_out_images():
    """Not memorising: trained on random images of three lit cells, the decoder head boxes the one whose colour the
    query names on new images; the paper's MLP head, which sees only the query, cannot know where it is."""
    results = {}
    for cfg in (dict(type="RegionHead", in_dim=D, hidden_dim=32),
                dict(type="RegionDecoderHead", in_dim=D, visual_dim=16, hidden_dim=32, num_heads=4, num_layers=1)):
        torch.manual_seed(0)
        head = build_task_head(cfg)
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(500):
            query, vis, boxes = _lit_objects(32, g)
            loss = head.loss(head(query, vis), dict(boxes=boxes))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        query, vis, boxes = _lit_objects(256, torch.Generator().manual_seed(99))
        with torch.no_grad():
            results[cfg["type"]] = float(_mean_iou(head.predict(query, vis)["boxes"], boxes))
    assert results["RegionHead"] < 0.2, results  # measured 0.03
    assert results["RegionDecoderHead"] > 0.75, results  # measured 0.89


def test_region_decoder_head_reads_only_the_real_frames_of_a_video():
    """Padded frames (``frame_mask`` False) change nothing: not what the token reads, not where it points."""
    head = build_task_head(dict(HEADS["region_decoder"][0])).eval()
    query, vis = torch.randn(B, D), visual(t=2)
    padded = dict(vis, features=torch.cat((vis["features"], 100 * torch.randn(B, 1, 16, C)), dim=1),
                  frame_mask=torch.tensor([[True, True, False], [True, True, False]]))
    with torch.no_grad():
        a, b = head(query, vis), head(query, padded)
    assert torch.allclose(a["boxes"], b["boxes"], atol=1e-5)
    assert b["point_logits"].shape == (B, 3 * 16)
    assert (b["point_logits"].softmax(-1)[:, 32:] < 1e-6).all()
