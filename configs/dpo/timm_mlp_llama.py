# DPO of the timm_mlp_llama composition on the synthetic benchmark's preference pairs (chosen: the
# correct answer, rejected: a wrong one), with TRL's sigmoid loss through the fused preference kernel.
#   tpo data synth --out work_dirs/synth --num 64 --seed 0 --preference-pairs all   # a pair per question
#   tpo train configs/sft/timm_mlp_llama.py      # optional: SFT first, then start DPO from its weights:
#   tpo train configs/dpo/timm_mlp_llama.py \
#       --cfg-options load_from=work_dirs/sft_timm_mlp_llama/checkpoints/step_00000200
# What to expect (benchmarks/bench_dpo_heldout.py): 300 steps on the pairs of 400 scenes rank 46-53% of
# held-out pairs right, no better than the same run with black frames (49%): within a CPU budget the tiny
# model does not learn to read the answers from the frames (a pretrained vision tower is what real runs use).
# Not even with one shape a scene (`tpo data synth --objects 1 1`: 0.57 vs 0.575 blind after 3,000 steps); the
# benchmark's shapes are small, and the tiny ViT's 8x8 patches find a square of 4-8 of its 32 pixels unreliably
# (0.47-0.91 over three seeds of the colour pairs; 4x4 patches 0.74-0.93).
# With a tower that sees them, the pairs of images of one shape (`tpo data synth --objects 1 1 --image-fraction 1`)
# are learnt: benchmarks/synth_vision_tower.py (the tiny ViT at 64 px, trained on the benchmark's own scenes),
# SFT first (6,000 steps), then this config at lr 2e-3 for 1,000 steps: 0.94-0.97 of held-out pairs ranked
# right over three seeds vs 0.62 blind (bench_dpo_heldout.py --vision-tower; its docstring has the commands).
# Other losses: algorithm.loss=dict(type="DPOLoss", loss_type="ipo") / dict(type="SimPOLoss") (reference-free).
# Reference: "copy" (a frozen copy), "adapter" (LoRA models: adapters disabled), "precomputed" (log-probs
# computed once, cached in the work dir).
_base_ = [
    "../mllm/timm_mlp_llama.py",
    "../_base_/data/synth_preference.py",
    "../_base_/schedules/tiny_cpu.py",
]
# The synthetic benchmark's videos have 8 frames and its questions name times to 1/8 ("at 0.38"): the
# model sees every frame (the composition samples 4).
model = dict(num_frames=8)
work_dir = "work_dirs/dpo_timm_mlp_llama"
load_from = None
algorithm = dict(
    type="DPO",
    loss=dict(type="DPOLoss", loss_type="sigmoid", beta=0.1),
    reference="copy",
    logprob="fused",
)
optim = dict(lr=5e-4, param_groups=dict(projector=dict(lr=1e-3)))
evaluation = dict(interval=50, metrics=[dict(type="PairwiseAccuracy")], batch_size=8, at_end=True)
