"""``tpo train CONFIG [--cfg-options k=v ...] [--resume [CHECKPOINT]] [--work-dir DIR]``.

Single process: ``tpo train configs/sft/timm_mlp_llama.py``. Several processes
(DDP, FSDP, DeepSpeed, as accelerate's config says):
``accelerate launch [--config_file ...] -m tpo.engine.main CONFIG`` or
``torchrun --nproc_per_node N -m tpo.engine.main CONFIG``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def build_parser(prog: str = "tpo train") -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(prog=prog, description="Train a model as a config says (SFT, DPO, ...).")
    parser.add_argument("config", help="training config file (.py, .yaml or .json)")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
        help="override config entries, e.g. train.max_steps=10 data.train.ann_file=work_dirs/synth/train.jsonl",
    )
    parser.add_argument("--work-dir", help="where checkpoints, metrics and the report go (default: the config's "
                                           "work_dir, else work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint of the work dir, or from CHECKPOINT")
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    """The ``tpo train`` command: returns 0 when training finished."""
    from .trainer import Trainer

    args = build_parser().parse_args(argv)
    trainer = Trainer(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, resume=args.resume)
    report = trainer.fit()
    if report:
        brief = {k: report.get(k) for k in ("work_dir", "steps", "wall_time_s", "final_checkpoint")}
        brief["train_loss"] = report.get("train", {}).get("loss", {}).get("last")
        brief["val"] = {k: v.get("last") for k, v in report.get("val", {}).items()}
        print(json.dumps(brief, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
