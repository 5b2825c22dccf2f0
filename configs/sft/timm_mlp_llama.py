# SFT of the timm_mlp_llama composition on the synthetic benchmark's conversations.
#   tpo data synth --out work_dirs/synth --num 64 --seed 0
#   tpo train configs/sft/timm_mlp_llama.py [--cfg-options train.max_steps=20] [--resume]
_base_ = [
    "../mllm/timm_mlp_llama.py",
    "../_base_/data/synth_sft.py",
    "../_base_/schedules/tiny_cpu.py",
]
# The synthetic benchmark's videos have 8 frames and its questions name times to 1/8 ("at 0.38"): the
# model sees every frame (the composition samples 4).
model = dict(num_frames=8)
work_dir = "work_dirs/sft_timm_mlp_llama"
algorithm = dict(type="SFT", logprob="fused", max_new_tokens=32)
evaluation = dict(interval=100, metrics=[dict(type="QAAccuracy")], batch_size=8, max_batches=None, at_end=True)
