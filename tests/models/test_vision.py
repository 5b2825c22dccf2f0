"""Vision encoders (timm, open_clip, transformers) against the contract the
MLLM relies on, checked against each library's own forward paths."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from tpo.registry import VISION_ENCODERS, build_vision_encoder, registered_names

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "_base_" / "models"

TIMM = dict(
    type="TimmVisionEncoder",
    model_name="vit_tiny_patch16_224",
    model_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
)
OPEN_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, layers=2, width=32, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)
OPEN_CLIP = dict(type="OpenCLIPVisionEncoder", model_cfg=OPEN_CLIP_CFG)
HF_FIELDS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
CLIP = dict(type="CLIPVisionEncoder", config=dict(model_type="clip_vision_model", **HF_FIELDS))
SIGLIP = dict(type="SiglipVisionEncoder", config=dict(model_type="siglip_vision_model", **HF_FIELDS))
HF = dict(type="HFVisionEncoder", config=dict(model_type="clip_vision_model", **HF_FIELDS))
KINDS = {"timm": TIMM, "open_clip": OPEN_CLIP, "clip": CLIP, "siglip": SIGLIP, "hf": HF}
HAS_CLS = {"timm": True, "open_clip": True, "clip": True, "siglip": False, "hf": True}


def build(kind_or_cfg, **overrides):
    cfg = copy.deepcopy(KINDS[kind_or_cfg] if isinstance(kind_or_cfg, str) else kind_or_cfg)
    cfg.update(overrides)
    return build_vision_encoder(cfg)


def copy_weights(dst, src):
    dst.load_state_dict(src.state_dict())
    return dst


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


# ----------------------------------------------------------------------------- registry and base configs
def test_every_encoder_is_registered():
    names = registered_names(VISION_ENCODERS)
    for name in ("TimmVisionEncoder", "OpenCLIPVisionEncoder", "HFVisionEncoder", "CLIPVisionEncoder",
                 "SiglipVisionEncoder"):
        assert name in names


@pytest.mark.parametrize("name", ["timm_vit_tiny", "openclip_tiny", "siglip_tiny", "clip_tiny"])
def test_base_config_builds_and_encodes_images_and_videos(name):
    path = CONFIGS / f"vision_{name}.py"
    assert set(Config.fromfile(str(path)).keys()) == {"vision_encoder"}
    encoder = build_vision_encoder(str(path))
    assert encoder.image_size == (32, 32)
    image_out = encoder(images(2))
    assert image_out.shape == (2, 1, encoder.num_tokens, encoder.out_dim)
    assert encoder.grid_size == (4, 4) and encoder.num_tokens == 16  # 32 px / 8 px patches, no CLS
    video = torch.randn(2, 3, 3, 32, 32)
    video_out = encoder(video)
    assert video_out.shape == (2, 3, encoder.num_tokens, encoder.out_dim)
    # frames go through in one call, each in its place
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(video_out[b, t], encoder(video[b, t][None])[0, 0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- features match the libraries
def test_timm_tokens_are_the_blocks_output():
    encoder = build("timm", select_layer=-1, with_cls=True)
    x = images()
    tokens = encoder(x)[:, 0]
    model = encoder.model
    assert encoder.num_tokens == 16 + model.num_prefix_tokens and encoder.grid_size is None
    # the last block's output, CLS first, is what forward_features normalises
    torch.testing.assert_close(model.norm(tokens), model.forward_features(x))


def test_open_clip_tokens_are_the_transformer_output():
    encoder = build("open_clip", select_layer=-1, with_cls=True)
    x = images()
    tokens = encoder(x)[:, 0]
    visual = encoder.model
    visual.output_tokens = True
    try:
        _, reference = visual(x)  # ln_post of the last block's patch tokens
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(visual.ln_post(tokens[:, 1:]), reference)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_tokens_are_llava_hidden_states(kind):
    x = images()
    with_cls = build(kind, with_cls=True)
    without = copy_weights(build(kind), with_cls)
    hidden = with_cls.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # LLaVA's choice
    torch.testing.assert_close(with_cls(x)[:, 0], hidden)
    prefix = 1 if HAS_CLS[kind] else 0
    torch.testing.assert_close(without(x)[:, 0], hidden[:, prefix:])
    assert without.grid_size == (4, 4)
    assert with_cls.grid_size == (None if prefix else (4, 4))


@pytest.mark.parametrize("kind", list(KINDS))
def test_with_cls_puts_prefix_tokens_first(kind):
    x = images()
    plain = build(kind)
    cls = copy_weights(build(kind, with_cls=True), plain)
    out, out_cls = plain(x), cls(x)
    extra = 1 if HAS_CLS[kind] else 0
    assert cls.num_tokens == plain.num_tokens + extra
    assert out_cls.shape == (2, 1, plain.num_tokens + extra, plain.out_dim)
    torch.testing.assert_close(out_cls[:, :, extra:], out)
    assert (cls.grid_size is None) == bool(extra)


@pytest.mark.parametrize("kind", ["timm", "open_clip", "clip", "siglip"])
def test_select_layer_changes_features(kind):
    x = images()
    penultimate = build(kind)  # select_layer=-2 by default
    last = copy_weights(build(kind, select_layer=-1), penultimate)
    first = copy_weights(build(kind, select_layer=0), penultimate)
    a, b = penultimate(x), last(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(first(x), a)  # two blocks: block 0 is the penultimate


# ----------------------------------------------------------------------------- conv nets
def test_timm_conv_net_flattens_its_stage_map():
    encoder = build_vision_encoder(dict(type="TimmVisionEncoder", model_name="test_resnet"))
    x = torch.randn(1, 3, *encoder.image_size)
    stage = encoder.model.forward_intermediates(x, indices=[-2], intermediates_only=True)[0]
    out = encoder(x)
    h, w = encoder.grid_size
    assert out.shape == (1, 1, h * w, encoder.out_dim) and stage.shape[1:] == (encoder.out_dim, h, w)
    torch.testing.assert_close(out[0, 0], stage[0].flatten(1).T)


def test_open_clip_modified_resnet():
    cfg = copy.deepcopy(OPEN_CLIP_CFG)
    cfg["vision_cfg"] = dict(image_size=32, layers=(1, 1, 1, 1), width=8, head_width=8)
    encoder = build_vision_encoder(dict(type="OpenCLIPVisionEncoder", model_cfg=cfg, with_cls=True))
    assert type(encoder.model).__name__ == "ModifiedResNet"
    out = encoder(images())
    assert encoder.grid_size is not None  # no CLS to keep
    assert out.shape == (2, 1, encoder.grid_size[0] * encoder.grid_size[1], encoder.out_dim)


# ----------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("kind", ["timm", "open_clip", "clip"])
def test_freeze(kind):
    encoder = build(kind)
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not encoder(images()).requires_grad


@pytest.mark.parametrize("kind", ["timm", "open_clip", "clip"])
def test_unfrozen_encoder_trains(kind):
    encoder = build(kind, freeze=False)
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    encoder(images()).square().mean().backward()
    first = next(p for name, p in encoder.named_parameters() if "weight" in name and p.ndim == 4)  # patch conv
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_encoder_runs_in_lower_precision():
    encoder = build("timm").to(torch.bfloat16)
    out = encoder(images())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- preprocessing
def test_preprocess_uint8_and_float_of_another_size():
    encoder = build("timm")
    raw = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)
    out = encoder.preprocess(raw)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(encoder.preprocess(raw.float() / 255), out)
    assert encoder(out).shape == (2, 1, 16, 32)
    video = encoder.preprocess(torch.rand(1, 4, 3, 20, 24))
    assert video.shape == (1, 4, 3, 32, 32)


def test_preprocess_normalises_with_the_encoder_constants():
    encoder = build("open_clip")  # OpenAI CLIP mean/std from open_clip's preprocess config
    assert encoder.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    value = 0.25
    out = encoder.preprocess(torch.full((3, 17, 23), value))
    for c in range(3):
        expected = (value - encoder.image_mean[c]) / encoder.image_std[c]
        torch.testing.assert_close(out[c], torch.full((32, 32), expected), rtol=1e-4, atol=1e-4)


def test_preprocess_pil_images():
    from PIL import Image

    encoder = build("clip")
    array = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8)
    pil = Image.fromarray(array.numpy())
    single = encoder.preprocess(pil)
    assert single.shape == (3, 32, 32)
    torch.testing.assert_close(single, encoder.preprocess(array.permute(2, 0, 1)))
    batch = encoder.preprocess([pil, pil.convert("L"), pil.resize((10, 12))])
    assert batch.shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch[0], single)


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, ValueError, "[0, 1]"),
        (torch.rand(2, 8, 8, 3), ValueError, "[..., 3, h, w]"),
        (torch.randint(0, 9, (3, 8, 8), dtype=torch.int32), TypeError, "uint8"),
        ("image.png", TypeError, "PIL image"),
        ([], ValueError, "empty"),
    ],
)
def test_preprocess_rejects_bad_images(bad, error, words):
    encoder = build("timm")
    with pytest.raises(error) as info:
        encoder.preprocess(bad)
    assert words in str(info.value)


# ----------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.randn(3, 32, 32), "[B, 3, H, W]"),
        (torch.randn(1, 1, 1, 3, 32, 32), "[B, T, 3, H, W]"),
        (torch.randn(2, 4, 32, 32), "3 (RGB) channels"),
        (torch.randn(2, 32, 32, 3), "3 (RGB) channels"),
        (torch.randn(2, 3, 16, 16), "expects 32x32"),
        (torch.randn(2, 2, 3, 64, 32), "expects 32x32"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "preprocess"),
    ],
)
@pytest.mark.parametrize("kind", ["timm", "siglip"])
def test_forward_rejects_bad_shapes(kind, bad, words):
    encoder = build(kind)
    with pytest.raises(ValueError) as info:
        encoder(bad)
    assert words in str(info.value)


def test_forward_rejects_non_tensors():
    with pytest.raises(TypeError, match="preprocess"):
        build("timm")([[0.0]])


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("kind", ["timm", "open_clip", "clip", "siglip", "hf"])
def test_missing_pretrained_names_path_and_key(kind):
    with pytest.raises(FileNotFoundError) as info:
        build(kind, pretrained="/nope/weights.pth")
    assert "/nope/weights.pth" in str(info.value) and "vision_encoder.pretrained" in str(info.value)


def test_download_needs_the_flag():
    with pytest.raises(ValueError, match="allow_download"):
        build("timm", pretrained=True)


@pytest.mark.parametrize(
    "cfg, words",
    [
        (dict(TIMM, select_layer=2), "vision_encoder.select_layer"),
        (dict(TIMM, select_layer=-3), "[-2, 1]"),
        (dict(type="TimmVisionEncoder", model_name="test_resnet", select_layer=7), "vision_encoder.select_layer"),
        (dict(OPEN_CLIP, select_layer=5), "vision_encoder.select_layer"),
        (dict(CLIP, select_layer=-3), "vision_encoder.select_layer"),
        (dict(TIMM, model_name="vit_tiny_patch16_22"), "did you mean 'vit_tiny_patch16_224'"),
        (dict(TIMM, model_kwargs=dict(num_classes=10)), "vision_encoder.model_kwargs"),
        (dict(type="OpenCLIPVisionEncoder", model_name="ViT-B-3"), "did you mean 'ViT-B-32'"),
        (dict(type="OpenCLIPVisionEncoder"), "vision_encoder.model_name"),
        (dict(OPEN_CLIP, model_name="ViT-B-32"), "not both"),
        (dict(OPEN_CLIP, model_cfg=dict(embed_dim=8)), "vision_cfg"),
        (dict(type="HFVisionEncoder", config=dict(model_type="clip_vison_model")), "'clip_vision_model'"),
        (dict(type="HFVisionEncoder", config=dict(hidden_size=8)), "missing model_type"),
        (dict(type="HFVisionEncoder"), "vision_encoder.config"),
        (dict(SIGLIP, config=dict(model_type="clip_vision_model")), "SiglipVisionEncoder builds"),
    ],
)
def test_bad_configs_are_named(cfg, words):
    with pytest.raises(ValueError) as info:
        build_vision_encoder(copy.deepcopy(cfg))
    assert words in str(info.value)


@pytest.mark.parametrize(
    "key, value", [("select_layer", "-2"), ("freeze", "yes"), ("with_cls", 1), ("allow_download", "no")]
)
def test_option_types_are_checked(key, value):
    with pytest.raises(TypeError, match=f"vision_encoder.{key}"):
        build("timm", **{key: value})


# ----------------------------------------------------------------------------- real weights through real loaders
def assert_loads(reference, loaded):
    """``loaded`` holds ``reference``'s weights and reproduces its output exactly."""
    x = images()
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_timm_loads_a_local_state_dict(tmp_path):
    from safetensors.torch import save_file

    reference = build("timm")
    torch.save(reference.model.state_dict(), tmp_path / "vit.pth")
    torch.manual_seed(1)
    fresh = build("timm")
    assert not torch.allclose(fresh(images()), reference(images()))
    assert_loads(reference, build("timm", pretrained=str(tmp_path / "vit.pth")))
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, folder / "model.safetensors")
    assert_loads(reference, build("timm", pretrained=str(folder)))


def test_timm_rejects_a_checkpoint_of_another_model(tmp_path):
    other = build_vision_encoder(dict(type="TimmVisionEncoder", model_name="test_resnet"))
    torch.save(other.model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="vision_encoder.pretrained"):
        build("timm", pretrained=str(tmp_path / "resnet.pth"))


def _full_clip_checkpoint(reference, path):
    """A whole open_clip CLIP (text tower included) carrying ``reference``'s visual weights."""
    from open_clip.model import CLIP

    clip = CLIP(**copy.deepcopy(OPEN_CLIP_CFG))
    clip.visual.load_state_dict(reference.model.state_dict())
    torch.save(clip.state_dict(), path)


def test_open_clip_loads_a_local_checkpoint(tmp_path):
    reference = build("open_clip")
    _full_clip_checkpoint(reference, tmp_path / "clip.pt")
    torch.manual_seed(1)
    loaded = build("open_clip", pretrained=str(tmp_path / "clip.pt"))
    assert_loads(reference, loaded)
    assert not hasattr(loaded, "text") and not any("token_embedding" in n for n, _ in loaded.named_parameters())


def test_open_clip_by_name_and_hub_folder(tmp_path):
    import open_clip

    reference = build("open_clip")
    name = "tpo-test-tiny-vit"
    (tmp_path / f"{name}.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    _full_clip_checkpoint(reference, tmp_path / "clip.pt")
    torch.manual_seed(1)
    by_name = build_vision_encoder(
        dict(type="OpenCLIPVisionEncoder", model_name=name, pretrained=str(tmp_path / "clip.pt"))
    )
    assert_loads(reference, by_name)

    folder = tmp_path / "hub"
    folder.mkdir()
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    (folder / "open_clip_config.json").write_text(
        json.dumps(dict(model_cfg=OPEN_CLIP_CFG, preprocess_cfg=dict(mean=mean, std=std)))
    )
    (tmp_path / "clip.pt").rename(folder / "open_clip_pytorch_model.bin")
    from_folder = build_vision_encoder(dict(type="OpenCLIPVisionEncoder", pretrained=str(folder)))
    assert_loads(reference, from_folder)
    assert from_folder.image_mean == pytest.approx(tuple(mean)) and from_folder.image_std == pytest.approx(tuple(std))


def test_open_clip_rejects_a_checkpoint_of_another_model(tmp_path):
    torch.save(build("timm").model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="vision_encoder.pretrained"):
        build("open_clip", pretrained=str(tmp_path / "vit.pth"))


def test_hf_loads_a_save_pretrained_folder_with_its_processor_config(tmp_path):
    from transformers import CLIPImageProcessor

    reference = build("clip")
    reference.model.save_pretrained(tmp_path)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    CLIPImageProcessor(image_mean=mean, image_std=std, resample=2).save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = build_vision_encoder(dict(type="HFVisionEncoder", pretrained=str(tmp_path)))
    assert_loads(reference, loaded)
    assert loaded.image_mean == pytest.approx(tuple(mean)) and loaded.image_std == pytest.approx(tuple(std))
    assert loaded.interpolation == "bilinear"
    out = loaded.preprocess(torch.full((1, 3, 8, 8), 0.7))
    for c in range(3):
        torch.testing.assert_close(out[0, c], torch.full((32, 32), (0.7 - mean[c]) / std[c]), rtol=1e-4, atol=1e-4)
    # the alias reads the same folder; a family mismatch is an error
    assert_loads(reference, build_vision_encoder(dict(type="CLIPVisionEncoder", pretrained=str(tmp_path))))
    with pytest.raises(ValueError, match="SiglipVisionEncoder builds"):
        build_vision_encoder(dict(type="SiglipVisionEncoder", pretrained=str(tmp_path)))


def test_hf_loads_the_vision_tower_of_a_full_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(vision_config=HF_FIELDS, text_config=text, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    encoder = build_vision_encoder(dict(type="CLIPVisionEncoder", pretrained=str(tmp_path)))
    assert type(encoder.model).__name__ == "CLIPVisionModel"
    x = images()
    hidden = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(encoder(x)[:, 0], hidden[:, 1:])
    # no preprocessor_config.json: CLIP's documented defaults
    assert encoder.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_hf_rejects_incomplete_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    build("clip").model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[next(k for k in weights if k.endswith("layer_norm1.weight"))]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="vision_encoder.pretrained.*unset"):
        build_vision_encoder(dict(type="CLIPVisionEncoder", pretrained=str(tmp_path)))


def test_hf_siglip_defaults_and_config_overrides(tmp_path):
    encoder = build("siglip")
    assert encoder.image_mean == (0.5, 0.5, 0.5) and encoder.image_std == (0.5, 0.5, 0.5)
    encoder.model.save_pretrained(tmp_path)
    overridden = build_vision_encoder(dict(type="SiglipVisionEncoder", pretrained=str(tmp_path),
                                       config=dict(layer_norm_eps=1e-3)))
    assert overridden.model.config.layer_norm_eps == 1e-3
    with pytest.raises(ValueError, match="is a file"):
        build_vision_encoder(dict(type="SiglipVisionEncoder", pretrained=str(tmp_path / "config.json")))
