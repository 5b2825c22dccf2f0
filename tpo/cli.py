"""The ``tpo`` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmengine.config import DictAction

from tpo.errors import CONFIG_ERRORS, print_config_error
from tpo.registry import ALL_REGISTRIES, build_model, load_config, registered_names


def _first_line(obj) -> str:
    """The first sentence of ``obj``'s docstring."""
    paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".").replace("``", "")
    return sentence if len(sentence) <= 90 else sentence[:87].rstrip() + "..."


def cmd_registry(args) -> int:
    names = [args.name] if args.name else list(ALL_REGISTRIES)
    for name in names:
        if name not in ALL_REGISTRIES:
            print(f"no registry {name!r}; registries: {', '.join(ALL_REGISTRIES)}", file=sys.stderr)
            return 2
        registry = ALL_REGISTRIES[name]
        entries = registered_names(registry)
        print(f"{name} ({len(entries)})")
        for entry in entries:
            print(f"  {entry:<28} {_first_line(registry.module_dict[entry])}")
    return 0


def cmd_config(args) -> int:
    print(load_config(args.config, args.cfg_options).pretty_text)
    return 0


def _parameter_table(model) -> list[tuple[str, int, int]]:
    from tpo.models.utils import count_parameters

    rows = [(name, *count_parameters(child)) for name, child in model.named_children()]
    rows.append(("total", *count_parameters(model)))
    return rows


def cmd_build(args) -> int:
    model = build_model(args.config, cfg_options=args.cfg_options)
    print(f"{type(model).__name__} from {args.config}")
    print(f"{'component':<20} {'parameters':>14} {'trainable':>14}")
    for name, total, trainable in _parameter_table(model):
        print(f"{name:<20} {total:>14,} {trainable:>14,}")
    return 0


def load_image(path: str):
    """An image file -> uint8 tensor ``[3, H, W]``."""
    import torch

    from tpo.data.video import load_image as read_image

    return torch.from_numpy(read_image(path)).permute(2, 0, 1)


def load_video(path: str, num_frames: int):
    """A video (``.npy`` frames, a folder of frames, or a video file) ->
    ``num_frames`` uniformly sampled frames, uint8 tensor ``[T, 3, H, W]``."""
    import torch

    from tpo.data.video import load_clip, media_kind

    if not Path(path).exists():
        raise FileNotFoundError(f"--video {path!r} does not exist")
    clip = load_clip(media_kind(path), [path], num_frames)
    return torch.from_numpy(clip.frames).permute(0, 3, 1, 2)


def cmd_chat(args) -> int:
    import torch

    if (args.image is None) == (args.video is None):
        print("give exactly one of --image PATH or --video PATH", file=sys.stderr)
        return 2
    if args.save_tasks is not None and not args.save_tasks.endswith(".npz"):
        raise ValueError(f"--save-tasks: a .npz path, got {args.save_tasks!r}")
    input_box = None
    if args.input_box is not None:
        try:
            input_box = [float(v) for v in args.input_box.split(",")]
        except ValueError:
            input_box = []
        if len(input_box) != 4 or not all(0.0 <= v <= 1.0 for v in input_box) or input_box[2] < input_box[0] \
                or input_box[3] < input_box[1]:
            raise ValueError(f"--input-box: x1,y1,x2,y2 normalised to [0, 1] with x1 <= x2 and y1 <= y2, "
                             f"got {args.input_box!r}")
    image = load_image(args.image) if args.image else None
    torch.manual_seed(args.seed)
    model = build_model(args.config, cfg_options=args.cfg_options)
    if not hasattr(model, "predict") and (input_box is not None or args.save_tasks):
        raise ValueError(f"--input-box and --save-tasks need a model with task heads (a TPOModel); "
                         f"{args.config} builds a {type(model).__name__}")
    video = load_video(args.video, model.processor.num_frames) if args.video else None
    frames = 1 if video is None else video.shape[0]
    if not 0 <= args.input_frame < frames:
        raise ValueError(f"--input-frame {args.input_frame}: the model samples {frames} frame(s) of the "
                         f"{'video' if video is not None else 'image'}; give 0 to {frames - 1}")
    if args.checkpoint:
        from tpo.models.utils import load_model_weights

        load_model_weights(model, args.checkpoint)
    model.eval()
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:  # greedy decoding takes no sampling settings
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    if not hasattr(model, "predict"):
        answer = model.chat(args.prompt, image=image, video=video, **sampling)
        print(json.dumps({"prompt": args.prompt, "answer": answer}, ensure_ascii=False) if args.json else answer)
        return 0
    # a TPO model: the task heads its answer runs give their results too
    size = tuple((image if image is not None else video).shape[-2:])
    result = model.predict(args.prompt, image=image, video=video, input_box=input_box,
                           head_inputs={"output_size": size, "init_frames": torch.tensor([args.input_frame])},
                           **sampling)
    tasks = {name: _task_summary(out) for name, out in result["tasks"].items()}
    if args.save_tasks:
        import numpy as np

        arrays = {f"{name}/{key}": value.detach().cpu().numpy() for name, out in result["tasks"].items()
                  for key, value in out.items() if hasattr(value, "detach")}
        np.savez_compressed(args.save_tasks, **arrays)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "answer": result["text"], "tasks": tasks}, ensure_ascii=False))
    else:
        print(result["text"])
        for name, out in tasks.items():
            print(f"[{name}] " + ", ".join(f"{key}: {value}" for key, value in out.items()))
    return 0


def _rounded(value):
    return [_rounded(v) for v in value] if isinstance(value, list) else round(float(value), 4)


def _task_summary(out) -> dict:
    """A task head's result for printing: small tensors as rounded lists, masks as their shape and
    foreground share (the arrays themselves go to --save-tasks)."""
    import torch

    summary = {}
    for key, value in out.items():
        if not hasattr(value, "detach"):
            summary[key] = value
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bool:
            summary[key] = {"shape": list(value.shape), "foreground": round(float(value.float().mean()), 4)}
        elif value.numel() <= 64:
            summary[key] = _rounded(value.tolist())
        else:
            summary[key] = {"shape": list(value.shape)}
    return summary


def cmd_eval(args) -> int:
    import torch

    from tpo.data.datasets import SampleDataset
    from tpo.evaluation import evaluate
    from tpo.evaluation.evaluate import check_predictions_path

    check_predictions_path(args.predictions, "--predictions")  # before the model is built
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: a positive number of samples, got {args.limit}")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    torch.manual_seed(args.seed)
    model = build_model(args.config, cfg_options=args.cfg_options)
    dataset = SampleDataset(args.data, num_frames=getattr(model.processor, "num_frames", None))
    if args.checkpoint:
        from tpo.models.utils import load_model_weights

        load_model_weights(model, args.checkpoint)
    report = evaluate(model, dataset, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      predictions=args.predictions)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{type(model).__name__} from {args.config}"
              + (f" with {args.checkpoint}" if args.checkpoint else " (random initialisation: no --checkpoint)"))
        print(f"on {args.data}" + (f" (first {args.limit} samples)" if args.limit else ""))
        for key, value in report.items():
            if value is not None:
                print(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")
    if args.predictions:
        print(f"answers: {args.predictions}", file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("registry", help="list the registered components")
    p.add_argument("name", nargs="?", help=f"one registry: {', '.join(ALL_REGISTRIES)}")
    p.set_defaults(func=cmd_registry)

    def with_config(p):
        p.add_argument("config", help="config file (.py, .yaml or .json)")
        p.add_argument(
            "--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
            help="override config entries, e.g. model.llm.config.num_hidden_layers=4",
        )
        return p

    with_config(sub.add_parser("config", help="print the resolved config")).set_defaults(func=cmd_config)
    with_config(sub.add_parser("build", help="build the model, print its parameters")).set_defaults(func=cmd_build)

    p = with_config(sub.add_parser("chat", help="answer one prompt about an image or a video"))
    p.add_argument("--image", help="an image file")
    p.add_argument("--video", help="a video: .npy frames [T,H,W,3], a folder of frames, or a video file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--checkpoint", help="a checkpoint folder (model.safetensors) to load")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and sampling")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--input-box", help="a TPO model's box prompt (tracking): x1,y1,x2,y2 normalised to [0, 1]")
    p.add_argument("--input-frame", type=int, default=0,
                   help="the frame of the video (of the frames the model samples, from 0) the box prompt is on")
    p.add_argument("--save-tasks", help="a TPO model: write its task heads' outputs (boxes, spans, masks) to this .npz")
    p.set_defaults(func=cmd_chat)

    p = with_config(sub.add_parser("eval", help="score a model on a dataset: QA, boxes, spans, masks, task assignment"))
    p.add_argument("--data", required=True, help="an annotation file (.jsonl/.json) of the tpo sample schema")
    p.add_argument("--checkpoint", help="a checkpoint folder or .safetensors to load (a tpo train output)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="the answer budget (checked against the references)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--predictions", help="write every scored answer to this .jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    # `tpo train ...` is handed to tpo.engine.main.train_main whole (see main()).
    sub.add_parser("train", help="train a model as a config says: tpo train CONFIG [--cfg-options ...] [--resume]")

    sub.add_parser("rlaif", help="AI feedback: tpo rlaif generate CONFIG (sample, judge, write preference pairs)")
    sub.add_parser("experiment", help="SFT baseline vs TPO on a synthetic benchmark: tpo experiment CONFIG")

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    # `tpo data synth ...` is handed to tpo.data.synth.main whole (see main()).
    data_sub.add_parser("synth", help="write the synthetic grounded video benchmark (--out DIR --num N ...)")
    p = data_sub.add_parser("convert", help="convert a public annotation format into tpo samples (JSONL)")
    formats = p.add_subparsers(dest="format", required=True)

    def with_out(q):
        q.add_argument("--out", required=True, help="the JSONL to write (media paths are made relative to it)")
        q.add_argument("--check-media", action="store_true", help="also check that every media file exists")
        q.set_defaults(func=cmd_data_convert)
        return q

    q = with_out(formats.add_parser("llava", help="LLaVA instruction data: a JSON list or JSONL"))
    q.add_argument("file")
    q.add_argument("--media-root", help="folder the image/video paths are relative to (default: the file's)")
    q = with_out(formats.add_parser("refcoco", help="RefCOCO/+/g: COCO instances JSON and refs JSON"))
    q.add_argument("instances")
    q.add_argument("refs", help="the refs pickle as a JSON list of {ref_id, ann_id, image_id, split, sentences}")
    q.add_argument("--image-root", required=True)
    q.add_argument("--split", help="keep one split (train, val, testA, ...)")
    q.add_argument("--no-masks", action="store_true", help="boxes only")
    q = with_out(formats.add_parser("charades-sta", help="Charades-STA: 'vid start end##sentence' lines"))
    q.add_argument("annotations")
    q.add_argument("--durations", required=True, help="a JSON {vid: seconds} or a Charades CSV (id, length)")
    q.add_argument("--video-root", required=True)
    q.add_argument("--video-ext", default=".mp4", help="'' for frame folders")
    q = with_out(formats.add_parser("trl-preference", help="TRL preference JSONL {prompt, chosen, rejected}"))
    q.add_argument("file")
    q.add_argument("--media-root", help="folder the image/video paths are relative to (default: the file's)")
    return parser


def cmd_data_convert(args) -> int:
    """``tpo data convert FORMAT ... --out OUT.jsonl``: every entry converted and validated
    (all problems of the input reported together, nothing written), then written atomically."""
    from tpo.data import readers
    from tpo.data.schema import write_jsonl

    out = Path(args.out)
    if out.suffix != ".jsonl" or out.is_dir():
        raise ValueError(f"--out {args.out!r}: give a .jsonl file to write")
    inputs = [getattr(args, k) for k in ("file", "instances", "refs", "annotations", "durations") if
              getattr(args, k, None)]
    if any(Path(i).resolve() == out.resolve() for i in inputs):
        raise ValueError(f"--out {args.out!r} is one of the input files; write the samples elsewhere")
    check = args.check_media
    if args.format == "llava":
        samples = readers.read_llava(args.file, args.media_root, check_media=check)
    elif args.format == "refcoco":
        samples = readers.read_refcoco(args.instances, args.refs, args.image_root, split=args.split,
                                       masks=not args.no_masks, check_media=check)
    elif args.format == "charades-sta":
        samples = readers.read_charades_sta(args.annotations, args.durations, args.video_root, args.video_ext,
                                            check_media=check)
    else:
        samples = readers.read_trl_preference(args.file, args.media_root, check_media=check)
    if not samples:
        raise ValueError(f"{args.format}: no samples in the input" + (f" of split {args.split!r}" if getattr(
            args, "split", None) else ""))
    n = write_jsonl(samples, out)
    print(f"wrote {n} sample{'s' if n != 1 else ''} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "synth"]:  # its own parser
        from tpo.data.synth import main as synth_main

        return synth_main(argv[2:])
    if argv[:1] == ["train"]:
        from tpo.engine.main import train_main

        return train_main(argv[1:])
    if argv[:1] == ["rlaif"]:
        from tpo.rlaif.generation import main as rlaif_main

        return rlaif_main(argv[1:])
    if argv[:1] == ["experiment"]:
        from tpo.engine.experiment import experiment_main

        return experiment_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (*CONFIG_ERRORS, ImportError) as err:
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        return print_config_error(f"tpo {command}", err)


if __name__ == "__main__":
    sys.exit(main())
