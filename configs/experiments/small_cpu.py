# The main job scaled up six times, still on a CPU (about 3 min on one thread): 300 scenes (210 train the runs,
# 75 are the test split), 900 optimiser steps a run (TPO: 240 task assignment, 240 heads, 420 co-training).
#   tpo experiment configs/experiments/small_cpu.py
_base_ = ["./tiny_cpu.py"]
work_dir = "work_dirs/small_experiment"
synth = dict(num=300, splits=(0.7, 0.05, 0.25))
runs = dict(
    sft=dict(cfg_options={"train.max_steps": 900}),
    tpo=dict(cfg_options={"stages.0.train.max_steps": 240, "stages.1.train.max_steps": 240,
                          "stages.2.train.max_steps": 420}),
)
