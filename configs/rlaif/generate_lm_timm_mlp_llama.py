# VLM-RLAIF stage 1 as in the paper: the SFT policy judges its own answers, reading the video and a
# detailed description of it; the template is this config's, the verdict is the policy's next-token
# probability of "A" vs "B", asked in both orders (position bias). The ablation judges without context.
#   tpo rlaif generate configs/rlaif/generate_lm_timm_mlp_llama.py
_base_ = ["./generate_rule_timm_mlp_llama.py"]
judge = dict(
    _delete_=True,
    type="LMJudge",
    model="policy",
    template=(
        "You compare two answers to a question about a {media}.\n"
        "{context_block}"
        "Question: {question}\n"
        "Answer A: {answer_a}\n"
        "Answer B: {answer_b}\n"
        "Which answer is better? A good answer is accurate (it agrees with the {media} and states nothing "
        "that the {media} does not show), helpful, natural and concise."
    ),
    verdict_prefix="Verdict: the better answer is",
    labels=("A", "B"),
    rationale_tokens=0,
    tie_margin=0.0,
)
out = "work_dirs/rlaif/pairs_lm/train.jsonl"
