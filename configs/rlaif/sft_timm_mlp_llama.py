# VLM-RLAIF stage 0: the SFT model that samples answers, judges (as the policy) and starts PPO.
# Tiny timm ViT + MLP + Llama on the synthetic benchmark's QA samples; CPU is enough (~4 min on one core).
# The random ViT is trained too here (frozen, it leaves the tiny model at chance on most questions).
#   tpo data synth --out work_dirs/synth --num 1000 --seed 0
#   tpo train configs/rlaif/sft_timm_mlp_llama.py
_base_ = ["../mllm/timm_mlp_llama.py"]
work_dir = "work_dirs/rlaif/sft"
model = dict(vision_encoder=dict(freeze=False))
algorithm = dict(type="SFT", max_new_tokens=8)
data = dict(
    train=dict(type="SampleDataset", ann_file="work_dirs/synth/train.jsonl", tasks=["qa"]),
    val=dict(type="SampleDataset", ann_file="work_dirs/synth/val.jsonl", tasks=["qa"]),
    collator=dict(max_length=512),
)
train = dict(batch_size=16, max_steps=2000, seed=0, log_interval=100)
optim = dict(lr=1e-3, weight_decay=0.0)
schedule = dict(type="cosine", warmup_steps=10)
checkpoint = dict(interval=500, keep_last=1, save_final=True)
evaluation = dict(interval=None, metrics=[dict(type="QAAccuracy")], at_end=True)
