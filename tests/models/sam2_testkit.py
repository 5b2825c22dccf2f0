"""A tiny random SAM2 (transformers ``Sam2Config`` options) for the mask-head and TPO-model tests."""

S = 32  # SAM2's input size in the tiny config


def tiny_sam2_config(video=False):
    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=8,
        num_attention_heads=1,
        image_size=[S, S],
        blocks_per_stage=[1, 1, 1, 2],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[4],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = dict(
        model_type="sam2_vision_model",
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[S // 4, S // 4], [S // 8, S // 8], [S // 16, S // 16]],
        fpn_hidden_size=128,
    )
    cfg = dict(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=128, image_size=S, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(
            hidden_size=128, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
        ),
        initializer_range=0.1,  # the default 0.02 leaves a tiny random SAM2's logits ~1e-3
    )
    if video:  # the memory path needs memory_encoder_output_channels=64 < the hidden size
        cfg.update(
            image_size=S,
            num_maskmem=3,
            memory_attention_hidden_size=128,
            memory_attention_num_layers=1,
            memory_attention_feed_forward_hidden_size=32,
            memory_attention_rope_feat_sizes=[S // 16, S // 16],
            memory_encoder_hidden_size=128,
            memory_encoder_output_channels=64,
            mask_downsampler_embed_dim=128,
            memory_fuser_embed_dim=128,
            memory_fuser_intermediate_dim=64,
            max_object_pointers_in_encoder=4,
        )
    return cfg
