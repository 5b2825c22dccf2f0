# VLM-RLAIF stage 2: a reward model (the SFT model + a scalar head on the last answer token) learns the
# judge's preferences with the Bradley-Terry loss and the paper's centring term; held-out pairwise
# accuracy on the validation pairs.
#   tpo train configs/rlaif/reward_timm_mlp_llama.py
# LoRA instead of full fine-tuning: --cfg-options model.llm.lora.r=8 (see the commented lines).
_base_ = ["../_base_/models/vision_timm_vit_tiny.py", "../_base_/models/llm_llama_tiny.py",
          "../_base_/models/tokenizer_tiny.py"]
work_dir = "work_dirs/rlaif/reward"
model = dict(
    type="RewardModel",
    vision_encoder={{_base_.vision_encoder}},
    projector=dict(type="MLPProjector"),
    llm={{_base_.llm}},
    # llm=dict(**{{_base_.llm}}, lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    tokenizer={{_base_.tokenizer}},
    num_frames=4,
    init_from="work_dirs/rlaif/sft/checkpoints/step_00002000",
)
algorithm = dict(type="RewardModeling", loss=dict(type="BradleyTerryLoss", center_coef=1e-3))
data = dict(
    train=dict(type="SampleDataset", ann_file="work_dirs/rlaif/pairs/train.jsonl"),
    val=dict(type="SampleDataset", ann_file="work_dirs/rlaif/pairs/val.jsonl"),
    collator=dict(max_length=512),
)
train = dict(batch_size=16, max_steps=1000, seed=0, log_interval=50)
optim = dict(lr=5e-4, weight_decay=0.0)
schedule = dict(type="cosine", warmup_steps=10)
checkpoint = dict(interval=None, keep_last=1, save_final=True)
evaluation = dict(interval=50, metrics=[dict(type="PairwiseAccuracy")], at_end=True)
