"""``tpo train CONFIG [--cfg-options k=v ...] [--resume [CHECKPOINT]] [--work-dir DIR]``.

Single process: ``tpo train configs/sft/timm_mlp_llama.py``. A config with
``stages=[...]`` (TPO's recipe, ``configs/tpo/recipes/``) trains its stages in
order, each in ``<work_dir>/<i>_<name>`` from the previous one's weights
(:mod:`tpo.engine.stages`). Several processes (DDP, FSDP, DeepSpeed, as
accelerate's config says):
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
    """The ``tpo train`` command: returns 0 when training finished. Under a launcher (torchrun,
    accelerate launch) it destroys the process group before returning: a process that exits
    with it alive can abort in interpreter shutdown (gloo's worker threads still hold tensors;
    pytorch/pytorch#190489), turning a finished run into a failed one."""
    try:
        return _train_main(argv)
    finally:
        end_distributed()


def end_distributed() -> None:
    """Destroy the default process group if one is up (every process calls it at its end)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train_main(argv: Sequence[str] | None = None) -> int:
    from tpo.errors import CONFIG_ERRORS, is_setup_error, print_config_error
    from tpo.registry import load_config

    from .stages import check_stages
    from .trainer import Trainer

    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the config checked whole before anything is built: its errors are one line, not a traceback
        staged = "stages" in load_config(args.config, args.cfg_options)
        if staged:
            check_stages(args.config, args.cfg_options, args.work_dir)
        else:
            trainer = Trainer(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, resume=args.resume)
    except CONFIG_ERRORS as err:
        return print_config_error(parser.prog, err)
    try:
        if staged:
            return _train_stages(parser, args)
        report = trainer.fit()
    except CONFIG_ERRORS as err:
        if not is_setup_error(err):  # not the config's: a bug, with its traceback
            raise
        return print_config_error(parser.prog, err)
    if report:
        brief = {k: report.get(k) for k in ("work_dir", "steps", "wall_time_s", "final_checkpoint")}
        brief["train_loss"] = report.get("train", {}).get("loss", {}).get("last")
        brief["val"] = {k: v.get("last") for k, v in report.get("val", {}).items()}
        print(json.dumps(brief, indent=2, default=str))
    return 0


def _train_stages(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """A staged recipe: every stage checked, then trained in order (finished ones skipped)."""
    from accelerate import PartialState

    from .stages import run_stages

    if args.resume not in (False, True):
        parser.error(f"--resume {args.resume}: a staged recipe resumes its unfinished stage from that stage's "
                     "latest checkpoint; give --resume without a path")
    summary = run_stages(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, resume=bool(args.resume))
    brief = {"stages": [{k: stage.get(k) for k in ("name", "work_dir", "steps", "wall_time_s", "final_checkpoint")}
                        for stage in summary["stages"]],
             "final_checkpoint": summary["final_checkpoint"]}
    if PartialState().is_main_process:  # once, however many processes train
        print(json.dumps(brief, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
