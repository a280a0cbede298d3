"""Detections drawn on an image: boxes, masks, class names and scores, written as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
           "#9a6324", "#800000", "#808000", "#000075")


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` float tensor in [0, 1]; a clear error for a file that is not an image."""
    import numpy as np

    from ..data import DataError, open_rgb

    try:
        array = np.asarray(open_rgb(path))
    except DataError:
        raise  # it names the file and says what to do
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def draw_detections(image: torch.Tensor, output: dict[str, torch.Tensor], categories: Optional[Sequence[str]] = None,
                    score_threshold: float = 0.5) -> torch.Tensor:
    """``(3, H, W)`` image in [0, 1] with the detections scoring at least ``score_threshold`` drawn -> uint8 image."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = output["scores"] >= score_threshold
    labels = output["labels"][keep].tolist()
    colours = [PALETTE[(label - 1) % len(PALETTE)] for label in labels]
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if "masks" in output and keep.any():
        canvas = draw_segmentation_masks(canvas, output["masks"][keep][:, 0].bool(), alpha=0.45, colors=colours)
    names = [categories[label - 1] if categories and label - 1 < len(categories) else str(label) for label in labels]
    text = [f"{n} {s:.2f}" for n, s in zip(names, output["scores"][keep].tolist())]
    if labels:
        canvas = draw_bounding_boxes(canvas, output["boxes"][keep], labels=text, colors=colours, width=2)
    return canvas


@torch.no_grad()
def predict_image(detector: torch.nn.Module, image_path: Union[str, Path], out: Union[str, Path], *,
                  score_threshold: float = 0.5, device: str = "auto") -> dict[str, torch.Tensor]:
    """Run a detector on one image file and write the drawing as a PNG; returns the detections."""
    from ..files import atomic_write

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    image = read_image(image_path)
    detector = detector.to(device).eval()
    output = {k: v.cpu() for k, v in detector([image.to(device)])[0].items()}
    drawn = draw_detections(image, output, detector.config.get("categories"), score_threshold)
    png = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    atomic_write(out, lambda f: png.save(f, format="PNG"))
    return output
