# The SFT-only baseline of the tiny experiment (configs/experiments/tiny_cpu.py): the same
# timm + MLP + Llama model without task heads, trained on every conversation of the
# synthetic benchmark (grounding answers as text) for as many steps as the TPO recipe.
_base_ = ["../mllm/timm_mlp_llama.py"]

_data_root = "work_dirs/synth"
algorithm = dict(type="SFT")
data = dict(
    train=dict(type="SampleDataset", ann_file=_data_root + "/train.jsonl", num_frames=4),
    collator=dict(max_length=512),
)
train = dict(batch_size=8, max_steps=150, seed=0, log_interval=5, progress_bar=False, tensorboard=False)
optim = dict(lr=5e-3, weight_decay=0.0)
schedule = dict(type="cosine", warmup_steps=5)
checkpoint = dict(interval=None, keep_last=1, save_final=True)
