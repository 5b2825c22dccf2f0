# SFT of the siglip_pool_mistral composition on the synthetic benchmark's conversations.
#   tpo data synth --out work_dirs/synth --num 64 --seed 0
#   tpo train configs/sft/siglip_pool_mistral.py [--cfg-options train.max_steps=20] [--resume]
_base_ = [
    "../mllm/siglip_pool_mistral.py",
    "../_base_/data/synth_sft.py",
    "../_base_/schedules/tiny_cpu.py",
]
work_dir = "work_dirs/sft_siglip_pool_mistral"
algorithm = dict(type="SFT", logprob="fused", max_new_tokens=32)
evaluation = dict(interval=100, metrics=[dict(type="QAAccuracy")], batch_size=8, max_batches=None, at_end=True)
