"""Detections drawn on an image: boxes, masks, class names and scores, written as a PNG."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from ..data import DataError, open_rgb
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


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two ``(x0, y0, x1, y1)`` rectangles share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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


def load_font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at ``size`` px (Pillow >= 10.1 with FreeType), else its one small bitmap size."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def text_colour(background: str) -> str:
    """Black on light colours, white on dark ones."""
    r, g, b = ImageColor.getrgb(background)[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def draw_text_box(draw: ImageDraw.ImageDraw, rect: Sequence[int], text: str, font: ImageFont.ImageFont,
                  background: str, pad: int) -> None:
    """``text`` on a filled rectangle, its glyphs ``pad`` px inside."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.rectangle(rect, fill=background)
    draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=text_colour(background), font=font)


def text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, pad: int) -> tuple[int, int]:
    """Width and height of ``text`` with ``pad`` px around it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left + 2 * pad, bottom - top + 2 * pad


def draw_legend(draw: ImageDraw.ImageDraw, image_size: tuple[int, int], lines: Sequence[tuple[str, str]],
                colours: dict[str, str], boxes: Sequence[Sequence[float]], font: ImageFont.ImageFont,
                pad: int) -> Optional[tuple[int, int, int, int]]:
    """Lines of text on white, after a swatch of their class colour, in the corner covering the fewest boxes;
    returns where (``None``: left out, it does not fit in the image)."""
    sizes = [text_size(draw, text, font, pad) for _, text in lines]
    line = max(h for _, h in sizes)
    swatch = line if colours else 0
    w, h = swatch + max(w for w, _ in sizes) + 2 * pad, line * len(lines) + 2 * pad
    W, H = image_size
    if w > W or h > H:
        return None
    corners = [(0, 0), (W - w, 0), (0, H - h), (W - w, H - h)]  # ties go to the first, top left
    x, y = min(corners, key=lambda c: sum(overlap((c[0], c[1], c[0] + w, c[1] + h), b) for b in boxes))
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill="white", outline="black")
    for i, (name, text) in enumerate(lines):
        top = y + pad + i * line
        if name in colours:
            draw.rectangle((x + 2 * pad, top + pad, x + line, top + line - pad), fill=colours[name])
        draw_text_box(draw, (x + swatch + pad, top, x + w - pad, top + line), text, font, "white", pad)
    return x, y, x + w, y + h


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


def output_paths(images: Sequence[Union[str, Path]], out: Path) -> list[Path]:
    """One distinct PNG per input: ``out`` itself for one image and an ``out`` ending in .png, else
    ``out/<stem>_detections.png``, with the suffix and then parent folders added to names that clash."""
    if len(images) == 1 and out.suffix == ".png":
        return [out]
    paths = [Path(p).absolute() for p in images]
    levels = [0] * len(paths)  # how much of each path its name shows

    def name(path: Path, level: int) -> str:
        """0: the stem; 1: stem and suffix; 2, 3, ...: also the last 1, 2, ... folders."""
        if level == 0:
            return path.stem
        folders = path.parent.parts[1:]  # without the root
        return "_".join([*folders[len(folders) - (level - 1):], path.stem + path.suffix.replace(".", "_", 1)])

    while True:
        keys = [name(p, n).lower() for p, n in zip(paths, levels)]  # lower: names clash on case-insensitive disks
        files: dict[str, set[str]] = defaultdict(set)
        for key, path in zip(keys, paths):
            files[key].add(str(path).lower())
        # a longer name only helps against another file: the same file given twice is numbered below
        grow = [i for i, p in enumerate(paths) if len(files[keys[i]]) > 1 and levels[i] < len(p.parts) - 1]
        if not grow:
            break
        for i in grow:
            levels[i] += 1
    seen: Counter[str] = Counter()
    result = []
    for path, level, key in zip(paths, levels, keys):
        seen[key] += 1
        result.append(out / f"{name(path, level)}_detections{f'_{seen[key]}' if seen[key] > 1 else ''}.png")
    return result


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
