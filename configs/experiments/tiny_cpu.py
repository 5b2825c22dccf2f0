# The README's main job: a tiny but complete TPO experiment on CPU.
# SFT-only baseline vs TPO (three stages), the same optimiser steps, the same data.
work_dir = "work_dirs/tiny_experiment"
data_root = "work_dirs/synth"  # the runs' data paths under this are moved to <work_dir>/synth
# 100 scenes: 40 train the runs, 50 are the held-out test split (about 270 questions, 50 boxes, 35 spans,
# 50 masks: enough for the table to mean something; evaluating them takes seconds)
synth = dict(num=100, seed=0, frames=4, size=32, splits=(0.4, 0.1, 0.5))
runs = dict(
    sft=dict(config="configs/sft/tiny_cpu.py"),
    tpo=dict(config="configs/tpo/recipes/tiny_cpu.py"),
)
same_budget = True
evaluation = dict(split="test", max_new_tokens=40)
# torch intra-op threads: one. Measured on 2 cores with the earlier 40-scene version: 38 s on one thread, 34 s on
# two when nothing else runs, but under a load of 5 from other jobs 44 s on one and 249 s on two (the two threads
# spin against each other). This version: 66-75 s on one thread on a quiet machine.
threads = 1
