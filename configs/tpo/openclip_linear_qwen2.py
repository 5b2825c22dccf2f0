# TPO: the openclip_linear_qwen2 composition plus region, temporal, mask and track heads on task tokens.
_base_ = ["../mllm/openclip_linear_qwen2.py", "../_base_/models/tpo_tasks_tiny.py"]
model = dict(
    type="TPOModel",
    tasks={{_base_.tasks}},
    box_encoder={{_base_.box_encoder}},
    assign_weight=1.0,
)
