# Preference pairs of the synthetic benchmark (`tpo data synth --out work_dirs/synth --num 64
# --preference-pairs all`: a pair per question; without the flag, one per scene): each pair's chosen
# answer is the correct option of a question, the rejected one a wrong option of the same question.
data = dict(
    train=dict(type="SampleDataset", ann_file="work_dirs/synth/train.jsonl", num_frames=8, tasks=["preference"]),
    val=dict(type="SampleDataset", ann_file="work_dirs/synth/val.jsonl", num_frames=8, tasks=["preference"]),
    collator=dict(max_length=512),
    num_workers=0,
)
