"""Speed and training memory of the paper models, side by side with the official implementation.

Both implementations run in this process with the same weights (the official ones, loaded into ours),
timed round-robin: every iteration runs ours and then the official model, so a change of load on a
shared machine hits both; the speed-up is the median of the per-iteration ratios. The dense fp32
matmul throughput is probed before and after, to show how loaded the machine was.

    python benchmarks/speed.py --official /path/to/official-copy      # the table of benchmarks/README.md
    python benchmarks/speed.py --official /path/to/official-copy --rows eager default   # without compiling
    python benchmarks/speed.py --tasks detection-vs-torchvision        # our Mask R-CNNs against torchvision's
    python benchmarks/speed.py --families halo pvt --scales micro --tasks infer
    python benchmarks/speed.py --modes channels_last compile bf16       # our faster modes, ours only

The official copy is the scratch folder made by ``official_setup.py`` (its ``classification/`` is
imported); it can also be given as ``TOKENMIXERS_OFFICIAL``. Without it only our numbers are printed.

Side by side, every model gets up to three rows (``--rows``), each a ratio timed round-robin in one process:
``eager``: ours eager / the official code eager (as it ships); ``default``: ours as the ``tokenmixers`` commands
run it (training: AdamW's fused kernel, the default of every task) / the official code eager; ``compiled``: both
through ``torch.compile`` (inductor; inference with ``freezing``, the weights folded into the graph), the fair
row for anyone who compiles. A compiled variant is compiled during the warm-up, which is not timed.

Tasks (fp32, 224x224, the default ``timm.create_model(name)``):

* ``infer``: a forward pass under ``torch.inference_mode`` (micro batch 32, tiny batch 8);
* ``train``: forward, cross-entropy, backward and an AdamW step (micro batch 16, tiny batch 8);
* ``memory``: the peak of tensor memory allocated during one such training step, above what the
  model and its optimizer state hold before it (CPU allocations recorded by ``torch.profiler``);
* ``dcn``: the time of our DCNv3 model over our depth-wise conv (ConvNeXt) model at the same scale,
  inference and training, the two timed round-robin against each other;
* ``profile`` (not run by default): where our time goes, the operators with the largest share of self
  CPU time in one inference and one training step (``torch.profiler``);
* ``optimizer`` (not run by default): AdamW's step alone over each model's parameters (random gradients), the
  fused kernel (every task's default) against torch's default multi-tensor one, round-robin;
* ``detection-vs-torchvision`` (not run by default): our ConvNeXt and Swin micro and tiny Mask R-CNNs against
  torchvision's ``maskrcnn_resnet50_fpn`` (random weights, the same nuclei tile stretched to the size, fp32):
  inference and a training step at 320x320 and 800x1333, all round-robin (``benchmarks/detection.py``'s set-up);
* ``allocator`` (not run by default): our inference and training speed with ``reuse_cpu_memory()`` over
  glibc's default allocator. The allocator is process-wide, so each setting runs in a child process of
  this script (ours only), the two alternated ``--rounds`` times; the gain is the median per-round ratio.

``--reuse-memory`` calls ``tokenmixers.reuse_cpu_memory()`` first (the ``tokenmixers`` command does by
default), so every table, the side-by-side one included, is measured with freed memory kept for reuse.

Prints markdown tables ready for benchmarks/README.md and writes ``results/speed.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

FAMILIES = ("halo", "pvt", "swin", "convnext", "dcn_v3")
INFER_BATCH = {"micro": 32, "tiny": 8}
TRAIN_BATCH = {"micro": 16, "tiny": 8}
MODES = ("channels_last", "compile", "bf16")
TASKS = ("infer", "train", "memory", "dcn", "profile", "allocator", "optimizer", "detection-vs-torchvision")
DETECTORS = ("unified_convnext_micro", "unified_swin_micro", "unified_convnext_tiny", "unified_swin_tiny")
# the side-by-side table's rows: (our variant, the official one, the speed-up's key)
ROWS = {"eager": ("ours", "official", "speedup"), "default": ("ours_default", "official", "speedup_default"),
        "compiled": ("ours_compiled", "official_compiled", "speedup_compiled")}
ROW_NAMES = {"eager": "eager / eager", "default": "default path / eager", "compiled": "compiled / compiled"}
DEFAULT_TASKS = ("infer", "train", "memory", "dcn")
Step = Callable[[], None]


def load_official(path: str) -> dict[str, Callable[..., torch.nn.Module]]:
    """Import the official models from a scratch copy and return their timm entry points by name.

    Must run before ``tokenmixers`` is imported: both register the same names in timm. Fused
    attention is switched off for timm's layers, as in the timm 0.6.7 the official code pins.
    """
    root = Path(path) / "classification"
    if not (root / "models" / "__init__.py").is_file():
        raise SystemExit(f"{path} is not a copy made by official_setup.py (no classification/models)")
    sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import models  # noqa: F401  (registers the official unified_* models in timm)
    timm.layers.set_fused_attn(False)
    registry = timm.models._registry._model_entrypoints
    return {name: fn for name, fn in registry.items() if name.startswith("unified_")}


def matmul_peak(n: int = 2048, reps: int = 7) -> float:
    """Dense fp32 matmul GFLOP/s (median) with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def round_robin(steps: dict[str, Step], warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of every step, all steps once per iteration (after ``warmup`` calls each)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return times


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over iterations of ``time(slow) / time(fast)``."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def inference_step(model: torch.nn.Module, batch: int, mode: str = "eager") -> Step:
    """One forward pass of a ``batch`` of 224x224 images in ``mode`` (eager or one of MODES)."""
    model = model.eval()
    x = torch.randn(batch, 3, 224, 224)
    if mode == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(model, dynamic=False) if mode == "compile" else model

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            fn(x)

    return step


def training_step(model: torch.nn.Module, batch: int, compiled: bool = False, fused: bool = False) -> Step:
    """One forward, cross-entropy, backward and AdamW step on a ``batch`` of random images (the forward through
    ``torch.compile`` when ``compiled``, AdamW's fused kernel when ``fused``)."""
    model = model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **({"fused": True} if fused else {}))
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    fn = torch.compile(model, dynamic=False) if compiled else model

    def step() -> None:
        F.cross_entropy(fn(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def top_operators(step: Step, count: int = 6) -> list[tuple[str, float]]:
    """The ``count`` operators with the largest share (%) of self CPU time in one call of ``step``."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    names = [e.key.removeprefix("aten::").replace("_scaled_dot_product_flash_attention_for_cpu", "flash_attention")
             for e in top]
    return [(name, 100 * e.self_cpu_time_total / total) for name, e in zip(names, top)]


def peak_memory(step: Step) -> float:
    """MiB: the peak of CPU tensor memory allocated during ``step`` above the level before it."""
    from torch._C._profiler import _EventType

    step()  # optimizer state and caches exist before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields))
    if not allocations:
        return float("nan")
    allocations.sort(key=lambda a: a[0])
    before = allocations[0][1].total_allocated - allocations[0][1].alloc_size
    return (max(e.total_allocated for _, e in allocations) - before) / 2**20


def compare(name: str, ours: torch.nn.Module, official: Optional[torch.nn.Module], args: argparse.Namespace) -> dict:
    """All requested measurements of one model (ours, and the official one if given)."""
    from tokenmixers import load_checkpoint

    scale = name.rsplit("_", 1)[1]
    row: dict[str, Any] = {}
    # dynamo keeps compiled graphs per code object, and every model here shares its forward's code with the other
    # models of its implementation: past 8 (recompile_limit) it silently runs them eagerly. Start each model afresh.
    torch._dynamo.reset()
    models = {"ours": ours} if official is None else {"ours": ours, "official": official}
    # the official Halo caches a mask built in inference mode, which autograd then refuses: train fresh copies
    untouched = {k: copy.deepcopy(m) for k, m in models.items()}
    if official is not None:  # same weights, same function: check it before timing
        load_checkpoint(ours, {"model": official.state_dict()})
        x = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            row["max_abs_diff"] = (ours.eval()(x) - official.eval()(x)).abs().max().item()
    compiled = official is not None and "compiled" in args.rows
    if "infer" in args.tasks:
        steps = {k: inference_step(m, INFER_BATCH[scale]) for k, m in models.items()}
        if compiled:  # the official model keeps its eager copy above: compile a copy of each
            steps.update({f"{k}_compiled": inference_step(copy.deepcopy(m), INFER_BATCH[scale], "compile")
                          for k, m in untouched.items()})
        row["infer"] = side_by_side(round_robin(steps, args.warmup, args.iters), INFER_BATCH[scale])
    if "train" in args.tasks:
        steps = {k: training_step(copy.deepcopy(m), TRAIN_BATCH[scale]) for k, m in untouched.items()}
        if official is not None and "default" in args.rows:  # ours as train/compare run it: fused AdamW
            steps["ours_default"] = training_step(copy.deepcopy(untouched["ours"]), TRAIN_BATCH[scale], fused=True)
        if compiled:
            steps.update({f"{k}_compiled": training_step(copy.deepcopy(m), TRAIN_BATCH[scale], compiled=True)
                          for k, m in untouched.items()})
        row["train"] = side_by_side(round_robin(steps, 1, args.train_iters), TRAIN_BATCH[scale])
    if "memory" in args.tasks:
        row["memory_mib"] = {
            k: peak_memory(training_step(copy.deepcopy(m), TRAIN_BATCH[scale])) for k, m in untouched.items()
        }
    if "profile" in args.tasks:
        row["profile"] = {
            "infer": top_operators(inference_step(copy.deepcopy(untouched["ours"]), INFER_BATCH[scale])),
            "train": top_operators(training_step(copy.deepcopy(untouched["ours"]), TRAIN_BATCH[scale])),
        }
    if args.modes:
        steps = {"eager": inference_step(ours, INFER_BATCH[scale])}
        steps.update({mode: inference_step(copy.deepcopy(ours), INFER_BATCH[scale], mode) for mode in args.modes})
        times = round_robin(steps, args.warmup, args.iters)
        row["modes"] = {k: INFER_BATCH[scale] / statistics.median(t) for k, t in times.items()}
        row["modes_speedup"] = {k: speedup(times, "eager", k) for k in args.modes}
    return row


def side_by_side(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    """img/s of every variant, and the speed-ups of the table's rows: ``speedup`` (ours eager / official eager),
    ``speedup_default`` (our default path / official eager), ``speedup_compiled`` (both compiled)."""
    row = {k: batch / statistics.median(t) for k, t in times.items()}
    if "official" in times:
        row["speedup"] = speedup(times, "official", "ours")
        row["speedup_default"] = speedup(times, "official", "ours_default" if "ours_default" in times else "ours")
    if "official_compiled" in times:
        row["speedup_compiled"] = speedup(times, "official_compiled", "ours_compiled")
    return row


def dcn_cost(scale: str, args: argparse.Namespace) -> dict[str, float]:
    """Time of ``unified_dcn_v3`` over ``unified_convnext`` at ``scale`` (inference, training), round-robin."""
    models = {f: timm.create_model(f"unified_{f}_{scale}") for f in ("dcn_v3", "convnext")}
    infer = {f: inference_step(copy.deepcopy(m), INFER_BATCH[scale]) for f, m in models.items()}
    train = {f: training_step(copy.deepcopy(m), TRAIN_BATCH[scale]) for f, m in models.items()}
    return {
        "infer": speedup(round_robin(infer, args.warmup, args.iters), "dcn_v3", "convnext"),
        "train": speedup(round_robin(train, 1, args.train_iters), "dcn_v3", "convnext"),
    }


def optimizer_gain(name: str, args: argparse.Namespace) -> dict[str, float]:
    """AdamW's step over ``name``'s parameters: ms of the default multi-tensor kernel and of the fused one, and the
    ratio (round-robin)."""
    steps = {}
    for kernel in ("foreach", "fused"):
        params = [p.detach().clone().requires_grad_() for p in timm.create_model(name).parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **{kernel: True})
        steps[kernel] = opt.step
    times = round_robin(steps, args.warmup, args.iters)
    return {**{f"{k}_ms": 1e3 * statistics.median(t) for k, t in times.items()},
            "gain": speedup(times, "foreach", "fused")}


def allocator_gain(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Our img/s with ``reuse_cpu_memory()`` over glibc's default, inference and training, in alternated child processes."""
    family, scale = name[len("unified_"):].rsplit("_", 1)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for reuse in (False, True):
                out = Path(tmp) / "child.json"
                cmd = [sys.executable, __file__, "--official", "", "--families", family, "--scales", scale,
                       "--tasks", "infer", "train", "--threads", str(args.threads), "--iters", str(args.iters),
                       "--train-iters", str(args.train_iters), "--warmup", str(args.warmup), "--out", str(out)]
                subprocess.run(cmd + ["--reuse-memory"] * reuse, check=True, capture_output=True)
                runs[reuse].append(json.loads(out.read_text())["results"][name])
    gain = {}
    for task in ("infer", "train"):
        ratios = [r[task]["ours"] / d[task]["ours"] for d, r in zip(runs[False], runs[True])]
        gain[task] = statistics.median(ratios)
        gain[f"{task}_default"] = statistics.median(d[task]["ours"] for d in runs[False])
        gain[f"{task}_reuse"] = statistics.median(r[task]["ours"] for r in runs[True])
    return gain


def detection_vs_torchvision(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Our Mask R-CNNs against torchvision's ``maskrcnn_resnet50_fpn`` (random weights, one image, fp32), inference
    and a training step at 320x320 and 800x1333, all detectors round-robin: seconds and torchvision's time / ours."""
    from detection import SIZES, TORCHVISION, detector_fns  # benchmarks/detection.py (it imports this file)

    names = [*DETECTORS, TORCHVISION]
    out: dict[str, dict[str, float]] = {}
    for size in SIZES:
        infer, train = detector_fns(names, size)
        for task, steps in (("inference", infer), ("train_step", train)):
            times = round_robin(steps, 1, args.train_iters)
            for name in DETECTORS:
                out.setdefault(name, {})[f"{task}@{size}"] = statistics.median(times[name])
                out[name][f"{task}@{size}_vs_torchvision"] = speedup(times, TORCHVISION, name)
            out.setdefault(TORCHVISION, {})[f"{task}@{size}"] = statistics.median(times[TORCHVISION])
        print(f"detectors at {SIZES[size]}: {json.dumps({n: out[n] for n in names})}", flush=True)
    return out


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def tables(results: dict[str, dict], side_by_side: bool) -> str:
    """Markdown tables of the results."""
    lines: list[str] = []
    timed = any(k in r for r in results.values() for k in ("infer", "train", "memory_mib"))
    if timed and side_by_side:
        lines += [
            "| model | row: ours / official | inference img/s: ours / official | speed-up "
            "| training img/s: ours / official | speed-up | training peak MiB: ours / official |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            inf, tr, mem = r.get("infer", {}), r.get("train", {}), r.get("memory_mib", {})
            for row, (ours, theirs, key) in ROWS.items():
                if key not in inf and key not in tr:
                    continue
                memory = f"{_fmt(mem.get('ours'), '.0f')} / {_fmt(mem.get('official'), '.0f')}" if row == "eager" else ""
                ours_inf = inf.get(ours, inf.get("ours"))  # inference's default path is the eager one
                lines.append(
                    f"| {name} | {ROW_NAMES[row]} | {_fmt(ours_inf)} / {_fmt(inf.get(theirs))} "
                    f"| {_fmt(inf.get(key), '.2f')}× | {_fmt(tr.get(ours, tr.get('ours')))} / {_fmt(tr.get(theirs))} "
                    f"| {_fmt(tr.get(key), '.2f')}× | {memory} |"
                )
    elif timed:
        lines += ["| model | inference img/s | training img/s | training peak MiB |", "|---|---|---|---|"]
        for name, r in results.items():
            lines.append(
                f"| {name} | {_fmt(r.get('infer', {}).get('ours'))} | {_fmt(r.get('train', {}).get('ours'))} "
                f"| {_fmt(r.get('memory_mib', {}).get('ours'), '.0f')} |"
            )
    profiled = {name: r["profile"] for name, r in results.items() if "profile" in r}
    if profiled:
        lines += ["", "| model | inference: top operators (% of self CPU time) | training step |", "|---|---|---|"]
        for name, p in profiled.items():
            cells = [", ".join(f"{op} {share:.0f} %" for op, share in p[task]) for task in ("infer", "train")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    modes = [m for m in MODES if any(m in r.get("modes", {}) for r in results.values())]
    if modes:
        lines += ["", "| model | eager img/s | " + " | ".join(f"{m} img/s (× eager)" for m in modes) + " |",
                  "|---|---|" + "---|" * len(modes)]
        for name, r in results.items():
            cells = [f"{r['modes'][m]:.1f} ({r['modes_speedup'][m]:.2f}×)" for m in modes]
            lines.append(f"| {name} | {r['modes']['eager']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse options, measure, print the tables and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get("TOKENMIXERS_OFFICIAL"),
                        help="scratch copy of the official code (default: $TOKENMIXERS_OFFICIAL)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--scales", nargs="+", default=["micro", "tiny"], choices=list(INFER_BATCH))
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--modes", nargs="*", default=[], choices=MODES,
                        help="also time these inference modes of our models against eager")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS),
                        help="side-by-side rows: eager / eager, our default path (fused AdamW) / eager, both compiled "
                             "(torch.compile, inductor; inference with freezing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="inference iterations per model")
    parser.add_argument("--train-iters", type=int, default=6, help="training iterations per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="child processes per allocator setting (allocator task)")
    parser.add_argument("--reuse-memory", action="store_true",
                        help="keep freed CPU memory for reuse (tokenmixers.reuse_cpu_memory) during every measurement")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # inference graphs (no grad) fold their weights in, as users deploy
    official = load_official(args.official) if args.official else {}
    import tokenmixers  # (after the official import: our names win in timm's registry)
    if args.reuse_memory:
        tokenmixers.reuse_cpu_memory()
    from tokenmixers.files import atomic_write_text

    peak_before = matmul_peak()
    results = {}
    per_model = bool(set(args.tasks) - {"dcn", "allocator", "optimizer", "detection-vs-torchvision"} or args.modes)
    for scale in args.scales if per_model else ():
        for family in args.families:
            name = f"unified_{family}_{scale}"
            torch.manual_seed(0)
            ours = timm.create_model(name)
            theirs = official[name]() if official else None
            results[name] = compare(name, ours, theirs, args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    dcn = {}
    if "dcn" in args.tasks:
        for scale in args.scales:
            torch.manual_seed(0)
            dcn[scale] = dcn_cost(scale, args)
            print(f"dcn_v3 / convnext time, {scale}: {json.dumps(dcn[scale])}", flush=True)
    allocator = {}
    if "allocator" in args.tasks:
        for scale in args.scales:
            for family in args.families:
                name = f"unified_{family}_{scale}"
                allocator[name] = allocator_gain(name, args)
                print(f"{name} reuse_cpu_memory / default: {json.dumps(allocator[name])}", flush=True)
    optimizer = {f"unified_{f}_{s}": optimizer_gain(f"unified_{f}_{s}", args)
                 for s in args.scales for f in args.families} if "optimizer" in args.tasks else {}
    detectors = detection_vs_torchvision(args) if "detection-vs-torchvision" in args.tasks else {}
    peaks = (peak_before, matmul_peak())
    header = (
        f"{datetime.date.today()}, torch {torch.__version__}, {cpu_name()}, "
        f"{args.threads} threads, fp32 matmul {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s before / after"
        + (", freed CPU memory kept for reuse" if args.reuse_memory else "")
    )
    print(f"\n{header}\n\n{tables(results, bool(official))}")
    if dcn:
        print("\n| scale | DCNv3 / DWConv time, inference | training |\n|---|---|---|")
        for scale, r in dcn.items():
            print(f"| {scale} | {r['infer']:.2f}× | {r['train']:.2f}× |")
    if allocator:
        print("\n| model | inference img/s: default / reuse | gain | training img/s: default / reuse | gain |"
              "\n|---|---|---|---|---|")
        for name, g in allocator.items():
            print(f"| {name} | {g['infer_default']:.1f} / {g['infer_reuse']:.1f} | {g['infer']:.2f}× "
                  f"| {g['train_default']:.1f} / {g['train_reuse']:.1f} | {g['train']:.2f}× |")
    if optimizer:
        print("\n| model | AdamW step ms: multi-tensor / fused | gain |\n|---|---|---|")
        for name, g in optimizer.items():
            print(f"| {name} | {g['foreach_ms']:.1f} / {g['fused_ms']:.1f} | {g['gain']:.2f}× |")
    if detectors:
        sizes = ("320", "800")
        print("\n| detector | " + " | ".join(f"{task} {s} (s, × torchvision)" for task in ("inference", "train step")
                                           for s in ("320x320", "800x1333")) + " |\n|---|---|---|---|---|")
        for name, d in detectors.items():
            cells = [f"{d[f'{task}@{s}']:.2f}" + (f" ({d[f'{task}@{s}_vs_torchvision']:.2f}×)"
                                                  if f"{task}@{s}_vs_torchvision" in d else "")
                     for task in ("inference", "train_step") for s in sizes]
            print(f"| {name} | " + " | ".join(cells) + " |")
    record = {"setup": header, "results": results, "dcn_over_dwconv": dcn, "reuse_cpu_memory_gain": allocator,
              "adamw_fused_gain": optimizer, "detection_vs_torchvision": detectors}
    atomic_write_text(args.out, json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
