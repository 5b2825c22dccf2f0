"""The three base compositions: build, forward with labels, generate on an
image and on a video; splicing, masking and errors."""
from pathlib import Path

import pytest
import torch

from tpo.models.mllm import IGNORE_INDEX
from tpo.models.utils import load_model_weights
from tpo.registry import build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["timm_mlp_llama", "openclip_linear_qwen2", "siglip_pool_mistral"]


@pytest.fixture(scope="module", params=CONFIGS)
def model(request):
    torch.manual_seed(0)
    return build_model(ROOT / "configs" / "mllm" / f"{request.param}.py").eval()


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 40, 50), generator=g, dtype=torch.uint8)


def _video(frames=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, 40, 50), generator=g, dtype=torch.uint8)


def _batch(model, answers=("red", "two squares")):
    """Two samples, an image and a video, with labels on the answers only."""
    proc = model.processor
    media = [proc.prepare_media(_image(), "image"), proc.prepare_media(_video(), "video")]
    prompts = [proc.chat_prompt("What colour?", "image"), proc.chat_prompt("What moves?", "video")]
    texts = [p + a + model.tokenizer.eos_token for p, a in zip(prompts, answers)]
    inputs = proc(texts, media, padding_side="right")
    labels = inputs["input_ids"].clone()
    for b, prompt in enumerate(prompts):
        prompt_len = len(model.tokenizer(proc.expand_placeholders(prompt, [media[b].shape[0]]),
                                         add_special_tokens=False).input_ids)
        labels[b, :prompt_len] = IGNORE_INDEX
    labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
    return dict(inputs, labels=labels, ids=["img-0", "vid-0"])


def test_forward_loss_and_gradients(model):
    batch = _batch(model)
    model.train()
    out = model(batch)
    model.eval()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert out["hidden_states"].shape[:2] == batch["input_ids"].shape
    out["loss"].backward()
    for part in (model.projector, model.llm):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
    # the encoder is frozen by default in these configs
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_visual_tokens_are_spliced_at_placeholders(model):
    batch = _batch(model)
    embeds = model.embed_inputs(batch["input_ids"], batch["media"])
    visual = model.encode_media(batch["media"])
    for b in range(2):
        positions = torch.isin(batch["input_ids"][b], model.media_token_ids)
        assert positions.sum() == visual[b].shape[0]
        torch.testing.assert_close(embeds[b, positions], visual[b])
    frames = batch["media"][1].shape[0]
    assert frames == min(6, model.processor.num_frames)  # all frames of a shorter video
    assert visual[1].shape[0] == frames * model.tokens_per_frame


def test_labels_on_media_tokens_are_ignored(model):
    batch = _batch(model)
    noisy = batch["labels"].clone()
    media = torch.isin(batch["input_ids"], model.media_token_ids)
    noisy[media] = 5
    with torch.no_grad():
        torch.testing.assert_close(model(dict(batch, labels=noisy))["loss"], model(batch)["loss"])


def test_placeholder_count_mismatch_names_the_sample(model):
    batch = _batch(model)
    ids = batch["input_ids"].clone()
    first = torch.isin(ids[1], model.media_token_ids).nonzero()[0, 0]
    ids[1, first] = model.tokenizer.convert_tokens_to_ids("a") if "a" in model.tokenizer.get_vocab() else 10
    with pytest.raises(ValueError, match=r"sample 'vid-0'.*placeholder tokens"):
        model(dict(batch, input_ids=ids))


def test_generate_on_image_and_video(model):
    for kwargs in (dict(image=_image()), dict(video=_video())):
        answer = model.chat("Describe it.", max_new_tokens=6, **kwargs)
        assert isinstance(answer, str)
        again = model.chat("Describe it.", max_new_tokens=6, **kwargs)
        assert answer == again  # greedy decoding is deterministic
        torch.manual_seed(3)
        sampled = model.chat("Describe it.", max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, **kwargs)
        assert isinstance(sampled, str)


def test_batched_left_padded_generation_matches_single(model):
    proc = model.processor
    media = [proc.prepare_media(_image(), "image"), proc.prepare_media(_video(), "video")]
    prompts = [proc.chat_prompt("What colour is the big circle on the left?", "image"),
               proc.chat_prompt("Count.", "video")]
    batch = proc(prompts, media, padding_side="left")
    assert (batch["attention_mask"] == 0).any()
    together = model.generate(batch["input_ids"], batch["attention_mask"], media=batch["media"], max_new_tokens=5)
    for b in range(2):
        alone = proc([prompts[b]], [media[b]])
        single = model.generate(alone["input_ids"], alone["attention_mask"], media=alone["media"], max_new_tokens=5)
        assert together[b, : single.shape[1]].tolist() == single[0].tolist()


def test_kv_cache_gives_the_same_tokens(model):
    proc = model.processor
    media = [proc.prepare_media(_video(), "video")]
    batch = proc([proc.chat_prompt("Go.", "video")], media)
    cached = model.generate(batch["input_ids"], batch["attention_mask"], media=media, max_new_tokens=6)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], media=media, max_new_tokens=6,
                              use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_weights_round_trip(model, tmp_path):
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "model.safetensors"))
    torch.manual_seed(123)
    other = build_model(model_config_path(model)).eval()
    batch = _batch(model)
    with torch.no_grad():
        assert not torch.allclose(other(batch)["loss"], model(batch)["loss"])
        load_model_weights(other, tmp_path)
        torch.testing.assert_close(other(batch)["loss"], model(batch)["loss"], rtol=0, atol=0)


def model_config_path(model):
    encoder = type(model.vision_encoder).__name__.lower()
    name = next(c for c in CONFIGS if c.split("_")[0] in encoder)
    return ROOT / "configs" / "mllm" / f"{name}.py"


def test_checkpoint_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_weights(model, tmp_path)


def test_a_checkpoint_of_another_model_is_named_not_a_state_dict_traceback(model, tmp_path):
    """Weights of a model with another vocabulary (a TPO model's task tokens, say): the error names the
    tensors and, where `tpo train` left its config, the model type the checkpoint was trained as."""
    import json

    from safetensors.torch import save_model

    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"type": "TPOModel"}}))
    bigger = build_model(model_config_path(model), cfg_options={"model.tokenizer.vocab_size": 520}).eval()
    save_model(bigger, str(step / "model.safetensors"))
    with pytest.raises(ValueError, match=r"in shape \(.*(embed_tokens|lm_head).weight: \[520, .*in the checkpoint, "
                                         r"\[512, .*in the model.*trained as model.type='TPOModel'"):
        load_model_weights(model, step)


def test_bad_media_inputs(model):
    batch = _batch(model)
    with pytest.raises(ValueError, match="one \\(or None\\) each"):
        model(dict(batch, media=batch["media"][:1]))
    with pytest.raises(ValueError, match="image or a video, not both"):
        model.chat("x", image=_image(), video=_video())
    with pytest.raises(ValueError, match=r"frames \[T, 3, H, W\]"):
        model.processor.prepare_media(torch.zeros(3, 8, 8), "video")
    with pytest.raises(ValueError, match="1 media placeholder"):
        model.processor.expand_placeholders("<image> and <image>"[:7], [1, 1])


def test_lm_loss_equals_eager_cross_entropy(model):
    import torch.nn.functional as F

    batch = _batch(model)
    with torch.no_grad():
        out = model(batch)
        logits = model.llm.get_output_embeddings()(out["hidden_states"][:, :-1]).float()
        labels = batch["labels"][:, 1:]
        want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    assert out["num_tokens"] == (labels != IGNORE_INDEX).sum()
    model.kernel_backend = "eager"
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(batch)["loss"], want, rtol=1e-5, atol=1e-6)
    finally:
        model.kernel_backend = "auto"
