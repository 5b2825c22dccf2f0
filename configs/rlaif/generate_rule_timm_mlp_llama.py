# VLM-RLAIF stage 1 with the context-aware rule judge: the SFT policy samples 4 answers per question,
# the judge reads each pair against the video's detailed description (the sample's own, correct one),
# and the same judge also judges every pair without the description (the paper's context ablation).
#   tpo rlaif generate configs/rlaif/generate_rule_timm_mlp_llama.py
#   tpo rlaif generate configs/rlaif/generate_rule_timm_mlp_llama.py \
#       --cfg-options data.ann_file=work_dirs/synth/val.jsonl --out work_dirs/rlaif/pairs/val.jsonl
policy = dict(config="configs/mllm/timm_mlp_llama.py", checkpoint="work_dirs/rlaif/sft/checkpoints/step_00002000")
data = dict(ann_file="work_dirs/synth/train.jsonl", tasks=["qa"], num_frames=None, limit=None)
sampling = dict(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
judge = dict(type="RuleJudge", window=3, format_bonus=0.25)
context = dict(type="SampleDescription")
ablation = dict(no_context=True)
collator = dict(max_prompt_length=None)
out = "work_dirs/rlaif/pairs/train.jsonl"
log_interval = 50
