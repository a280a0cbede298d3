"""The main job: train and evaluate several mixers under one recipe, then write one report.

``compare()`` trains each model in its own sub-folder (``resume=auto``: an interrupted
comparison continues where it stopped, finished models are not trained again), measures params,
MACs and inference throughput, and writes ``report.md``, ``results.json``/``results.csv`` and
three plots: accuracy vs MACs, accuracy vs throughput, training curves.

With no arguments it compares the micro model of every registered family on the built-in digits
data with the ``digits`` recipe.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .bench import count_macs, count_params, measure_speed, resolve_models
from .config import build_config, parse_overrides
from .files import atomic_write_csv, atomic_write_text
from .zoo import FAMILIES, create_model, list_models


def default_models() -> list[str]:
    """The micro model of every registered family."""
    names = set(list_models())
    return [f"unified_{f}_micro" for f in FAMILIES if f"unified_{f}_micro" in names]


def _finished(out: Path, cfg: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The summary of a model already trained with this config, if any."""
    summary, config = out / "summary.json", out / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    import yaml

    previous = yaml.safe_load(config.read_text())
    previous.pop("resolved", None)
    same = all(previous.get(k) == v for k, v in cfg.items() if k not in ("resume", "output"))
    return json.loads(summary.read_text()) if same else None


def compare(
    models: Optional[Sequence[str]] = None,
    recipe: Union[str, Path] = "digits",
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
    output: Union[str, Path] = "results/compare",
    bench_size: int = 224,
    bench_batch: int = 8,
) -> dict[str, Any]:
    """Train and evaluate ``models`` under one recipe; write the report into ``output``."""
    from .training import train

    models = resolve_models(models) if models else default_models()
    if not models:
        raise ValueError("no models to compare")
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    output = Path(output)
    rows = []
    for i, name in enumerate(models, 1):
        out = output / name
        run = {**overrides, "model": name, "output": str(out), "resume": "auto"}
        cfg = build_config(recipe, run)
        summary = _finished(out, cfg)
        print(f"[{i}/{len(models)}] {name}: " + ("already trained, reusing its summary" if summary else "training"), flush=True)
        if summary is None:
            summary = train(recipe, run)
        model = create_model(name)
        macs = count_macs(model, (bench_size, bench_size))
        speed = measure_speed(model, batch_size=bench_batch, input_size=(bench_size, bench_size), iters=3)
        rows.append({
            "model": name, "mixer": getattr(model, "mixer", type(model).__name__), "params_m": count_params(model) / 1e6,
            "macs_g": macs["macs"] / 1e9, "throughput": speed["throughput"],
            "top1": summary["top1"], "top5": summary["top5"], "ema_top1": summary["ema_top1"],
            "ema_top5": summary["ema_top5"], "train_time_s": summary["train_time_s"],
            "train_img_s": _mean_rate(summary["history"]), "history": summary["history"],
        })
        del model
    report = _write_report(rows, output, recipe, overrides, bench_size, bench_batch)
    return {"rows": rows, "report": str(report)}


def _mean_rate(history: Sequence[Mapping[str, Any]]) -> float:
    rates = [r["img_per_s"] for r in history]
    return sum(rates) / max(len(rates), 1)


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _write_report(rows: list[dict[str, Any]], output: Path, recipe: Any, overrides: Mapping[str, Any],
                  bench_size: int, bench_batch: int) -> Path:
    """report.md, results.json/.csv and the plots."""
    table = [
        "| model | mixer | params (M) | MACs (G) | img/s | top-1 | top-5 | EMA top-1 | EMA top-5 | train time (s) | train img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r["top1"] or 0)):
        table.append(
            f"| {r['model']} | {r['mixer']} | {r['params_m']:.2f} | {r['macs_g']:.2f} | {r['throughput']:.1f} | "
            f"{_fmt(r['top1'], '.2f')} | {_fmt(r['top5'], '.2f')} | {_fmt(r['ema_top1'], '.2f')} | "
            f"{_fmt(r['ema_top5'], '.2f')} | {r['train_time_s']:.0f} | {r['train_img_s']:.0f} |"
        )
    plots = _plots(rows, output)
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    text = "\n".join([
        "# Mixer comparison",
        "",
        f"Recipe `{recipe}` (overrides: {settings}). Accuracy on the validation split after the last epoch, "
        f"raw and EMA weights. MACs and inference throughput at {bench_size}x{bench_size}, batch {bench_batch}, "
        f"{torch.get_num_threads()} CPU thread(s).",
        "",
        *table,
        "",
        *[f"![{title}]({path.name})" for title, path in plots],
        "",
    ])
    output.mkdir(parents=True, exist_ok=True)
    report = output / "report.md"
    atomic_write_text(report, text)
    atomic_write_text(output / "results.json", json.dumps(rows, indent=2))
    atomic_write_csv(output / "results.csv", [{k: v for k, v in r.items() if k != "history"} for r in rows])
    return report


def _plots(rows: list[dict[str, Any]], output: Path) -> list[tuple[str, Path]]:
    """Accuracy vs MACs, accuracy vs throughput, training curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    made = []
    for key, label, name in (("macs_g", "MACs at 224 (G)", "accuracy_vs_macs.png"),
                             ("throughput", "inference throughput (img/s)", "accuracy_vs_throughput.png")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            ax.scatter(r[key], r["top1"], s=40)
            ax.annotate(r["model"].removeprefix("unified_"), (r[key], r["top1"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output / name, dpi=120)
        plt.close(fig)
        made.append((f"top-1 vs {label}", output / name))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        epochs = [h["epoch"] + 1 for h in r["history"]]
        ax1.plot(epochs, [h["train_loss"] for h in r["history"]], marker=".", label=r["model"].removeprefix("unified_"))
        evals = [(h["epoch"] + 1, h["top1"]) for h in r["history"] if "top1" in h]
        ax2.plot([e for e, _ in evals], [t for _, t in evals], marker=".", label=r["model"].removeprefix("unified_"))
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "training_curves.png", dpi=120)
    plt.close(fig)
    made.append(("training curves", output / "training_curves.png"))
    return made
