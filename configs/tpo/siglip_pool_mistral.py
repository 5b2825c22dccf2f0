# TPO: the siglip_pool_mistral composition plus region, temporal, mask and track heads on task tokens.
_base_ = ["../mllm/siglip_pool_mistral.py", "../_base_/models/tpo_tasks_tiny.py"]
model = dict(
    type="TPOModel",
    tasks={{_base_.tasks}},
    box_encoder={{_base_.box_encoder}},
    assign_weight=1.0,
)
