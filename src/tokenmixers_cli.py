"""The ``tokenmixers`` command line: a thin layer over the library.

This module lives outside the ``tokenmixers`` package on purpose: importing the package registers
the models in timm, which loads torch, timm and torchvision (several seconds). Parsing, ``--help``
and ``list`` need none of that; each command imports what it uses when it runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence


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


def _zoo_configs() -> ModuleType:
    """``tokenmixers.configs`` (the built-in zoo as data), read without importing the package."""
    spec = importlib.util.find_spec("tokenmixers")
    path = Path(spec.submodule_search_locations[0]) / "configs.py"
    module_spec = importlib.util.spec_from_file_location("_tokenmixers_configs", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while the class is built
    module_spec.loader.exec_module(module)
    return module


def cmd_list(args: argparse.Namespace) -> None:
    """Print the registered models (family, mixer, depths, widths; ``--params``: parameters) or the mixers."""
    import fnmatch

    if args.mixers:
        import tokenmixers

        print("\n".join(tokenmixers.list_mixers()))
        return
    if args.imports or args.params:  # plug-ins registered models, or sizes are wanted: ask the live registry
        from tokenmixers import zoo

        models = {n: (zoo.MODEL_FAMILY[n], zoo.MODEL_CFGS[n]) for n in zoo.list_models()}
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

            with torch.device("meta"):
                line += f" params={count_params(create_model(name)) / 1e6:.2f}M"
        print(line)


def cmd_bench(args: argparse.Namespace) -> None:
    """Benchmark models and write JSON/CSV/markdown."""
    from tokenmixers.bench import benchmark, to_markdown, write_results

    rows = benchmark(
        args.models,
        input_size=args.input_size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        channels_last=args.channels_last,
        compile=args.compile,
        speed=not args.no_speed,
        iters=args.iters,
    )
    print(to_markdown(rows))
    if args.out:
        paths = write_results(rows, args.out)
        print(f"\nwrote {', '.join(map(str, paths))}")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint (e.g. an official one) into a ``save_pretrained`` folder."""
    import tokenmixers

    model = tokenmixers.create_model(args.model, **({"num_classes": args.num_classes} if args.num_classes is not None else {}))
    report = tokenmixers.load_checkpoint(model, args.src, entry=args.entry, label_map=args.label_map)
    print(report)
    tokenmixers.save_pretrained(model, args.dst)
    print(f"wrote {args.dst}/model.safetensors and {args.dst}/config.json")


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` overrides plus the shortcut flags (--model, --data, --output, --resume)."""
    extra = [f"{k}={getattr(args, k)}" for k in ("model", "data", "output", "resume") if getattr(args, k, None) is not None]
    return extra + list(args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    """Train with a recipe and overrides."""
    from tokenmixers.training import train
    from tokenmixers.zoo import default_recipe

    recipe = args.recipe or (default_recipe(args.model) if args.model else "transformer")
    summary = train(recipe, _run_overrides(args))
    print(f"top-1 {summary['top1']}, EMA top-1 {summary['ema_top1']}; summary in {summary['output']}/summary.json")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint's raw and EMA weights."""
    import json

    from tokenmixers.training import evaluate_checkpoint

    results = evaluate_checkpoint(
        args.model, args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
        input_size=args.input_size, crop_pct=args.crop_pct, num_classes=args.num_classes, device=args.device,
        precision=args.precision, workers=args.workers, label_map=args.label_map,
    )
    for label, metrics in results.items():
        print(f"{label:4s} top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['count']} images)")
    if args.out:
        from tokenmixers.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2))


def cmd_compare(args: argparse.Namespace) -> None:
    """Train and evaluate several models under one recipe; write one report."""
    from tokenmixers.compare import compare

    result = compare(args.models or None, recipe=args.recipe, overrides=args.overrides, output=args.output,
                     bench_size=args.bench_size, bench_batch=args.bench_batch)
    print((Path(result["report"]).read_text()))
    print(f"report: {result['report']}")


def _checkpoints(args: argparse.Namespace) -> Optional[list[Optional[str]]]:
    """One checkpoint per model (or none)."""
    if not args.checkpoint:
        return None
    if len(args.checkpoint) != len(args.models):
        raise ValueError(f"give one --checkpoint per model ({len(args.models)} models, {len(args.checkpoint)} checkpoints)")
    return [None if c in ("none", "random") else c for c in args.checkpoint]


def cmd_erf(args: argparse.Namespace) -> None:
    """Effective receptive fields per stage."""
    from tokenmixers.analysis.erf import run_erf

    results = run_erf(args.models, args.images, _checkpoints(args), limit=args.num_images, input_size=args.input_size,
                      stages=args.stages, batch_size=args.batch_size, device=args.device, out=args.out,
                      layer_scale=args.layer_scale)
    for name, r in results.items():
        erf50 = ", ".join(f"stage {s + 1}: {m['erf@0.5']:.3f}" for s, m in r["stages"].items())
        print(f"{name} ({r['weights']}): ERF@0.5 {erf50}")
    print(f"wrote {args.out}")


def cmd_invariance(args: argparse.Namespace) -> None:
    """Translation / rotation / scale invariance."""
    from tokenmixers.analysis.invariance import run_invariance

    results = run_invariance(args.models, args.data, args.kinds, _checkpoints(args), limit=args.num_images,
                             batch_size=args.batch_size, input_size=args.input_size, crop_pct=args.crop_pct,
                             align=args.align, seed=args.seed, device=args.device, out=args.out)
    for name, rows in results.items():
        worst = min(rows, key=lambda r: r["consistency"])
        print(f"{name}: lowest consistency {worst['consistency']:.1f}% ({worst['kind']} {worst['strength']})")
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tokenmixers", description=__doc__)
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a Python module or file first (e.g. one that registers your mixer); repeatable")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models (or mixers)")
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'unified_*_tiny'")
    p.add_argument("--mixers", action="store_true", help="list the registered mixers instead")
    p.add_argument("--params", action="store_true", help="also count each model's parameters (builds them)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="params, MACs, throughput, latency and memory of models")
    p.add_argument("models", nargs="+", help="model names or globs, e.g. 'unified_*_micro'")
    p.add_argument("--input-size", type=_size, default=(224, 224), help="H or HxW (default 224)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--iters", type=int, default=7, help="timed iterations (median is reported)")
    p.add_argument("--no-speed", action="store_true", help="only params and MACs")
    p.add_argument("--out", default=None, help="folder for bench.json / bench.csv / bench.md")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="convert a checkpoint (official or ours) to model.safetensors + config.json")
    p.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.safetensors) or save_pretrained folder")
    p.add_argument("dst", help="output folder")
    p.add_argument("--model", required=True, help="model name, e.g. unified_halo_tiny")
    p.add_argument("--entry", default="auto", help="'auto' (model, else state_dict, else bare), 'model', 'ema' or a key")
    p.add_argument("--num-classes", type=int, default=None, help="build the model with this many classes")
    p.add_argument("--label-map", default=None, help="file with one source class index per line")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train with the paper's recipe (or any recipe) and key=value overrides")
    p.add_argument("overrides", nargs="*", help="settings to change, e.g. epochs=30 batch_size=64 precision=bf16")
    p.add_argument("--recipe", default=None, help="transformer, cnn, digits or a YAML file (default: the model's recipe)")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="data folder (class folders or meta/*.txt) or 'digits'")
    p.add_argument("--output", default=None, help="output folder (checkpoints, metrics, logs)")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint's raw and EMA weights")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default=None, help="training checkpoint, official checkpoint or weights folder")
    p.add_argument("--data", required=True, help="data folder or 'digits'")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's classifier")
    p.add_argument("--label-map", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train and evaluate several models under one recipe; one report")
    p.add_argument("models", nargs="*", help="models or globs (default: the micro model of every family)")
    p.add_argument("--recipe", default="digits")
    p.add_argument("--output", default="results/compare")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides, e.g. --set epochs=3 input_size=48")
    p.add_argument("--bench-size", type=int, default=224)
    p.add_argument("--bench-batch", type=int, default=8)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("erf", help="effective receptive field per stage (maps, metrics, heatmaps)")
    p.add_argument("models", nargs="+", help="tokenmixers or timm model names")
    p.add_argument("--images", default="digits", help="'digits', a dataset root (val split) or any image folder")
    p.add_argument("--checkpoint", nargs="*", default=None, help="one per model ('none' for random weights)")
    p.add_argument("--num-images", type=int, default=50, help="number of images")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--stages", type=int, nargs="*", default=None, help="0-based stage indices (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layer-scale", type=float, default=None,
                   help="random-weight models: set every layer-scale gamma (e.g. 1.0) so the mixers contribute")
    p.add_argument("--out", default="results/erf")
    p.set_defaults(func=cmd_erf)

    p = sub.add_parser("invariance", help="consistency and accuracy under translation, rotation and scale")
    p.add_argument("models", nargs="+")
    p.add_argument("--data", default="digits", help="'digits', a dataset root (val split) or any image folder")
    p.add_argument("--kinds", nargs="+", default=["translation", "pre_rotation", "post_rotation", "scale"],
                   choices=["translation", "pre_rotation", "post_rotation", "scale"])
    p.add_argument("--checkpoint", nargs="*", default=None, help="one per model ('none' for random weights)")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--align", choices=["shift", "center"], default="shift",
                   help="translation: keep clipped crops at their true offset (shift) or re-centre them (official)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/invariance")
    p.set_defaults(func=cmd_invariance)
    return parser


def _import(name: str) -> None:
    """Import a module by name or a Python file by path (plug-ins that register mixers or models)."""
    import importlib
    import importlib.util

    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"--import {name}: file does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``tokenmixers`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, also after options
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        for name in args.imports:
            _import(name)
        func(args)
    except (KeyError, ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tokenmixers {args.command}: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
