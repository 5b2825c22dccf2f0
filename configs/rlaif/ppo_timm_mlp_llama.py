# VLM-RLAIF stage 3: PPO of the SFT policy against the reward model, with a per-token KL penalty to
# the SFT model, a value model initialised from the reward model, GAE and clipped losses; the
# penalties of the paper (an answer without end-of-sequence, length) are configurable.
#   tpo train configs/rlaif/ppo_timm_mlp_llama.py
_base_ = ["../mllm/timm_mlp_llama.py"]
work_dir = "work_dirs/rlaif/ppo"
load_from = "work_dirs/rlaif/sft/checkpoints/step_00002000"
algorithm = dict(
    type="PPO",
    reward_model=dict(config="configs/rlaif/reward_timm_mlp_llama.py",
                      checkpoint="work_dirs/rlaif/reward/checkpoints/step_00001000"),
    value_model=None,            # a copy of the reward model
    reference="copy",            # "adapter" with model.llm.lora: policy and reference share the base
    max_new_tokens=8,
    temperature=1.0,
    top_p=1.0,
    ppo_epochs=2,
    clip_range=0.2,
    clip_range_value=0.2,
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
    kl_coef=0.05,
    kl_estimator="k1",
    adaptive_kl=None,            # or dict(target=1.0, horizon=10000)
    missing_eos_penalty=-2.0,
    length_coef=0.0,
    value_lr=1e-4,
)
data = dict(
    train=dict(type="SampleDataset", ann_file="work_dirs/synth/train.jsonl", tasks=["qa"]),
    val=dict(type="SampleDataset", ann_file="work_dirs/synth/val.jsonl", tasks=["qa"]),
    collator=dict(max_prompt_length=None),
)
train = dict(batch_size=16, max_steps=300, seed=0, log_interval=10)
optim = dict(lr=3e-5, weight_decay=0.0)   # the paper's
schedule = dict(type="constant")
checkpoint = dict(interval=50, keep_last=1, save_final=True)
evaluation = dict(interval=None, metrics=[dict(type="QAAccuracy")], at_end=True)
