"""Invariance to translation, rotation and scale (the paper's Fig. 7; official protocol).

Every image gives a *standard view* (resize the shorter side to ``input_size / crop_pct`` = 256,
bicubic; centre crop 224; normalise) and, per setting, a *variant*:

* ``translation``: strength s = 0, 4, ..., 64 px. The 224 crop window of the resized image moves by
  s along one of 8 directions (drawn per image and setting from ``seed``; the official code draws
  only 7 of them), is clipped to the image and zero-filled (black, before normalisation). The
  clipped content keeps its true position in the window, so the view is the standard one shifted
  by exactly s (the official code re-centred clipped crops, shifting them less, and placed its
  window at ``L // 2 - 112`` on a resized side L, one pixel above the rounded centre crop when
  L is 3 mod 4); ``align="center"`` reproduces both.
* ``pre_rotation`` / ``post_rotation``: 0, 5, ..., 90 degrees, bicubic, black fill, before or after
  the centre crop.
* ``scale``: crop ratio r = 0.200, 0.325, ..., 1.950: resize the shorter side to int(224 / r), centre
  crop 224 with black fill where the image is smaller.

Per setting: top-1/top-5 against the labels and *consistency*, the share of images whose top-1
equals the top-1 of their standard view.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from ..distributed import all_reduce_sum, init_distributed
from ..files import atomic_write_csv, atomic_write_text
from ..runs import show_progress
from . import load_images, load_model
from .plots import Panel, plot_panels

KINDS = ("translation", "pre_rotation", "post_rotation", "scale")
# the 8 directions (dy, dx); the official code lists them in this order but draws randint(7)
DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1))


def strengths(kind: str) -> list[float]:
    """The official settings of a transform kind."""
    if kind == "translation":
        return list(range(0, 65, 4))
    if kind in ("pre_rotation", "post_rotation"):
        return list(range(0, 91, 5))
    if kind == "scale":
        return [round(0.2 + 0.125 * i, 3) for i in range(15)]
    raise ValueError(f"unknown invariance kind {kind!r}; accepted: {', '.join(KINDS)}")


class Views:
    """The standard view and the variants of the protocol for one input size and normalisation."""

    def __init__(self, input_size: int = 224, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, align: str = "shift") -> None:
        if align not in ("shift", "center"):
            raise ValueError(f"align must be 'shift' or 'center', got {align!r}")
        self.size, self.resize_to = input_size, int(input_size / crop_pct)
        self.mean, self.std, self.align = list(mean), list(std), align

    def _finish(self, image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        tensor = TF.to_tensor(image) if isinstance(image, Image.Image) else image
        return TF.normalize(tensor, self.mean, self.std)

    def _resized(self, image: Image.Image, size: Optional[int] = None) -> Image.Image:
        return TF.resize(image.convert("RGB"), size or self.resize_to, interpolation=InterpolationMode.BICUBIC)

    def standard(self, image: Image.Image) -> torch.Tensor:
        """Resize, centre crop, normalise."""
        return self._finish(TF.center_crop(self._resized(image), self.size))

    def translation(self, image: Image.Image, shift: int, direction: int) -> torch.Tensor:
        """The centre-crop window moved by ``shift`` px along ``DIRECTIONS[direction]``, black outside."""
        resized = TF.to_tensor(self._resized(image))
        _, H, W = resized.shape
        dy, dx = DIRECTIONS[direction]
        if self.align == "shift":  # the standard view's window (torchvision's centre crop rounds), moved
            top, left, extent = int(round((H - self.size) / 2.0)), int(round((W - self.size) / 2.0)), self.size
        else:  # official: +-size//2 around pixel (H // 2, W // 2), one row/column above the rounded
            half = self.size // 2  # centre crop's origin when the resized side is 3 (mod 4)
            top, left, extent = H // 2 - half, W // 2 - half, 2 * half
        top, left = top + dy * shift, left + dx * shift
        y0, y1 = max(top, 0), min(top + extent, H)
        x0, x1 = max(left, 0), min(left + extent, W)
        canvas = torch.zeros(3, self.size, self.size)
        if y1 > y0 and x1 > x0:
            crop = resized[:, y0:y1, x0:x1]
            if self.align == "shift":
                oy, ox = y0 - top, x0 - left
            else:  # official: the clipped crop is re-centred in the window
                oy, ox = (self.size - crop.shape[1]) // 2, (self.size - crop.shape[2]) // 2
            canvas[:, oy : oy + crop.shape[1], ox : ox + crop.shape[2]] = crop
        return self._finish(canvas)

    def rotation(self, image: Image.Image, angle: float, pre: bool) -> torch.Tensor:
        """Bicubic rotation with black fill, before (``pre``) or after the centre crop."""
        resized = self._resized(image)

        def rotate(img: Image.Image) -> Image.Image:
            return TF.rotate(img, angle, interpolation=InterpolationMode.BICUBIC) if angle else img

        if pre:
            return self._finish(TF.center_crop(rotate(resized), self.size))
        return self._finish(rotate(TF.center_crop(resized, self.size)))

    def scale(self, image: Image.Image, ratio: float) -> torch.Tensor:
        """Resize the shorter side to ``size / ratio``; centre crop with black fill."""
        return self._finish(TF.center_crop(self._resized(image, int(self.size / ratio)), self.size))

    def variant(self, kind: str, image: Image.Image, strength: float, direction: int = 0) -> torch.Tensor:
        """The variant of ``kind`` at ``strength``."""
        if kind == "translation":
            return self.translation(image, int(strength), direction)
        if kind in ("pre_rotation", "post_rotation"):
            return self.rotation(image, strength, pre=kind == "pre_rotation")
        if kind == "scale":
            return self.scale(image, strength)
        raise ValueError(f"unknown invariance kind {kind!r}; accepted: {', '.join(KINDS)}")


def draw_directions(num_settings: int, num_images: int, seed: int = 0) -> np.ndarray:
    """Direction index (0..7) per setting and image, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, len(DIRECTIONS), size=(num_settings, num_images))


@torch.no_grad()
def invariance(
    model: nn.Module,
    dataset: Any,
    kind: str = "translation",
    settings: Optional[Sequence[float]] = None,
    views: Optional[Views] = None,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy and consistency per setting of one transform kind.

    Args:
        model: a classifier (``(B, 3, H, W) -> logits``).
        dataset: items ``(PIL image, label)``; label -1 means unlabelled (no accuracy).
        kind: one of ``KINDS``.
        settings: strengths (default: the official list for ``kind``).
        views: the view maker (input size, crop, normalisation); default 224 / 0.875 / ImageNet.
        indices: the images this process handles (distributed runs); counts are summed over processes.

    Returns:
        One record per setting: ``strength``, ``top1``, ``top5``, ``consistency`` (percent), ``images``.
    """
    settings = strengths(kind) if settings is None else list(settings)
    views = views or Views()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    directions = draw_directions(len(settings), len(dataset), seed)
    model = model.to(device).eval()
    # per setting: correct@1, correct@5, consistent, labelled, images
    counts = torch.zeros(len(settings), 5, dtype=torch.float64)
    for start in tqdm(range(0, len(indices), batch_size), desc=kind, disable=not (progress and show_progress()), leave=False):
        batch = [(i, dataset[i]) for i in indices[start : start + batch_size]]
        batch = [(i, item) for i, item in batch if item is not None]
        if not batch:
            continue
        ids = [i for i, _ in batch]
        labels = torch.tensor([item[1] for _, item in batch])
        reference = model(torch.stack([views.standard(item[0]) for _, item in batch]).to(device)).argmax(1).cpu()
        labelled = labels >= 0
        for s, strength in enumerate(settings):
            x = torch.stack([views.variant(kind, item[0], strength, int(directions[s, i])) for i, item in batch])
            logits = model(x.to(device)).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            hits = (top5 == labels[:, None]) & labelled[:, None]
            counts[s] += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), (top5[:, 0] == reference).sum(),
                                       labelled.sum(), len(ids)], dtype=torch.float64)
    counts = all_reduce_sum(counts)
    records = []
    for s, strength in enumerate(settings):
        c1, c5, consistent, labelled_n, n = counts[s].tolist()
        records.append({
            "kind": kind, "strength": strength, "images": int(n),
            "top1": 100 * c1 / labelled_n if labelled_n else None,
            "top5": 100 * c5 / labelled_n if labelled_n else None,
            "consistency": 100 * consistent / n if n else None,
        })
    return records


def plot_invariance(results: dict[str, list[dict[str, Any]]], path: Union[str, Path]) -> Path:
    """Consistency and top-1 vs strength, one line per model, one column per kind (as Fig. 7)."""
    kinds = [k for k in KINDS if any(r["kind"] == k for rows in results.values() for r in rows)]
    has_acc = any(r["top1"] is not None for rows in results.values() for r in rows)
    units = {"translation": "shift (px)", "pre_rotation": "angle (deg)", "post_rotation": "angle (deg)",
             "scale": "crop ratio"}
    grid = [[Panel("strength", metric, kind.replace("_", " "), units[kind], f"{metric} (%)", {"kind": kind})
             for kind in kinds] for metric in ["consistency"] + (["top1"] if has_acc else [])]
    return plot_panels(results, grid, path)


def run_invariance(
    models: Sequence[str],
    data: str,
    kinds: Sequence[str] = KINDS,
    checkpoints: Optional[Sequence[Optional[str]]] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    input_size: int = 224,
    crop_pct: float = 0.875,
    align: str = "shift",
    seed: int = 0,
    device: str = "auto",
    out: Union[str, Path] = "results/invariance",
) -> dict[str, list[dict[str, Any]]]:
    """Run the protocol for several models (torchrun shards the images); write JSON, CSV and plots."""
    info = init_distributed(device)
    dataset = load_images(data, limit=limit)
    indices = list(range(info.rank, len(dataset), info.world_size))
    results: dict[str, list[dict[str, Any]]] = {}
    for name, checkpoint in zip(models, checkpoints or [None] * len(models)):
        model, weights = load_model(name, checkpoint, seed=seed)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        views = Views(input_size, crop_pct, cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD), align)
        rows = []
        for kind in kinds:
            for record in invariance(model, dataset, kind, views=views, batch_size=batch_size, device=info.device,
                                     seed=seed, indices=indices, progress=info.primary):
                rows.append({"model": name, "weights": weights, **record})
        results[name] = rows
    if info.primary:
        out = Path(out)
        flat = [r for rows in results.values() for r in rows]
        atomic_write_text(out / "invariance.json", json.dumps(flat, indent=2))
        atomic_write_csv(out / "invariance.csv", flat)
        plot_invariance(results, out / "invariance.png")
    return results
