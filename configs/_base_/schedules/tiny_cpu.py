# A short schedule for the tiny models on a CPU: global batch 8 (micro-batches of 4, accumulated as the
# number of processes requires), 200 steps, AdamW with a warm-up and a cosine decay, the projector at a
# higher rate. Longer runs: --cfg-options train.max_steps=2000 (or train.max_epochs=3).
train = dict(
    batch_size=8,            # samples (pairs for DPO) per optimiser step, over all processes
    micro_batch_size=4,      # per process and forward pass; accumulation = batch_size / (micro x processes)
    max_steps=200,
    max_epochs=None,
    seed=0,
    grad_clip=1.0,
    mixed_precision=None,    # "bf16" / "fp16" (or accelerate launch --mixed_precision)
    log_interval=1,
    progress_bar=True,
    tensorboard=True,
)
optim = dict(
    type="AdamW",
    lr=1e-3,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    no_decay=["bias", "norm"],
    # named groups by parameter-name pattern (defaults: projector, heads, task_tokens, lora, embeddings, ...)
    param_groups=dict(projector=dict(lr=2e-3)),
)
schedule = dict(type="cosine", warmup_ratio=0.05, min_lr_ratio=0.1)
checkpoint = dict(interval=100, keep_last=2, save_final=True)
