# A tiny random transformers SigLIP vision tower (32x32 input, 8x8 patches -> 16 tokens, no CLS).
# For real weights: config=None, pretrained='/path/to/siglip-so400m-patch14-384' (a save_pretrained folder).
vision_encoder = dict(
    type="SiglipVisionEncoder",
    config=dict(
        model_type="siglip_vision_model",
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
