# transformers SigLIP -> token-pooling projector (4 tokens a frame) -> Mistral.
_base_ = [
    "../_base_/models/vision_siglip_tiny.py",
    "../_base_/models/llm_mistral_tiny.py",
    "../_base_/models/tokenizer_tiny.py",
]
model = dict(
    type="MultimodalLLM",
    vision_encoder={{_base_.vision_encoder}},
    projector=dict(type="PoolingProjector", tokens_per_frame=4),
    llm={{_base_.llm}},
    tokenizer={{_base_.tokenizer}},
    num_frames=8,
)
