# The README's main job: a tiny but complete TPO experiment on CPU.
# SFT-only baseline vs TPO (three stages), the same optimiser steps, the same data.
work_dir = "work_dirs/tiny_experiment"
data_root = "work_dirs/synth"  # the runs' data paths under this are moved to <work_dir>/synth
synth = dict(num=40, seed=0, frames=4, size=32)
runs = dict(
    sft=dict(config="configs/sft/tiny_cpu.py"),
    tpo=dict(config="configs/tpo/recipes/tiny_cpu.py"),
)
same_budget = True
evaluation = dict(split="test", max_new_tokens=24)
# torch intra-op threads: the tiny models run fastest on one (a machine busy with other jobs makes two threads
# spin against each other: measured under a load of 5, 44 s on one thread, 249 s on two)
threads = 1
