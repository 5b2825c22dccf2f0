# A tiny random open_clip ViT (32x32 input, 8x8 patches -> a 4x4 grid of 32-d tokens).
# For real weights: model_name='ViT-L-14-336' instead of model_cfg,
# pretrained='/path/to/open_clip_pytorch_model.bin'.
vision_encoder = dict(
    type="OpenCLIPVisionEncoder",
    model_cfg=dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, layers=2, width=32, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    ),
    pretrained=None,
    freeze=True,
    select_layer=-2,
    with_cls=False,
)
