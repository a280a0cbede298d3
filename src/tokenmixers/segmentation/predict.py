"""A segmentation drawn on its image: each class's pixels tinted in its colour, a legend of the classes present."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..drawing import draw_legend, load_font
from ..files import atomic_write
from .data import normalize, read_image
from .evaluate import Predictor

UNPAINTED = ("background",)       # classes left as they are (COCO-made maps' class 0)


def palette(num_classes: int) -> np.ndarray:
    """``(K, 3)`` uint8 colours, the same for a class whatever the image: golden-ratio hues, two brightness rows."""
    hsv = [((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.7) for i in range(num_classes)]
    return (np.array([colorsys.hsv_to_rgb(*c) for c in hsv]).reshape(-1, 3) * 255).round().astype(np.uint8)


def draw_segmentation(image: torch.Tensor, pred: torch.Tensor, classes: Optional[Sequence[str]] = None,
                      alpha: float = 0.5) -> np.ndarray:
    """``(3, H, W)`` image in [0, 1] and ``(H, W)`` class map -> ``(H, W, 3)`` uint8 overlay with a legend.

    The legend lists the classes present, the largest first, with their share of the image.
    """
    num_classes = int(max(pred.max().item() + 1, len(classes or ())))
    names = list(classes) if classes else [str(i) for i in range(num_classes)]
    colours = palette(num_classes)
    canvas = image.clamp(0, 1).permute(1, 2, 0).numpy() * 255
    labels = pred.numpy()
    paint = ~np.isin(labels, [i for i, n in enumerate(names) if n in UNPAINTED])
    canvas[paint] = (1 - alpha) * canvas[paint] + alpha * colours[labels[paint]]
    picture = Image.fromarray(canvas.round().astype(np.uint8))
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i]]
    lines = [(names[i], f"{names[i]}: {100 * counts[i] / labels.size:.1f}%") for i in present]
    hex_colours = {names[i]: "#%02x%02x%02x" % tuple(colours[i]) for i in present if names[i] not in UNPAINTED}
    draw = ImageDraw.Draw(picture)
    draw_legend(draw, picture.size, lines, hex_colours, [], load_font(max(12, min(picture.size) // 40)), 2)
    return np.array(picture)


@torch.no_grad()
def predict_image(segmentor: torch.nn.Module, image_path: Union[str, Path], out: Union[str, Path], *,
                  scale: Optional[Sequence[int]] = None, mode: Optional[str] = None,
                  device: str = "auto") -> torch.Tensor:
    """Segment one image file at the test scale and write the overlay as a PNG; returns the ``(H, W)`` class map."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = getattr(segmentor, "config", {})
    pixels = read_image(Path(image_path))
    image, normalised = torch.from_numpy(pixels).permute(2, 0, 1) / 255, normalize(pixels)
    tester = Predictor(segmentor.to(device).eval(), scale or config.get("scale") or (2048, 512),
                      mode=mode or config.get("test_mode") or "whole")
    pred = tester(normalised[None].to(device)).argmax(1)[0].cpu()
    drawn = draw_segmentation(image, pred, config.get("classes"))
    png = Image.fromarray(drawn)
    atomic_write(out, lambda f: png.save(f, format="PNG"))
    return pred
