"""Context providers: the sample's description, captions of the whole video
and the paper's clip-wise captions, built from the registry."""
import pytest
import torch
from tpo.registry import build_judge, build_model

from tpo.rlaif.context import media_key


@pytest.fixture(scope="module")
def captioner():
    return build_model("configs/mllm/timm_mlp_llama.py", cfg_options={"model.num_frames": 2})


def video_item(seed=0, frames=8):
    g = torch.Generator().manual_seed(seed)
    return {"id": f"v{seed}", "media": torch.randint(0, 255, (frames, 3, 32, 32), dtype=torch.uint8, generator=g),
            "media_type": "video", "description": ["A red circle.", "It moves left."]}


def test_sample_description():
    provider = build_judge(dict(type="SampleDescription"))
    assert provider(video_item()) == "A red circle. It moves left."
    with pytest.raises(ValueError, match="sample 'x': has no 'description'"):
        provider({"id": "x", "description": None})
    assert build_judge(dict(type="SampleDescription", missing="none"))({"id": "x"}) is None


def test_clip_captions_cover_the_video_in_order(captioner):
    provider = build_judge(dict(type="ClipCaptionContext", model="policy", num_segments=4, max_new_tokens=3),
                           default_args={"policy": captioner})
    calls = []
    original = captioner.chat

    def spy(prompt, video=None, image=None, **kw):
        calls.append(video.shape[0])
        return original(prompt, video=video, image=image, **kw)

    captioner.chat = spy
    try:
        text = provider(video_item(frames=8))
        again = provider(video_item(frames=8))  # same media: from the cache
    finally:
        del captioner.chat
    assert calls == [2, 2, 2, 2]
    assert text == again
    spans = [part.split(":")[0] for part in text.split("From ")[1:]]
    assert spans == ["0.00 to 0.25", "0.25 to 0.50", "0.50 to 0.75", "0.75 to 1.00"]


def test_caption_context_and_cache_key(captioner):
    provider = build_judge(dict(type="CaptionContext", model="policy", max_new_tokens=3),
                           default_args={"policy": captioner})
    assert isinstance(provider(video_item()), str)
    assert media_key(video_item(0)) == media_key(video_item(0)) != media_key(video_item(1))
    assert provider({"id": "t", "media": None}) is None


def test_context_errors():
    with pytest.raises(ValueError, match="context.num_segments"):
        from tpo.registry import JUDGES, build_from_cfg, config_key

        with config_key("context"):
            build_from_cfg(dict(type="ClipCaptionContext", num_segments=0), JUDGES)
    with pytest.raises(ValueError, match="'policy' means the model being sampled"):
        build_judge(dict(type="CaptionContext"))
    with pytest.raises(TypeError, match="a model config"):
        build_judge(dict(type="CaptionContext", model=3))
