# A tiny random transformers CLIP vision tower (32x32 input, 8x8 patches -> 16 tokens + CLS).
# For real weights (LLaVA's tower): config=None, pretrained='/path/to/clip-vit-large-patch14-336'.
vision_encoder = dict(
    type="CLIPVisionEncoder",
    config=dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    pretrained=None,
    freeze=True,
    select_layer=-2,
    with_cls=False,
)
