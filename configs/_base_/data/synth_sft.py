# Conversation data of the synthetic benchmark (`tpo data synth --out work_dirs/synth --num 64`): every
# sample with an answer (QA, captions, grounding, ...; preference samples train on their chosen answer).
# Another folder: --cfg-options data.train.ann_file=DIR/train.jsonl data.val.ann_file=DIR/val.jsonl
data = dict(
    train=dict(type="SampleDataset", ann_file="work_dirs/synth/train.jsonl", num_frames=8),
    val=dict(type="SampleDataset", ann_file="work_dirs/synth/val.jsonl", num_frames=8, tasks=["qa"]),
    collator=dict(max_length=512),
    num_workers=0,
)
