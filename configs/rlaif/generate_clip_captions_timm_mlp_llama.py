# Stage 1 with the paper's context: the policy captions each quarter of the video, the captions with
# their time spans make the detailed description the policy then judges with.
#   tpo rlaif generate configs/rlaif/generate_clip_captions_timm_mlp_llama.py
_base_ = ["./generate_lm_timm_mlp_llama.py"]
context = dict(_delete_=True, type="ClipCaptionContext", model="policy", num_segments=4, max_new_tokens=24)
out = "work_dirs/rlaif/pairs_clip/train.jsonl"
