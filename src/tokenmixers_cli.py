"""The ``tokenmixers`` command line: a thin layer over the library.

Each command is a function registered with :func:`command`, its arguments declared beside it. This
module lives outside the ``tokenmixers`` package on purpose: importing the package registers the
models in timm, which loads torch, timm and torchvision (seconds). Parsing, ``--help`` and ``list``
need none of that; each command imports what it uses when it runs (the deferred imports below are
all for that reason).
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Arg:
    """One argument of a command, as ``argparse.add_argument`` takes it."""
    return flags, options


# name ("train", or "detect train" for a subcommand) -> (function, help, arguments, runs models)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, list[Arg], bool]] = {}
GROUPS = {"detect": "Mask R-CNN with any backbone: train, eval, predict, invariance",
          "segment": "UperNet / Semantic FPN with any backbone: train, eval, predict"}


def command(name: str, help: str, *args: Arg, runs_models: bool = True) -> Callable:
    """Register a command with its help line and arguments; ``runs_models``: it keeps freed CPU memory."""

    def register(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = (fn, help, list(args), runs_models)
        return fn

    return register


# -- argument types --------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    """Parse ``224`` or ``224x320`` into (H, W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320, got {text!r}")
    return parts[0], parts[1]


def _positive(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


PRECISION = arg("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
RUN = [  # the shortcut flags of a training run; any other setting is key=value
    arg("overrides", nargs="*", help="settings to change, e.g. epochs=30 batch_size=64 precision=bf16"),
    arg("--model", default=None),
    arg("--output", default=None, help="output folder (checkpoints, metrics, logs)"),
    arg("--resume", default=None, help="'auto' or a checkpoint path"),
    arg("--overwrite", action="store_true",
        help="start over in an output folder that holds a previous run (deletes its checkpoints)"),
]


def _output_folder(path: str, option: str) -> Path:
    """An output folder path must not name an existing file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{option} {folder} is a file, not a folder; choose a folder path (it is created if missing)")
    return folder


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` overrides plus the shortcut flags (--model, --data, --output, --resume, --overwrite, --detector)."""
    extra = [f"{k}={getattr(args, k)}" for k in ("model", "data", "output", "resume", "detector")
             if getattr(args, k, None) is not None]
    if getattr(args, "overwrite", False):
        extra.append("overwrite=true")
    return extra + list(args.overrides)


def _checkpoints(args: argparse.Namespace) -> Optional[list[Optional[str]]]:
    """One checkpoint per model (or none)."""
    if not args.checkpoint:
        return None
    if len(args.checkpoint) != len(args.models):
        raise ValueError(f"give one --checkpoint per model ({len(args.models)} models, {len(args.checkpoint)} checkpoints)")
    return [None if c in ("none", "random") else c for c in args.checkpoint]


def _primary() -> bool:
    from tokenmixers.distributed import is_primary

    return is_primary()


# -- models --------------------------------------------------------------------------------------------


def _zoo_configs() -> ModuleType:
    """``tokenmixers.configs`` (the built-in zoo as data), read without importing the package."""
    spec = importlib.util.find_spec("tokenmixers")
    path = Path(spec.submodule_search_locations[0]) / "configs.py"
    module_spec = importlib.util.spec_from_file_location("_tokenmixers_configs", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while the class is built
    module_spec.loader.exec_module(module)
    return module


@command("list", "list registered models (or mixers)",
         arg("pattern", nargs="?", default="*", help="glob over model names, e.g. 'unified_*_tiny'"),
         arg("--mixers", action="store_true", help="list the registered mixers instead"),
         arg("--params", action="store_true", help="also count each model's parameters (builds them)"),
         runs_models=False)
def cmd_list(args: argparse.Namespace) -> None:
    """Print the registered models (family, mixer, depths, widths; ``--params``: parameters) or the mixers."""
    live = args.imports or args.params  # plug-ins registered models, or sizes are wanted: ask the live registry
    if args.mixers:
        if live:
            from tokenmixers import list_mixers

            print("\n".join(list_mixers()))
        else:
            print("\n".join(_zoo_configs().BUILTIN_MIXERS))
        return
    if live:
        from tokenmixers import zoo

        models = {n: (zoo.family_of(n), zoo.model_cfg(n)) for n in zoo.list_models()}
    else:
        models = _zoo_configs().builtin_models()
    names = [n for n in models if fnmatch.fnmatch(n, args.pattern)]
    if not names:
        raise KeyError(f"no registered model matches {args.pattern!r}; try `tokenmixers list` to see them all")
    for name in names:
        family, cfg = models[name]
        line = f"{name:36s} family={family:12s} mixer={cfg.mixer:12s} depths={cfg.depths} dims={cfg.dims}"
        if args.params:
            import torch

            from tokenmixers.bench import count_params
            from tokenmixers.zoo import create_model

            line += f" params={count_params(create_model(name, device=torch.device('meta'))) / 1e6:.2f}M"
        print(line)


@command("bench", "params, MACs, throughput, latency and memory of models",
         arg("models", nargs="+", help="model names or globs, e.g. 'unified_*_micro'"),
         arg("--input-size", type=_size, default=(224, 224), help="H or HxW (default 224)"),
         arg("--batch-size", type=_positive, default=32),
         arg("--device", default="cpu", help="cpu or cuda[:N]"),
         PRECISION,
         arg("--threads", type=_positive, default=None, help="CPU threads (default: torch's)"),
         arg("--channels-last", action="store_true"),
         arg("--compile", action="store_true", help="torch.compile the model"),
         arg("--iters", type=_positive, default=7, help="timed iterations (median is reported)"),
         arg("--no-speed", action="store_true", help="only params and MACs"),
         arg("--out", default=None, help="folder for bench.json / bench.csv / bench.md"))
def cmd_bench(args: argparse.Namespace) -> None:
    """Benchmark models and write JSON/CSV/markdown."""
    if args.out:
        _output_folder(args.out, "--out")
    from tokenmixers.bench import benchmark, to_markdown, write_results
    from tokenmixers.distributed import check_device

    check_device(args.device)
    rows = benchmark(args.models, input_size=args.input_size, batch_size=args.batch_size, device=args.device,
                     precision=args.precision, threads=args.threads, channels_last=args.channels_last,
                     compile=args.compile, speed=not args.no_speed, iters=args.iters)
    print(to_markdown(rows))
    if args.out:
        print(f"\nwrote {', '.join(map(str, write_results(rows, args.out)))}")


@command("convert", "convert a checkpoint (official, a training run's or mmdet's) to model.safetensors + config.json",
         arg("src", help="checkpoint file (.pth/.pt/.bin/.safetensors) or weights folder"),
         arg("dst", help="output folder"),
         arg("--model", default=None, help="model name (default: the one the checkpoint names, e.g. a training run's)"),
         arg("--entry", default="auto", help="'auto' (model, else state_dict, else bare), 'model', 'ema' or a key"),
         arg("--num-classes", type=_positive, default=None,
             help="build the model with this many classes (default: the checkpoint's classifier)"),
         arg("--label-map", default=None, help="file with one source class index per line"),
         arg("--reset-heads", action="store_true",
             help="detection checkpoints: re-initialise the class-specific layers for --num-classes"))
def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint into a weights folder; the run's input size, crop and classes travel with it."""
    _output_folder(args.dst, "the destination")
    from tokenmixers.checkpoint import read_checkpoint
    from tokenmixers.classification import saved_settings
    from tokenmixers.detection import holds_detector, load_detector, save_detector
    from tokenmixers.hub import save_pretrained
    from tokenmixers.zoo import create_model, load_checkpoint

    source = read_checkpoint(args.src, args.entry)
    if holds_detector(source):  # mmdet's Mask R-CNN or ours: a detector folder
        detector, report = load_detector(source, args.model, args.num_classes, reset_heads=args.reset_heads,
                                         entry=args.entry)
        print(report)
        save_detector(detector, args.dst)
        print(f"wrote {args.dst}/model.safetensors and {args.dst}/config.json (detector, {detector.num_classes} classes)")
        return
    name = args.model or source.model_name
    if name is None:
        raise ValueError(f"{args.src} does not name its model; pass --model (e.g. --model unified_halo_tiny)")
    num_classes = args.num_classes or source.num_classes
    model = create_model(name, **({"num_classes": num_classes} if num_classes is not None else {}))
    print(load_checkpoint(model, source, entry=args.entry, label_map=args.label_map))
    saved = saved_settings(source)
    names = source.class_names if source.class_names and len(source.class_names) == model.num_classes else None
    save_pretrained(model, args.dst, input_size=saved.get("input_size"), crop_pct=saved.get("crop_pct"),
                    interpolation=saved.get("interpolation"), class_names=names, data=saved.get("data"))
    kept = ", ".join(f"{k} {saved[k]}" for k in ("input_size", "crop_pct", "interpolation", "data") if saved.get(k))
    print(f"wrote {args.dst}/model.safetensors and {args.dst}/config.json ({model.num_classes} classes"
          + (f"; {kept}" if kept else "") + ")")


@command("fit", "place a mixer at the paper's four budgets (params and MACs inside the envelope of its five models)",
         arg("mixer", help="a registered mixer (yours through --import my_mixer.py)"),
         arg("--scales", nargs="+", default=["micro", "tiny", "small", "base"],
             choices=["micro", "tiny", "small", "base"]),
         arg("--name", default=None, help="family name: the models become unified_<name>_<scale> (default: the mixer)"),
         arg("--out", default=None, help="write the configurations as YAML (register them again with --import FILE)"),
         runs_models=False)
def cmd_fit(args: argparse.Namespace) -> None:
    """Fit a mixer at the budgets; print each scale's configuration, costs and envelope; optionally save them."""
    from tokenmixers.fit import fit_family, save_family

    family, fits = fit_family(args.name or args.mixer, args.mixer, args.scales)
    for fitted in fits.values():
        print(fitted)
    missed = [s for s, f in fits.items() if not f.inside]
    if missed:
        print(f"no setting within the searched knobs lands inside the envelope at {', '.join(missed)}: the closest one "
              "is shown; declare more knobs on the mixer (TokenMixer.knobs) to give the search room")
    print(f"registered {', '.join(family.model_names())}")
    if args.out:
        print(f"wrote {save_family(family, args.out)}")


# -- classification ------------------------------------------------------------------------------------------


@command("train", "train a classifier with the paper's recipe (or any recipe) and key=value overrides",
         *RUN,
         arg("--recipe", default=None, help="transformer, cnn, fashion, digits or a YAML file (default: the model's)"),
         arg("--data", default=None, help="data folder (class folders or meta/*.txt), 'fashion' or 'digits'"))
def cmd_train(args: argparse.Namespace) -> None:
    """Train with a recipe and overrides."""
    from tokenmixers.classification import train
    from tokenmixers.zoo import default_recipe

    recipe = args.recipe or (default_recipe(args.model) if args.model else "transformer")
    summary = train(recipe, _run_overrides(args))
    if _primary():
        print(f"top-1 {summary['top1']}, EMA top-1 {summary['ema_top1']}; summary in {summary['output']}/summary.json")


@command("eval", "top-1/top-5 of a checkpoint's raw and EMA weights",
         arg("--checkpoint", default=None,
             help="training checkpoint, official checkpoint or weights folder ('none': random weights)"),
         arg("--model", default=None, help="default: the model the checkpoint names"),
         arg("--data", default=None, help="data folder, 'fashion' or 'digits' (default: what the weights were trained on)"),
         arg("--split", default="val"),
         arg("--batch-size", type=_positive, default=64),
         arg("--input-size", type=_positive, default=None, help="default: the weights', else 224"),
         arg("--crop-pct", type=float, default=None, help="default: the weights', else 0.875"),
         arg("--interpolation", default=None, help="default: the weights', else bicubic"),
         arg("--num-classes", type=_positive, default=None, help="default: the checkpoint's classifier"),
         arg("--label-map", default=None),
         arg("--device", default="auto"),
         PRECISION,
         arg("--workers", type=int, default=None, help="default: min(8, available CPUs)"),
         arg("--out", default=None, help="write the results as JSON"))
def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint's raw and EMA weights, with the data settings saved with it."""
    from tokenmixers.classification import evaluate_checkpoint
    from tokenmixers.files import atomic_write_text

    if args.checkpoint is None:
        raise ValueError("no --checkpoint given: evaluating would measure random weights; pass --checkpoint FILE "
                         "(a training checkpoint, an official checkpoint or a weights folder), or --checkpoint none "
                         "to evaluate random weights on purpose")
    checkpoint = None if args.checkpoint in ("none", "random") else args.checkpoint
    results = evaluate_checkpoint(
        args.model, checkpoint, args.data, split=args.split, batch_size=args.batch_size,
        input_size=args.input_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
        num_classes=args.num_classes, device=args.device, precision=args.precision, workers=args.workers,
        label_map=args.label_map,
    )
    settings, sources = results.pop("settings"), results.pop("sources")
    if not _primary():
        return
    origin = {src: [k for k, v in sources.items() if v == src] for src in ("checkpoint", "default", "data")}
    said = "; ".join(f"{', '.join(keys)} from the {src if src != 'default' else 'defaults'}"
                     for src, keys in origin.items() if keys)
    print(f"{settings['model']} on {settings['data']}:{args.split} at input {settings['input_size']}, crop_pct "
          f"{settings['crop_pct']}, {settings['interpolation']}, {settings['num_classes']} classes"
          + (f" ({said})" if said else ""))
    for label, metrics in results.items():
        print(f"{label:4s} top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['count']} images)")
    if args.out:
        atomic_write_text(args.out, json.dumps({**results, "settings": settings}, indent=2))


@command("compare", "train and evaluate several models under one recipe; one report",
         arg("models", nargs="*", help="models or globs (default: the micro models of the paper's five mixers)"),
         arg("--recipe", default="fashion", help="fashion (built-in Fashion-MNIST subset), digits, transformer, cnn "
             "or a YAML file"),
         arg("--seeds", type=_positive, default=1, help="runs per model (seeds from the recipe's seed on); reports "
             "mean ± std and intervals with the seed spread"),
         arg("--output", default="results/compare"),
         arg("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
             help="recipe overrides, e.g. --set epochs=3 input_size=48"),
         arg("--bench-size", type=int, default=224),
         arg("--bench-batch", type=int, default=8),
         arg("--no-fit", dest="fit", action="store_false",
             help="compare a plug-in's models as registered, without placing them at the paper's budgets first"))
def cmd_compare(args: argparse.Namespace) -> None:
    """Train and evaluate several models under one recipe; write one report."""
    _output_folder(args.output, "--output")
    from tokenmixers.compare import compare

    result = compare(args.models or None, recipe=args.recipe, overrides=args.overrides, output=args.output,
                     bench_size=args.bench_size, bench_batch=args.bench_batch, seeds=args.seeds, fit=args.fit)
    print(Path(result["report"]).read_text())
    print(f"report: {result['report']}")


# -- analyses ---------------------------------------------------------------------------------------------


@command("erf", "effective receptive field per stage (maps, metrics, heatmaps)",
         arg("models", nargs="+", help="tokenmixers or timm model names"),
         arg("--images", default="digits", help="'digits', 'fashion', a dataset root (val split) or any image folder"),
         arg("--checkpoint", nargs="*", default=None, help="one per model ('none' for random weights)"),
         arg("--num-images", type=_positive, default=50, help="number of images"),
         arg("--input-size", type=int, default=224),
         arg("--stages", type=int, nargs="*", default=None, help="0-based stage indices (default: all)"),
         arg("--batch-size", type=_positive, default=8),
         arg("--device", default="cpu"),
         arg("--layer-scale", type=float, default=None,
             help="random-weight models: set every layer-scale gamma (e.g. 1.0) so the mixers contribute"),
         arg("--method", choices=("abs", "replknet"), default="abs",
             help="abs: |gradient|, mass of the map; replknet: RepLKNet's relu(gradient), mass of log10(map + 1)"),
         arg("--out", default="results/erf"))
def cmd_erf(args: argparse.Namespace) -> None:
    """Effective receptive fields per stage."""
    _output_folder(args.out, "--out")
    from tokenmixers.analysis.erf import run_erf
    from tokenmixers.distributed import check_device

    results = run_erf(args.models, args.images, _checkpoints(args), limit=args.num_images, input_size=args.input_size,
                      stages=args.stages, batch_size=args.batch_size, device=check_device(args.device), out=args.out,
                      layer_scale=args.layer_scale, method=args.method)
    for name, r in results.items():
        erf50 = ", ".join(f"stage {s + 1}: {m['erf@0.5']:.3f}" for s, m in r["stages"].items())
        print(f"{name} ({r['weights']}): ERF@0.5 {erf50}")
    print(f"wrote {args.out}")


@command("invariance", "consistency and accuracy under translation, rotation and scale",
         arg("models", nargs="+"),
         arg("--data", default="digits", help="'digits', 'fashion', a dataset root (val split) or any image folder"),
         arg("--kinds", nargs="+", default=["translation", "pre_rotation", "post_rotation", "scale"],
             choices=["translation", "pre_rotation", "post_rotation", "scale"]),
         arg("--checkpoint", nargs="*", default=None, help="one per model ('none' for random weights)"),
         arg("--num-images", type=_positive, default=None, help="use the first N images"),
         arg("--batch-size", type=_positive, default=32),
         arg("--input-size", type=int, default=224),
         arg("--crop-pct", type=float, default=0.875),
         arg("--align", choices=["shift", "center"], default="shift",
             help="translation: keep clipped crops at their true offset (shift) or re-centre them (official)"),
         arg("--seed", type=int, default=0),
         arg("--device", default="auto"),
         arg("--out", default="results/invariance"))
def cmd_invariance(args: argparse.Namespace) -> None:
    """Translation / rotation / scale invariance."""
    _output_folder(args.out, "--out")
    from tokenmixers.analysis.invariance import run_invariance

    results = run_invariance(args.models, args.data, args.kinds, _checkpoints(args), limit=args.num_images,
                             batch_size=args.batch_size, input_size=args.input_size, crop_pct=args.crop_pct,
                             align=args.align, seed=args.seed, device=args.device, out=args.out)
    if not _primary():
        return
    for name, rows in results.items():
        worst = min(rows, key=lambda r: r["consistency"])
        print(f"{name}: lowest consistency {worst['consistency']:.1f}% ({worst['kind']} {worst['strength']})")
    print(f"wrote {args.out}")


# -- detection --------------------------------------------------------------------------------------------


def _ap_line(iou_type: str, metrics: dict) -> str:
    """``bbox AP 41.2  AP50 ...`` with '-' where a size range has no objects."""
    return f"{iou_type:4s} " + "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in metrics.items())


TEST_SCALE = [
    arg("--model", default=None, help="backbone model (needed for mmdet checkpoints)"),
    arg("--device", default="auto"),
    arg("--min-size", type=int, default=None, help="test scale, shorter side (default: the checkpoint's run's, "
        "else 800)"),
    arg("--max-size", type=int, default=None, help="test scale, longer side cap (default: the run's, else 1333)"),
]


@command("detect train", "train a detector (recipes: mask_rcnn_1x, mask_rcnn_3x, cascade_mask_rcnn_3x, retinanet_1x, smoke, or a YAML file)",
         *RUN,
         arg("--recipe", default="mask_rcnn_1x", help="mask_rcnn_1x, mask_rcnn_3x, cascade_mask_rcnn_3x, retinanet_1x, smoke or a YAML file"),
         arg("--detector", default=None, choices=("mask_rcnn", "cascade_mask_rcnn", "retinanet"), help="default: the recipe's"),
         arg("--data", default=None, help="COCO-format folder (instances_<split>.json and the images)"))
def cmd_detect_train(args: argparse.Namespace) -> None:
    """Train a detector with a detection recipe and key=value overrides."""
    from tokenmixers.detection.task import train

    summary = train(args.recipe, _run_overrides(args))
    if not _primary():
        return
    for iou_type in ("bbox", "segm"):
        if summary.get(iou_type):
            print(_ap_line(iou_type, summary[iou_type]))
    print(f"summary in {summary['output']}/summary.json")


@command("detect eval", "COCO bbox and segm AP of a detection checkpoint (ours or mmdet's)",
         arg("--checkpoint", required=True, help="training checkpoint, detector folder or mmdet checkpoint"),
         arg("--data", required=True, help="COCO-format folder"),
         arg("--split", default="val"),
         arg("--batch-size", type=int, default=1, help="images per batch (1, as mmdet tests: padding to a batch "
             "partner's size changes the features of attention backbones)"),
         PRECISION,
         arg("--workers", type=int, default=2),
         arg("--num-images", type=int, default=None, help="evaluate the first N images"),
         arg("--out", default=None, help="write the results as JSON"),
         *TEST_SCALE)
def cmd_detect_eval(args: argparse.Namespace) -> None:
    """COCO bbox (and segm) AP of a detection checkpoint."""
    from tokenmixers.detection.evaluate import evaluate_checkpoint
    from tokenmixers.files import atomic_write_text

    results = evaluate_checkpoint(args.checkpoint, args.data, model=args.model, split=args.split,
                                  batch_size=args.batch_size, device=args.device, precision=args.precision,
                                  workers=args.workers, limit=args.num_images, min_size=args.min_size,
                                  max_size=args.max_size)
    if not _primary():  # every process has the results; one prints and writes them
        return
    short, long = results["test_scale"]
    print(f"test scale {short} x {long} (from the {results['test_scale_from'].replace('default', 'defaults')})")
    if "note" in results:
        print(f"no AP: {results['note']}")
    for iou_type in ("bbox", "segm"):
        if iou_type in results:
            print(_ap_line(iou_type, results[iou_type]))
    skipped = f", {results['skipped_images']} unreadable skipped" if results["skipped_images"] else ""
    print(f"({results['images']} images{skipped})")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


@command("detect predict", "draw detections (boxes, masks, scores) on images as PNG",
         arg("images", nargs="+"),
         arg("--checkpoint", required=True),
         arg("--out", default="results/detections", help="a .png file (one image) or a folder"),
         arg("--score-threshold", type=float, default=0.5),
         *TEST_SCALE)
def cmd_detect_predict(args: argparse.Namespace) -> None:
    """Draw a detector's boxes, masks and scores on images; write PNGs."""
    from tokenmixers.checkpoint import read_checkpoint
    from tokenmixers.detection import load_detector
    from tokenmixers.detection.predict import predict_image
    from tokenmixers.detection.retinanet import holds_retinanet, load_retinanet
    from tokenmixers.drawing import output_paths

    sizes = {"min_size": args.min_size, "max_size": args.max_size or 1333} if args.min_size else {}
    read = read_checkpoint(args.checkpoint)
    detector, _ = (load_retinanet if holds_retinanet(read) else load_detector)(read, args.model, **sizes)
    for image, target in zip(args.images, output_paths(args.images, Path(args.out))):
        output = predict_image(detector, image, target, score_threshold=args.score_threshold, device=args.device)
        kept = int((output["scores"] >= args.score_threshold).sum())
        print(f"{image}: {kept} detection(s) scoring >= {args.score_threshold} -> {target}")


@command("detect invariance", "scale invariance: box consistency and box mAP vs scale factor",
         arg("models", nargs="+"),
         arg("--checkpoint", nargs="*", default=None, help="one per model ('none' for random weights)"),
         arg("--data", required=True, help="COCO-format folder"),
         arg("--split", default="val"),
         arg("--num-images", type=int, default=None, help="use the first N images"),
         arg("--factors", type=float, nargs="+", default=[0.25 * i for i in range(1, 13)]),
         arg("--base-size", type=_size, default=None,
             help="standard test scale SHORTxLONG (default: the checkpoint's run's test scale, else 800x1333)"),
         arg("--reference-score", type=float, default=0.5,
             help="predictions at the standard scale scoring at least this serve as ground truth"),
         arg("--device", default="auto"),
         arg("--workers", type=int, default=2),
         arg("--out", default="results/scale_invariance"))
def cmd_detect_invariance(args: argparse.Namespace) -> None:
    """Scale invariance (box consistency and box mAP vs scale factor) of detectors."""
    from tokenmixers.analysis.scale_invariance import scale_table
    from tokenmixers.detection.evaluate import run_scale_invariance

    results, scales = run_scale_invariance(args.models, args.data, _checkpoints(args), split=args.split,
                                           limit=args.num_images, factors=args.factors, base_size=args.base_size,
                                           reference_score=args.reference_score, device=args.device,
                                           workers=args.workers, out=args.out)
    if not _primary():
        return
    for name, (short, long) in scales.items():
        source = "--base-size" if args.base_size else "the checkpoint's test scale, else 800x1333"
        print(f"{name}: standard scale {short} x {long} ({source})")
    print(scale_table(results))
    print(f"wrote {args.out}")


# -- segmentation -----------------------------------------------------------------------------------------


def _miou_line(result: dict) -> str:
    """``mIoU 41.23  mAcc 52.10  aAcc 80.01`` with '-' where nothing was counted."""
    return "  ".join(f"{k} {'-' if result.get(k) is None else f'{result[k]:.2f}'}" for k in ("mIoU", "mAcc", "aAcc"))


@command("segment train", "train a segmentor (recipes: upernet_160k, semantic_fpn_80k, smoke, or a YAML file)",
         *RUN,
         arg("--recipe", default="upernet_160k", help="upernet_160k, semantic_fpn_80k, smoke or a YAML file"),
         arg("--data", default=None, help="ADE20K folder, images + PNG label maps with classes.txt, or a COCO set"))
def cmd_segment_train(args: argparse.Namespace) -> None:
    """Train a segmentor with a segmentation recipe and key=value overrides."""
    from tokenmixers.segmentation.task import train

    summary = train(args.recipe, _run_overrides(args))
    if _primary():
        print(_miou_line(summary))
        print(f"summary in {summary['output']}/summary.json")


@command("segment eval", "mIoU, mAcc and aAcc of a segmentation checkpoint (ours or mmseg's)",
         arg("--checkpoint", required=True, help="training checkpoint or mmseg checkpoint"),
         arg("--data", required=True, help="segmentation folder"),
         arg("--split", default="val"),
         arg("--model", default=None, help="backbone model (needed for mmseg checkpoints)"),
         arg("--mode", choices=("whole", "slide"), default=None,
             help="whole-image or sliding-window inference (default: the run's, else whole)"),
         arg("--multi-scale", action="store_true", help="mmseg's aug test: scale ratios 0.5-1.75 and flips"),
         arg("--scale", type=_size, default=None, help="test scale LONGxSHORT (default: the run's, else 2048x512)"),
         PRECISION,
         arg("--device", default="auto"),
         arg("--workers", type=int, default=2),
         arg("--num-images", type=int, default=None, help="evaluate the first N images"),
         arg("--out", default=None, help="write the results as JSON"))
def cmd_segment_eval(args: argparse.Namespace) -> None:
    """mIoU / mAcc / aAcc of a segmentation checkpoint, with per-class IoU."""
    from tokenmixers.files import atomic_write_text
    from tokenmixers.segmentation.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.data, model=args.model, split=args.split, mode=args.mode,
                                  multi_scale=args.multi_scale, scale=args.scale, device=args.device,
                                  precision=args.precision, workers=args.workers, limit=args.num_images)
    if not _primary():
        return
    long, short = results["scale"]
    print(f"{results['mode']} inference at {long}x{short}{' with multi-scale + flip' if args.multi_scale else ''}, "
          f"{results['images']} images")
    width = max(len(n) for n in results["classes"])
    for name, row in results["classes"].items():
        cells = "  ".join(f"{k} {'-' if v is None else f'{v:6.2f}'}" for k, v in row.items())
        print(f"  {name:{width}s}  {cells}")
    print(_miou_line(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


@command("segment predict", "draw a segmentor's class map over images as PNG, with a legend",
         arg("images", nargs="+"),
         arg("--checkpoint", required=True),
         arg("--model", default=None, help="backbone model (needed for mmseg checkpoints)"),
         arg("--out", default="results/segmentations", help="a .png file (one image) or a folder"),
         arg("--scale", type=_size, default=None, help="test scale LONGxSHORT (default: the run's, else 2048x512)"),
         arg("--mode", choices=("whole", "slide"), default=None),
         arg("--device", default="auto"))
def cmd_segment_predict(args: argparse.Namespace) -> None:
    """Segment images and write each with its coloured class overlay and legend."""
    from tokenmixers.drawing import output_paths
    from tokenmixers.segmentation.predict import predict_image
    from tokenmixers.segmentation.segmentor import load_segmentor

    segmentor, _ = load_segmentor(args.checkpoint, args.model)
    names = segmentor.config.get("classes") or [str(i) for i in range(segmentor.num_classes)]
    for image, target in zip(args.images, output_paths(args.images, Path(args.out), "segmentation")):
        pred = predict_image(segmentor, image, target, scale=args.scale, mode=args.mode, device=args.device)
        present = ", ".join(names[i] for i in pred.unique().tolist())
        print(f"{image}: {present} -> {target}")


# -- the parser and main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered command."""
    parser = argparse.ArgumentParser(prog="tokenmixers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a Python module or file first (e.g. one that registers your mixer), or register "
                        "the models of a family file written by `fit --out`; repeatable")
    parser.add_argument("--traceback", action="store_true", help="on an error, also print the Python traceback")
    parser.add_argument("--no-memory-reuse", dest="memory_reuse", action="store_false",
                        help="let freed CPU tensor memory go back to the system at once (glibc's default) instead of "
                        "keeping it for the next step (up to 1.5x faster CPU inference)")
    commands = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for name, (fn, help, args, _) in COMMANDS.items():
        group, _, sub = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = commands.add_parser(group, help=GROUPS[group]).add_subparsers(dest="subcommand",
                                                                                          required=True)
        p = (groups[group] if group else commands).add_parser(sub, help=help, description=help)
        for flags, options in args:
            p.add_argument(*flags, **options)
        p.set_defaults(func=fn, command_name=name)
    return parser


def _import(name: str) -> None:
    """Import a module by name or a Python file by path (plug-ins that register mixers or models)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):  # a family written by `tokenmixers fit --out`
        from tokenmixers.fit import load_family

        if not path.is_file():
            raise FileNotFoundError(f"--import {name}: file does not exist")
        load_family(path)
        return
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"--import {name}: file does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0] and err.name != name:
            raise  # the module exists but needs something that is missing
        raise ModuleNotFoundError(f"--import {name}: no module of that name; give an importable module name or "
                                  "the path of a .py file") from None


_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def _describe(err: BaseException) -> str:
    """One paragraph for an error: its message; for an error raised in a DataLoader worker, the worker's own
    message and where it was raised; for an unexpected error type, its type and location."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if _WORKER_TRACEBACK in text:  # torch re-raises a worker's error with the worker's whole traceback as text
        caught, _, traceback = text.partition(_WORKER_TRACEBACK)
        kind = caught.split()[1] if caught.startswith("Caught ") else type(err).__name__
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(kind)}: (.*)", traceback, flags=re.M | re.S))
        message = found[-1].group(1).strip() if found else traceback.strip().splitlines()[-1]
        frames = re.findall(r'File "([^"]+)", line (\d+)', traceback)
        where = f" at {Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else ""
        return (f"{message} ({kind} in a data-loading worker{where}; run with workers=0 to get it in the main process, "
                "with --traceback for the full traceback)")
    expected = (ValueError, KeyError, OSError, ImportError)
    if isinstance(err, expected) and text:
        return text
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f" at {Path(frame.tb_frame.f_code.co_filename).name}:{frame.tb_lineno}" if frame is not None else ""
    first = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return f"{first} ({type(err).__name__}{where}; rerun with --traceback for the full traceback)"


def resume_hint(name: str, argv: Sequence[str]) -> str:
    """The command that continues an interrupted job: a run with --resume auto; a comparison run again as it was."""
    from tokenmixers.distributed import launched_processes

    if name == "compare":  # finished runs are reused and the interrupted one continues where it stopped
        kept = list(argv)
    else:
        kept, skip = [], False
        for item in argv:
            if skip:
                skip = False
            elif item == "--resume":
                skip = True
            elif not (item.startswith(("--resume=", "resume=", "overwrite=")) or item == "--overwrite"):
                kept.append(item)
        kept += ["--resume", "auto"]
    line = "tokenmixers " + " ".join(shlex.quote(a) for a in kept)
    if launched_processes() > 1:
        return f"the same launcher (torchrun / srun) with {line.removeprefix('tokenmixers ')}"
    return line


def _short_warning(message: Warning, category: type, filename: str, lineno: int, line: Optional[str] = None) -> str:
    """Warnings as one line, without a source line of the library that raised them."""
    return f"tokenmixers: warning: {message}\n"


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is a run stopped by a signal after saving (the engine's, if the engine was loaded)."""
    runs = sys.modules.get("tokenmixers.runs")
    return runs is not None and isinstance(err, runs.Interrupted)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``tokenmixers`` command.

    Every error a user can cause ends in one paragraph on stderr (what, where, how to fix) and exit
    code 2, without a traceback (``--traceback`` adds it). A run stopped by SIGINT/SIGTERM saves its
    state and exits with 128 + the signal number and the command that resumes it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, also after options
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.formatwarning = _short_warning
    try:
        if args.memory_reuse and COMMANDS[args.command_name][3]:
            from tokenmixers.allocator import reuse_cpu_memory

            reuse_cpu_memory()
        for name in args.imports:
            _import(name)
        args.func(args)
    except BrokenPipeError:
        # the reader went away (`tokenmixers list | head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"tokenmixers {args.command_name}: interrupted; nothing was saved after the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if args.traceback:
            import traceback

            traceback.print_exc()
        if _interrupted(err):
            if _primary():
                print(f"tokenmixers {args.command_name}: {err}; resume with: {resume_hint(args.command_name, argv)}", file=sys.stderr)
            sys.exit(err.exit_code)
        print(f"tokenmixers {args.command_name}: error: {_describe(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
