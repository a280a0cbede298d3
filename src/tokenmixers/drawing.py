"""Drawing helpers shared by the prediction pictures: fonts, labelled text boxes, a legend, output file names."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import ImageColor, ImageDraw, ImageFont


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two ``(x0, y0, x1, y1)`` rectangles share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


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


def output_paths(images: Sequence[Union[str, Path]], out: Path, kind: str = "detections") -> list[Path]:
    """One distinct PNG per input: ``out`` itself for one image and an ``out`` ending in .png, else
    ``out/<stem>_<kind>.png``, with the suffix and then parent folders added to names that clash."""
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
        result.append(out / f"{name(path, level)}_{kind}{f'_{seen[key]}' if seen[key] > 1 else ''}.png")
    return result
