"""Effective receptive fields (ERF) per stage.

What is computed, exactly. For a stage with output ``f`` (B, C, h, w), the scalar
``s = sum_c relu(f[:, c, h // 2, w // 2])`` (``reduce="sum"``: without the ReLU) is differentiated
with respect to the normalised input image ``x`` in eval mode. The map of one image is
``sum_colour |ds/dx|`` (``method="abs"``, the default) or ``sum_colour relu(ds/dx)``
(``method="replknet"``); the ERF map is its mean over the images. The ReLU on the channels follows
RepLKNet's reference code: a stage output after a LayerNorm sums to a constant over channels, so a
plain sum has (almost) no gradient.

Metrics of a map. ``ERF@t`` is the side of the smallest square centred on pixel (H // 2, W // 2)
whose share of the map's total mass is at least ``t``, as a fraction of the input side (the paper
reports ERF@0.5). ``method="abs"`` measures the map itself. ``method="replknet"`` reproduces
RepLKNet's ``analyze_erf.py``: positive gradients only, the mass measured on ``log10(map + 1)``
(which compresses the large values near the centre and so gives wider fields), squares of side 3
and more, share strictly above ``t``. The centre of mass's offset from the centre (pixels and
fraction of the side) shows asymmetric fields such as the one of shifted windows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch import nn

from ..files import atomic_write, atomic_write_csv, atomic_write_text
from ..zoo import display_name
from . import load_images, load_model
from .plots import plt

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
METHODS = ("abs", "replknet")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ERF method must be one of {', '.join(METHODS)}, got {method!r}")


def _intermediates(model: nn.Module, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
    """Stage outputs (NCHW) of a model with ``forward_intermediates`` or a ``features_only`` model."""
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(x, indices=list(stages), intermediates_only=True)
    feats = model(x)
    if isinstance(feats, (list, tuple)):
        return [feats[i] for i in stages]
    raise ValueError(
        f"{type(model).__name__} has no forward_intermediates and does not return a list of feature maps; "
        "create it with timm.create_model(name, features_only=True) or use a model that supports intermediates"
    )


def num_stages(model: nn.Module) -> int:
    """How many feature stages a model reports (``feature_info``)."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") and info is None:
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates and no feature_info, so its stage outputs cannot "
            "be reached; use a model that supports intermediates or timm.create_model(name, features_only=True)"
        )
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info: pass the stage indices explicitly")
    return len(info) if isinstance(info, (list, tuple)) else len(info.info)


def erf_maps(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    stages: Optional[Sequence[int]] = None,
    device: Union[str, torch.device] = "cpu",
    reduce: str = "relu_sum",
    method: str = "abs",
) -> dict[int, np.ndarray]:
    """Mean ERF map ``(H, W)`` per stage over batches of normalised images ``(B, 3, H, W)`` (see the module doc)."""
    if reduce not in ("relu_sum", "sum"):
        raise ValueError(f"reduce must be 'relu_sum' or 'sum', got {reduce!r}")
    _check_method(method)
    count = num_stages(model) if stages is None or not hasattr(model, "forward_intermediates") else None
    if stages is not None and getattr(model, "feature_info", None) is not None:
        count = num_stages(model)
        bad = [s for s in stages if not 0 <= s < count]
        if bad:
            raise ValueError(f"stage(s) {bad} do not exist: {type(model).__name__} has stages 0-{count - 1} (0-based)")
    stages = list(range(count)) if stages is None else list(stages)
    model = model.to(device).eval()
    totals: dict[int, torch.Tensor] = {}
    seen = 0
    for batch in images:
        x = batch.to(device).requires_grad_(True)
        feats = _intermediates(model, x, stages)
        for i, (stage, f) in enumerate(zip(stages, feats)):
            centre = f[:, :, f.shape[2] // 2, f.shape[3] // 2]
            centre = (centre.relu() if reduce == "relu_sum" else centre).sum()
            (grad,) = torch.autograd.grad(centre, x, retain_graph=i < len(stages) - 1)
            grad = grad.abs() if method == "abs" else grad.relu()
            contribution = grad.sum(1).sum(0).double().cpu()  # samples are independent in eval mode
            totals[stage] = totals.get(stage, 0) + contribution
        seen += x.shape[0]
    if not seen:
        raise ValueError("no images were given")
    return {s: (t / seen).numpy() for s, t in totals.items()}


def erf_at(erf: np.ndarray, t: float, method: str = "abs") -> float:
    """Side of the smallest centred square holding ``t`` of the mass, as a fraction of the input side.

    ``method="replknet"`` measures ``log10(erf + 1)`` with RepLKNet's rule (side >= 3, share > t;
    NaN when no square up to radius ``H // 2 - 1`` qualifies, where RepLKNet returns None).
    """
    _check_method(method)
    H, W = erf.shape
    if method == "replknet":
        erf = np.log10(erf + 1)
    total = erf.sum()
    if total <= 0:
        return float("nan")
    cy, cx = H // 2, W // 2
    rows = np.abs(np.arange(H) - cy)[:, None]
    cols = np.abs(np.arange(W) - cx)[None, :]
    radius = np.maximum(rows, cols)  # Chebyshev distance: squares around the centre
    share = np.cumsum(np.bincount(radius.ravel(), weights=erf.ravel())) / total
    if method == "replknet":
        hits = np.nonzero(share[1 : H // 2] > t)[0]
        return (2 * (int(hits[0]) + 1) + 1) / H if len(hits) else float("nan")
    r = int(np.searchsorted(share, t - 1e-12))
    return min(2 * r + 1, max(H, W)) / max(H, W)


def centre_of_mass_offset(erf: np.ndarray) -> tuple[float, float]:
    """(dy, dx) of the map's centre of mass from the image centre, in pixels."""
    H, W = erf.shape
    total = erf.sum()
    if total <= 0:
        return float("nan"), float("nan")
    ys, xs = np.arange(H) - H // 2, np.arange(W) - W // 2
    return float((erf.sum(1) * ys).sum() / total), float((erf.sum(0) * xs).sum() / total)


def erf_metrics(erf: np.ndarray, thresholds: Sequence[float] = THRESHOLDS, method: str = "abs") -> dict[str, float]:
    """ERF@t for each threshold plus the centre-of-mass offset."""
    dy, dx = centre_of_mass_offset(erf)
    side = max(erf.shape)
    out = {f"erf@{t:g}": erf_at(erf, t, method) for t in thresholds}
    out.update(com_dy_px=dy, com_dx_px=dx, com_offset=math.hypot(dy, dx) / side)
    return out


def image_batches(dataset: Any, transform: Callable, batch_size: int = 16) -> Iterable[torch.Tensor]:
    """Batches of transformed images from a dataset of (PIL image, label) pairs."""
    batch = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            continue
        batch.append(transform(item[0]))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def plot_erf(maps: dict[str, dict[int, np.ndarray]], path: Union[str, Path], title: str = "", method: str = "abs") -> Path:
    """Log-scaled heatmaps ``maps[model][stage]``: a grid with a row per model and a column per stage."""
    models = list(maps)
    stages = sorted({s for per_stage in maps.values() for s in per_stage})
    fig, axes = plt.subplots(len(models), len(stages), figsize=(2.6 * len(stages) + 1.2, 2.7 * len(models)),
                             squeeze=False)
    image = None
    for r, model in enumerate(models):
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if stage not in maps[model]:
                ax.axis("off")
                continue
            erf = maps[model][stage]
            rel = erf / max(erf.max(), 1e-30)
            image = ax.imshow(np.log10(rel + 1e-4), cmap="RdYlGn", vmin=-4, vmax=0)
            ax.set_title(f"stage {stage + 1}: ERF@0.5 = {erf_at(erf, 0.5, method):.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(display_name(model), fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="log10 relative contribution")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_erf(
    models: Sequence[str],
    images: str = "digits",
    checkpoints: Optional[Sequence[Optional[str]]] = None,
    limit: int = 50,
    input_size: int = 224,
    stages: Optional[Sequence[int]] = None,
    batch_size: int = 8,
    device: str = "cpu",
    out: Union[str, Path] = "results/erf",
    layer_scale: Optional[float] = None,
    method: str = "abs",
) -> dict[str, dict[str, Any]]:
    """ERF maps and metrics of several models on the same images; write ``.npz``, JSON, CSV and PNGs."""
    dataset = load_images(images, limit=limit)
    out = Path(out)
    results: dict[str, dict[str, Any]] = {}
    all_maps: dict[str, dict[int, np.ndarray]] = {}
    for name, checkpoint in zip(models, checkpoints or [None] * len(models)):
        model, weights = load_model(name, checkpoint, layer_scale)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        transform = create_transform(input_size, is_training=False, crop_pct=1.0, interpolation="bicubic",
                                     mean=cfg.get("mean", IMAGENET_DEFAULT_MEAN), std=cfg.get("std", IMAGENET_DEFAULT_STD))
        batches = image_batches(dataset, lambda im, t=transform: t(im.convert("RGB")), batch_size)
        maps = erf_maps(model, batches, stages, device, method=method)
        all_maps[name] = maps
        results[name] = {"weights": weights, "images": len(dataset), "input_size": input_size, "method": method,
                         "stages": {s: erf_metrics(m, method=method) for s, m in maps.items()}}
        plot_erf({name: maps}, out / f"erf_{name}.png", title=f"{name} ({weights}, {len(dataset)} images)",
                 method=method)
    if len(models) > 1:
        weights = ", ".join(sorted({r["weights"] for r in results.values()}))
        for stage in sorted({s for maps in all_maps.values() for s in maps}):
            plot_erf({m: {stage: maps[stage]} for m, maps in all_maps.items() if stage in maps},
                     out / f"erf_stage{stage + 1}.png", title=f"stage {stage + 1} ({weights})", method=method)
        plot_erf(all_maps, out / "erf_grid.png", title=f"{weights}, {len(dataset)} images at {input_size}x{input_size}",
                 method=method)
    arrays = {f"{m}/stage{s + 1}": a for m, maps in all_maps.items() for s, a in maps.items()}
    atomic_write(out / "erf_maps.npz", lambda f: np.savez_compressed(f, **arrays))
    atomic_write_text(out / "erf_metrics.json", json.dumps(results, indent=2))
    rows = [{"model": m, "weights": r["weights"], "stage": s + 1, **metrics}
            for m, r in results.items() for s, metrics in r["stages"].items()]
    atomic_write_csv(out / "erf_metrics.csv", rows)
    return results
