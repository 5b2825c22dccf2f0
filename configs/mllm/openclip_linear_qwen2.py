# open_clip ViT visual tower -> linear projector (LLaVA-1) -> Qwen2.
_base_ = [
    "../_base_/models/vision_openclip_tiny.py",
    "../_base_/models/llm_qwen2_tiny.py",
    "../_base_/models/tokenizer_tiny.py",
]
model = dict(
    type="MultimodalLLM",
    vision_encoder={{_base_.vision_encoder}},
    projector=dict(type="LinearProjector"),
    llm={{_base_.llm}},
    tokenizer={{_base_.tokenizer}},
    num_frames=4,
)
