# timm ViT -> two-layer GELU MLP projector (LLaVA-1.5) -> Llama.
_base_ = [
    "../_base_/models/vision_timm_vit_tiny.py",
    "../_base_/models/llm_llama_tiny.py",
    "../_base_/models/tokenizer_tiny.py",
]
model = dict(
    type="MultimodalLLM",
    vision_encoder={{_base_.vision_encoder}},
    projector=dict(type="MLPProjector"),
    llm={{_base_.llm}},
    tokenizer={{_base_.tokenizer}},
    num_frames=4,
)
