# A tiny random timm ViT (32x32 input, 8x8 patches -> a 4x4 grid of 32-d tokens).
# For real weights: model_name='vit_large_patch14_clip_336.openai', no model_kwargs,
# pretrained='/path/to/open_clip_pytorch_model.bin' (or timm's model.safetensors).
vision_encoder = dict(
    type="TimmVisionEncoder",
    model_name="vit_tiny_patch16_224",
    model_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
    pretrained=None,
    freeze=True,
    select_layer=-2,
    with_cls=False,
)
