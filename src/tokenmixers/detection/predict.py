"""Detections drawn on an image: boxes, masks, class names and scores, written as a PNG."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_segmentation_masks

from ..data import DataError, open_rgb
from ..drawing import draw_legend, draw_text_box, load_font, overlap, text_size
from ..files import atomic_write

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
           "#9a6324", "#800000", "#808000", "#000075")


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` float tensor in [0, 1]; a clear error for a file that is not an image."""
    try:
        array = np.asarray(open_rgb(path))
    except DataError:
        raise  # it names the file and says what to do
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def label_text(name: str, score: float) -> str:
    """A detection's label: class name and score, e.g. ``nucleus 0.84``."""
    return f"{name} {score:.2f}"


def legend_lines(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(class name, "name: count")`` for each class drawn, the most frequent first."""
    return [(name, f"{name}: {count}") for name, count in Counter(names).most_common()]


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                 taken: Sequence[Sequence[int]] = ()) -> list[Optional[tuple[int, int, int, int]]]:
    """Label rectangles above each box's top-left corner (inside at the image's top edge), kept inside the image;
    ``None`` where a label would overlap an earlier one or a ``taken`` rectangle (a sliver hides letters)."""
    W, H = image_size
    placed: list[Optional[Sequence[int]]] = list(taken)
    for (x0, y0, _, _), (w, h) in zip(boxes, sizes):
        y = y0 - h if y0 >= h else y0
        x, y = max(0, min(int(x0), W - w)), max(0, min(int(y), H - h))
        rect = (x, y, x + w, y + h)
        placed.append(None if any(r is not None and overlap(rect, r) > 0 for r in placed) else rect)
    return placed[len(taken):]


def draw_detections(image: torch.Tensor, output: dict[str, torch.Tensor], categories: Optional[Sequence[str]] = None,
                    score_threshold: float = 0.5) -> torch.Tensor:
    """``(3, H, W)`` image in [0, 1] with the detections scoring at least ``score_threshold`` drawn -> uint8 image.

    Masks, boxes, a label per box (class and score; left out where it would overlap a higher-scoring
    box's label) and a legend of the classes with their counts in the corner covering the fewest boxes.
    """
    keep = (output["scores"] >= score_threshold).nonzero()[:, 0]
    keep = keep[output["scores"][keep].argsort(descending=True)]  # best first: their labels win a place
    labels = output["labels"][keep].tolist()
    colours = [PALETTE[(label - 1) % len(PALETTE)] for label in labels]
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if "masks" in output and len(keep):
        canvas = draw_segmentation_masks(canvas, output["masks"][keep][:, 0].bool(), alpha=0.45, colors=colours)
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    # torchvision's default label font is 10 px, where "nucleus 0.84" reads as "nucleus0.84"
    font = load_font(max(12, min(picture.size) // 40))
    pad = 2
    names = [categories[label - 1] if categories and label - 1 < len(categories) else str(label) for label in labels]
    boxes = [[round(v) for v in box] for box in output["boxes"][keep].tolist()]
    for box, colour in zip(boxes, colours):
        draw.rectangle(box, outline=colour, width=2)
    legend = draw_legend(draw, picture.size, legend_lines(names) or [("", f"no detections >= {score_threshold:g}")],
                         dict(zip(names, colours)), boxes, font, pad)
    texts = [label_text(n, s) for n, s in zip(names, output["scores"][keep].tolist())]
    sizes = [text_size(draw, t, font, pad) for t in texts]
    for text, colour, rect in zip(texts, colours, place_labels(boxes, sizes, picture.size, [legend] if legend else [])):
        if rect is not None:
            draw_text_box(draw, rect, text, font, colour, pad)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


@torch.no_grad()
def predict_image(detector: torch.nn.Module, image_path: Union[str, Path], out: Union[str, Path], *,
                  score_threshold: float = 0.5, device: str = "auto") -> dict[str, torch.Tensor]:
    """Run a detector on one image file and write the drawing as a PNG; returns the detections."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    image = read_image(image_path)
    detector = detector.to(device).eval()
    output = {k: v.cpu() for k, v in detector([image.to(device)])[0].items()}
    drawn = draw_detections(image, output, detector.config.get("categories"), score_threshold)
    png = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    atomic_write(out, lambda f: png.save(f, format="PNG"))
    return output
