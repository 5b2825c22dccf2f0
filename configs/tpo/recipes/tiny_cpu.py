# TPO's three-stage recipe on the tiny timm + MLP + Llama model, CPU-sized.
# Data: a synthetic benchmark written by `tpo data synth --out work_dirs/synth ...` (`tpo experiment`
# re-roots it; elsewhere, point each stage's files with --cfg-options: stages.0.data.train.ann_file=...,
# stages.1.data.train.ann_file=..., stages.2.data.train.datasets.0.ann_file=... and ...datasets.1.ann_file=...;
# data.train.ann_file is refused, since the cotrain stage replaces data.train whole).
_base_ = ["../timm_mlp_llama.py"]

_data_root = "work_dirs/synth"
_task_data = ["grounding", "temporal_grounding", "segmentation", "tracking"]
_chat_data = ["qa", "caption"]

model = dict(num_frames=4)
algorithm = dict(type="TPO")
data = dict(
    train=dict(type="SampleDataset", ann_file=_data_root + "/train.jsonl", num_frames=4),
    collator=dict(max_length=512, task_token_position="start"),
)
train = dict(batch_size=8, max_steps=30, seed=0, log_interval=5, progress_bar=False, tensorboard=False)
optim = dict(lr=5e-3, weight_decay=0.0)
schedule = dict(type="cosine", warmup_steps=3)
checkpoint = dict(interval=None, keep_last=1, save_final=True)

stages = [
    # 1. task assignment: the LLM learns to emit the task tokens
    dict(
        name="assign",
        algorithm=dict(type="TPO", losses=["^lm$", "^assign$"]),
        data=dict(train=dict(tasks=_task_data)),
        train=dict(max_steps=40),
    ),
    # 2. task-head training: heads, task embeddings and the box encoder; the LLM frozen
    dict(
        name="heads",
        algorithm=dict(type="TPO", losses=[r"^(region|temporal|mask|track)\."],
                       trainable=[r"^heads\.", r"^task_embeddings\.", r"^box_encoder\."]),
        data=dict(train=dict(tasks=_task_data)),
        optim=dict(lr=5e-3),
        train=dict(max_steps=40),
    ),
    # 3. multi-task co-training: task data mixed 1:1 with conversation data, all losses
    dict(
        name="cotrain",
        algorithm=dict(type="TPO"),
        data=dict(train=dict(
            _delete_=True,
            type="MixedDataset",
            datasets=[
                dict(type="SampleDataset", ann_file=_data_root + "/train.jsonl", num_frames=4, tasks=_task_data),
                dict(type="SampleDataset", ann_file=_data_root + "/train.jsonl", num_frames=4, tasks=_chat_data),
            ],
            ratios=[1, 1],
        )),
        optim=dict(lr=3e-3),
        train=dict(max_steps=70),
    ),
]
