"""The main job: train and evaluate several mixers under one recipe, then write one honest report.

``compare()`` trains each model (``seeds`` times) in its own sub-folder ``<output>/<model>/seed<k>``
(``resume=auto``: an interrupted comparison continues where it stopped, finished runs are not
trained again), classifies every validation image with the final weights (EMA weights when the
recipe keeps an EMA; ``predictions.npz`` in the run folder), measures params, MACs and inference
throughput, and writes ``report.md``, ``results.json``/``results.csv``, ``pairs.json`` and four plots: accuracy
with 95 % intervals, accuracy vs MACs, accuracy vs throughput, training curves.

The report ranks the models by top-1, gives every accuracy its 95 % interval and tests, image by
image, the best model against each other one and every model against its neighbour in the ranking
(:mod:`tokenmixers.stats`: exact McNemar test for one seed, a z-test with the seed spread for
several), saying which differences are within noise.

With no models it compares the five mixers of the paper at micro scale on the built-in
Fashion-MNIST subset with the ``fashion`` recipe.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import yaml

from .analysis.plots import plt
from .augment import build_transform
from .bench import count_macs, count_params, measure_speed, resolve_models
from .classification import Classification, ClassificationSettings, train
from .configs import ModelCfg
from .data import ImageDataset, build_dataset
from .distributed import init_distributed
from .files import atomic_write, atomic_write_csv, atomic_write_text
from .fit import Fitted, budget, search
from .recipe import parse_overrides
from .runs import loader
from .stats import accuracy, paired_difference
from .zoo import (
    create_model,
    display_name,
    family_of,
    is_builtin,
    load_checkpoint,
    model_cfg,
    paper_models,
    register_model_cfg,
    reported_top1,
    scale_of,
)

ALPHA = 0.05  # a difference with p >= ALPHA is reported as within noise


def default_models() -> list[str]:
    """The micro model of every family of the paper (Halo, PVT, Swin, ConvNeXt, DCNv3)."""
    return paper_models("micro")


def _finished(out: Path, cfg: ClassificationSettings) -> Optional[dict[str, Any]]:
    """The summary of a model already trained with this config, if any."""
    summary, config = out / "summary.json", out / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    previous = yaml.safe_load(config.read_text())
    same = all(previous.get(k) == v for k, v in cfg.to_dict().items() if k not in ("resume", "output"))
    return json.loads(summary.read_text()) if same else None


@torch.no_grad()
def predict(run: Path, cfg: ClassificationSettings, val: ImageDataset, reuse: bool = True) -> np.ndarray:
    """Top-5 classes ``(images, 5)`` of a finished run's final weights on ``val``.

    The weights are the EMA's when the recipe keeps one, else the raw ones; the result is cached
    in ``run/predictions.npz`` (reused when ``reuse`` and it covers the same images).
    """
    path = run / "predictions.npz"
    labels = np.array([s.label for s in val.samples], dtype=np.int64)
    if reuse and path.is_file():
        with np.load(path) as cached:
            if np.array_equal(cached["labels"], labels):
                return cached["top5"]
    checkpoint = run / "last.pth"
    num_classes = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["num_classes"]
    device = init_distributed(cfg.device).device
    model = create_model(cfg.model, num_classes=num_classes)
    load_checkpoint(model, checkpoint, entry="ema" if cfg.ema else "auto")
    model.to(device).eval()
    top5 = []
    for images, _, skipped in loader(val, 256, None, cfg.workers or 0):
        if skipped:
            raise ValueError(f"{skipped} validation image(s) of {val.name} could not be read; fix or remove them")
        top5.append(model(images.to(device)).topk(min(5, num_classes), dim=1).indices.cpu())
    top5 = torch.cat(top5).numpy().astype(np.int32)
    atomic_write(path, lambda f: np.savez(f, top5=top5, labels=labels))
    return top5


def compare(
    models: Optional[Sequence[str]] = None,
    recipe: Union[str, Path] = "fashion",
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
    output: Union[str, Path] = "results/compare",
    bench_size: int = 224,
    bench_batch: int = 8,
    seeds: int = 1,
    fit: bool = True,
) -> dict[str, Any]:
    """Train and evaluate ``models`` under one recipe, ``seeds`` runs each; write the report into ``output``.

    With ``fit`` (the default), a model of a user's family (registered at run time) is first placed at
    the paper's budget of its scale (:func:`tokenmixers.fit.search` from its registered configuration).
    """
    models = resolve_models(models) if models else default_models()
    if not models:
        raise ValueError("no models to compare")
    fitted = fit_user_models(models) if fit else {}
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides or {})
    output = Path(output)
    first_seed = Classification.load_settings(recipe, overrides).seed
    val: Optional[ImageDataset] = None
    rows, correct = [], {}
    for i, name in enumerate(models, 1):
        runs = []
        for seed in range(first_seed, first_seed + seeds):
            out = output / name / f"seed{seed}"
            run = {**overrides, "model": name, "seed": seed, "output": str(out), "resume": "auto"}
            cfg = Classification.load_settings(recipe, run)
            summary = _finished(out, cfg)
            print(f"[{i}/{len(models)}] {name}, seed {seed}: "
                  + ("already trained, reusing its summary" if summary else "training"), flush=True)
            reuse = summary is not None
            if summary is None:
                summary = train(recipe, run)
            if val is None:
                val = build_dataset(cfg.data, "val", build_transform(cfg, training=False), image_size=cfg.input_size)
                labels = np.array([s.label for s in val.samples])
            runs.append({"seed": seed, "top5": predict(out, cfg, val, reuse), "summary": summary})
        top5 = np.stack([r["top5"] for r in runs])  # (seeds, images, 5)
        correct[name] = top5[..., 0] == labels
        top1, acc5 = accuracy(correct[name]), accuracy((top5 == labels[:, None]).any(-1))
        model = create_model(name)
        macs = count_macs(model, (bench_size, bench_size))
        scale = scale_of(name)  # a model with a scale is measured against that scale's budget, at 224 (on meta: fast)
        paper_macs = count_macs(create_model(name, device="meta"))["macs_paper"] if scale else None
        speed = measure_speed(model, batch_size=bench_batch, input_size=(bench_size, bench_size), iters=3)
        rows.append({
            "model": name, "mixer": getattr(model, "mixer", type(model).__name__), "params_m": count_params(model) / 1e6,
            "macs_g": macs["macs"] / 1e9, "throughput": speed["throughput"], "macs_paper_224_g": paper_macs / 1e9 if scale else None,
            "budget": str(budget(scale)).split(": ", 1)[1] if scale else None,
            "inside_budget": budget(scale).inside(count_params(model), paper_macs) if scale else None,
            "fitted": dict(fitted[name].changed) if name in fitted else None,
            "top1": top1.mean, "top1_std": top1.std, "top1_low": top1.low, "top1_high": top1.high,
            "top5": acc5.mean, "top5_low": acc5.low, "top5_high": acc5.high,
            "train_time_s": float(np.mean([r["summary"]["train_time_s"] for r in runs])),
            "train_img_s": float(np.mean([_mean_rate(r["summary"]["history"]) for r in runs])),
            "runs": [{"seed": r["seed"], "top1": a, "raw_top1": r["summary"]["top1"], "raw_top5": r["summary"]["top5"],
                      "ema_top1": r["summary"]["ema_top1"], "ema_top5": r["summary"]["ema_top5"],
                      "history": r["summary"]["history"]} for r, a in zip(runs, top1.runs)],
        })
        del model
    rows.sort(key=lambda r: -r["top1"])
    pairs = _pairs(rows, correct)
    weights = "EMA" if cfg.ema else "raw"
    report = _write_report(rows, pairs, output, recipe, overrides, cfg, len(val), weights, bench_size, bench_batch)
    return {"rows": rows, "pairs": pairs, "report": str(report)}


def fit_user_models(models: Sequence[str]) -> dict[str, Fitted]:
    """Place the models of users' families (registered at run time) at their scale's budget; re-register them."""
    fitted = {}
    for name in models:
        scale, family = scale_of(name), family_of(name)
        if is_builtin(name) or scale is None or family is None or not isinstance(model_cfg(name), ModelCfg):
            continue
        fitted[name] = search(model_cfg(name).mixer, scale, start=model_cfg(name))
        register_model_cfg(name, fitted[name].cfg, family=family, scale=scale)
    return fitted


def _pairs(rows: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Paired tests: the best model against each other one, and each model against the next in rank."""
    ranked = [r["model"] for r in rows]
    chosen = [(ranked[0], other) for other in ranked[1:]]
    chosen += [(a, b) for a, b in zip(ranked[1:], ranked[2:])]
    pairs = []
    for a, b in chosen:
        diff = paired_difference(correct[a], correct[b])
        pairs.append({"a": a, "b": b, "delta": diff.delta, "delta_low": diff.low, "delta_high": diff.high,
                      "p_value": diff.p_value, "only_a": diff.only_a, "only_b": diff.only_b, "test": diff.test,
                      "separated": diff.p_value < ALPHA})
    return pairs


def _mean_rate(history: Sequence[Mapping[str, Any]]) -> float:
    rates = [r["img_per_s"] for r in history]
    return sum(rates) / max(len(rates), 1)


def _paper_top1(name: str) -> str:
    """The ImageNet-1k top-1 (%) reported for a model's official weights, or a dash."""
    top1 = reported_top1(name)
    return f"{top1:.1f}" if top1 is not None else "–"


def _number(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def _short(name: str) -> str:
    return display_name(name)


def _interval(row: Mapping[str, Any], key: str, spec: str = ".2f") -> str:
    return f"{row[key + '_low']:{spec}} to {row[key + '_high']:{spec}}"


def _noise_summary(rows: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences: which models are separated from the best, which are within noise."""
    if len(rows) < 2:
        return ["Only one model: nothing to compare."]
    best = rows[0]["model"]
    vs_best = [p for p in pairs if p["a"] == best]
    tied = [_short(p["b"]) for p in vs_best if not p["separated"]]
    apart = [_short(p["b"]) for p in vs_best if p["separated"]]
    lines = [f"- **Within noise of the best ({_short(best)}):** {', '.join(tied) or 'none'}.",
             f"- **Below the best beyond noise:** {', '.join(apart) or 'none'}."]
    neighbours = [p for p in pairs if p["a"] != best]
    if neighbours:
        same = [f"{_short(p['a'])} / {_short(p['b'])}" for p in neighbours if not p["separated"]]
        lines.append(f"- **Neighbours in the ranking within noise of each other:** {', '.join(same) or 'none'}.")
    worst = vs_best[-1]
    verdict = "separated" if worst["separated"] else "NOT separated (within noise)"
    lines.append(f"- **Best vs worst:** {_short(best)} − {_short(worst['b'])} = {worst['delta']:+.2f} points "
                 f"(95 % interval {_interval(worst, 'delta', '+.2f')}), p = {worst['p_value']:.2g}: {verdict}.")
    return lines


def _write_report(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], output: Path, recipe: Any,
                  overrides: Mapping[str, Any], cfg: ClassificationSettings, num_val: int, weights: str,
                  bench_size: int, bench_batch: int) -> Path:
    """report.md, results.json/.csv, pairs.json and the plots."""
    seeds = [r["seed"] for r in rows[0]["runs"]]
    several = len(seeds) > 1
    accuracy_table = [
        "| rank | model | top-1 (%) | 95 % interval | Δ to best | top-5 (%) | 95 % interval | paper, ImageNet top-1 |"
        + (" top-1 per seed |" if several else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if several else ""),
    ]
    for rank, r in enumerate(rows, 1):
        top1 = f"{r['top1']:.2f} ± {r['top1_std']:.2f}" if several else f"{r['top1']:.2f}"
        per_seed = ", ".join(format(x["top1"], ".2f") for x in r["runs"])
        accuracy_table.append(
            f"| {rank} | {r['model']} | {top1} | {_interval(r, 'top1')} | {r['top1'] - rows[0]['top1']:+.2f} | "
            f"{r['top5']:.2f} | {_interval(r, 'top5')} | {_paper_top1(r['model'])} |" + (f" {per_seed} |" if several else "")
        )
    pair_table = ["| A | B | Δ = A − B (points) | 95 % interval of Δ | images only A / only B gets right | p | "
                  "within noise? |", "|---|---|---|---|---|---|---|"]
    for p in pairs:
        pair_table.append(f"| {_short(p['a'])} | {_short(p['b'])} | {p['delta']:+.2f} | {_interval(p, 'delta', '+.2f')} | "
                          f"{p['only_a']} / {p['only_b']} | {p['p_value']:.2g} | {'no' if p['separated'] else 'yes'} |")
    cost_table = ["| model | mixer | params (M) | MACs (G) | img/s | train time (s) | train img/s | MACs at 224, paper "
                  "convention (G) | the paper's budget at its scale | inside |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        inside = {True: "yes", False: "**no**", None: "–"}[r["inside_budget"]]
        cost_table.append(f"| {r['model']} | {r['mixer']} | {r['params_m']:.2f} | {r['macs_g']:.2f} | "
                          f"{r['throughput']:.1f} | {r['train_time_s']:.0f} | {r['train_img_s']:.0f} | "
                          f"{_number(r['macs_paper_224_g'])} | {r['budget'] or '–'} | {inside} |")
    fitted_notes = [f"- {r['model']} was placed at the paper's budget first: "
                    + (", ".join(f"{k}={v}" for k, v in r["fitted"].items()) or "its configuration was already inside")
                    + ("." if r["inside_budget"] else "; no setting the search tried lands inside, this is the closest.")
                    for r in rows if r["fitted"] is not None]
    if several:
        how = (f"{len(seeds)} runs per model (seeds {seeds[0]}–{seeds[-1]}): top-1 is the mean ± the standard deviation "
               "over seeds; the 95 % interval adds the seed spread of the mean to the sampling of the validation "
               "images (normal approximation). Pairs are tested with a z-test of the difference of the means with "
               "the same two sources of variance; the image counts are per pair of runs.")
    else:
        how = (f"One run per model (seed {seeds[0]}); 95 % intervals are Wilson score intervals over the "
               f"{num_val:,} validation images. Pairs are tested on the same images with the exact McNemar test. "
               "One seed says whether these trained models differ, not whether another seed would rank them the "
               "same: `--seeds N` repeats each model and adds the seed spread.")
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    plots = _plots(rows, pairs, output, bench_size)
    text = "\n".join([
        "# Mixer comparison",
        "",
        f"Recipe `{recipe}` (overrides: {settings}): data `{cfg.data}`, {cfg.epochs} epoch(s) at "
        f"{cfg.input_size}x{cfg.input_size}. Accuracy of the {weights} weights after the last epoch on "
        f"{num_val:,} validation images. {how} A difference is within noise when p ≥ {ALPHA}.",
        "",
        "## Accuracy",
        "",
        *accuracy_table,
        "",
        "## Which differences are within noise",
        "",
        *_noise_summary(rows, pairs),
        "",
        *pair_table,
        "",
        "## Cost",
        "",
        f"MACs and inference throughput at {bench_size}x{bench_size}, batch {bench_batch}, "
        f"{torch.get_num_threads()} CPU thread(s); training time and speed per run.",
        "",
        *cost_table,
        "",
        *(fitted_notes + [""] if fitted_notes else []),
        *[f"![{title}]({path.name})" for title, path in plots],
        "",
    ])
    output.mkdir(parents=True, exist_ok=True)
    report = output / "report.md"
    atomic_write_text(report, text)
    atomic_write_text(output / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(output / "pairs.json", json.dumps(pairs, indent=2))
    atomic_write_csv(output / "results.csv", [{k: v for k, v in r.items() if k != "runs"} for r in rows])
    return report


def _plots(rows: list[dict[str, Any]], pairs: Sequence[Mapping[str, Any]], output: Path,
           bench_size: int) -> list[tuple[str, Path]]:
    """Ranked accuracy with intervals, accuracy vs MACs and vs throughput, training curves (PNG)."""
    output.mkdir(parents=True, exist_ok=True)
    made = []

    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1.2))
    best = rows[0]
    below = {p["b"] for p in pairs if p["a"] == best["model"] and p["separated"]}
    ax.axvspan(best["top1_low"], best["top1_high"], color="tab:blue", alpha=0.12, label="best model's interval")
    for y, r in enumerate(rows):
        color = "tab:gray" if r["model"] in below else "tab:blue"
        ax.errorbar(r["top1"], y, xerr=[[r["top1"] - r["top1_low"]], [r["top1_high"] - r["top1"]]], fmt="o",
                    color=color, capsize=4)
        if len(r["runs"]) > 1:
            ax.scatter([x["top1"] for x in r["runs"]], [y] * len(r["runs"]), s=12, color="k", alpha=0.5, zorder=3,
                       label="one seed" if y == 0 else None)
    ax.errorbar([], [], xerr=[], fmt="o", color="tab:blue", capsize=4, label="within noise of the best")
    ax.errorbar([], [], xerr=[], fmt="o", color="tab:gray", capsize=4, label="below the best beyond noise (paired test)")
    ax.set_yticks(range(len(rows)), [_short(r["model"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("top-1 (%) with 95 % interval")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(output / "accuracy.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    made.append(("top-1 with 95 % intervals, ranked", output / "accuracy.png"))

    for key, label, name in (("macs_g", f"MACs at {bench_size} (G)", "accuracy_vs_macs.png"),
                             ("throughput", f"inference throughput at {bench_size} (img/s)", "accuracy_vs_throughput.png")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            ax.errorbar(r[key], r["top1"], yerr=[[r["top1"] - r["top1_low"]], [r["top1_high"] - r["top1"]]], fmt="o",
                        capsize=3)
            ax.annotate(_short(r["model"]), (r[key], r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output / name, dpi=120)
        plt.close(fig)
        made.append((f"top-1 vs {label}", output / name))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        history = r["runs"][0]["history"]  # the first seed's
        epochs = [h["epoch"] + 1 for h in history]
        ax1.plot(epochs, [h["train_loss"] for h in history], marker=".", label=_short(r["model"]))
        evals = [(h["epoch"] + 1, h.get("ema_top1", h["top1"])) for h in history if "top1" in h]
        ax2.plot([e for e, _ in evals], [t for _, t in evals], marker=".", label=_short(r["model"]))
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1 (EMA weights if any), first seed")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "training_curves.png", dpi=120)
    plt.close(fig)
    made.append(("training curves", output / "training_curves.png"))
    return made
