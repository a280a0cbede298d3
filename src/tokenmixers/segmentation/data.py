"""Semantic segmentation data with mmsegmentation 0.x's ADE20K pipeline, checked before training starts.

Three folder layouts, recognised in this order (:func:`detect_layout`; the dataset's ``layout``):

* ``"folder"``: ``root/classes.txt`` (one class name a line; line n is label value n - 1) with
  ``root/images/<split>/*.{jpg,jpeg,png}`` and single-channel label maps
  ``root/annotations/<split>/*.png`` (values 0..K-1, 255 = ignore; palette PNGs read as indices);
* ``"coco"``: an ``instances_<split>.json`` in ``root`` or ``root/annotations`` (found as
  :func:`tokenmixers.detection.data.find_split` finds it); the label maps are made from the instance
  masks by :func:`semantic_map`, with classes ``["background", *category names]``;
* ``"ade20k"``: ``root/images/<split>`` and ``root/annotations/<split>`` without ``classes.txt``:
  ADE20K's 150 classes with mmseg's ``reduce_zero_label`` (0 "other" -> 255, 1..150 -> 0..149).

In both folder layouts images and label maps are paired by file stem, and the splits ``train`` and
``val`` are also looked for as ADE20K's ``training`` and ``validation``.

Checked when the dataset is built, each with a :class:`DataError` naming the file or folder: a
missing folder or split, images without a label map and label maps without an image, a label map
whose size (read from the file headers) differs from its image's, a label map with more than one
channel, an empty split, a ``classes.txt`` that is empty or names a class twice, and in COCO sets
missing images, images of another size than the file says, unknown category or image ids,
annotations without a mask, malformed polygons and RLE masks of the wrong size. Checked when an item is
loaded: label values outside the classes (neither a class nor 255) and images that cannot be read.

Training items are ``(image, label)``: a float32 ``(3, crop_h, crop_w)`` image and an int64
``(crop_h, crop_w)`` label map after mmseg's train pipeline (Resize with a random ratio, RandomCrop
with ``cat_max_ratio``, RandomFlip, PhotoMetricDistortion, Normalize, Pad with 0 / 255).
Evaluation items are the image resized to fit ``scale`` and normalised, with the label map at the
image's original size (its shape is the size the logits are resized back to); their sizes differ,
so evaluation batches hold one item, as in mmseg. Random draws come from Python's ``random``, which
torch seeds in every loader worker, or depend only on (``seed``, ``epoch``, index) once the run
engine sets ``seed`` (deterministic mode).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..coco import find_split, load_coco, quiet_pycocotools
from ..data import DataError, open_rgb

PathLike = Union[str, Path]
IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)  # mmseg's img_norm_cfg, on 0..255 RGB
STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")  # PIL's single-channel integer modes
SPLIT_ALIASES = {"train": "training", "val": "validation"}

# mmseg 0.x ADE20KDataset.CLASSES, spelled as mmseg spells them ("bed " included), for label value n - 1
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)


@dataclass(frozen=True)
class Sample:
    """One image and where its labels come from: a label-map file, or a COCO image id."""

    image: Path
    label: Union[Path, int]


# -- layouts ----------------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """``"folder"``, ``"coco"`` or ``"ade20k"`` by the module docstring's rule; a DataError says what it looked for."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / "classes.txt").is_file():
        return "folder"
    if any(root.glob("instances_*.json")) or any((root / "annotations").glob("instances_*.json")):
        return "coco"
    ade_splits = [root / "images" / s for s in ("training", "validation")]
    if any(p.is_dir() for p in ade_splits) and (root / "annotations").is_dir():
        return "ade20k"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        raise DataError(f"{root} has images/ and annotations/ but no classes.txt: add one class name per line "
                        "(line n is label value n - 1); without it only ADE20K's own folder "
                        "(images/training, images/validation) is recognised")
    raise DataError(f"{root} is no segmentation data folder: expected classes.txt with images/<split> and "
                    "annotations/<split> (folder layout), instances_<split>.json (COCO), or ADE20K's "
                    "images/{training,validation} and annotations/{training,validation}")


def read_classes(path: Path) -> list[str]:
    """The names in a ``classes.txt``, one a line; a DataError if it is empty, has blank lines or repeats a name."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise DataError(f"{path} is empty; it needs one class name per line (line n is label value n - 1)")
    if "" in names:
        raise DataError(f"{path}:{names.index('') + 1}: blank line; every line up to the last names a class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path} names these classes more than once: {repeated[:5]}")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path} names {len(names)} classes; label maps hold at most 255 (value 255 means ignored)")
    return names


def folder_split(root: Path, split: str) -> tuple[Path, Path]:
    """The image and label-map folders of a split, or a DataError saying where it looked."""
    names = [split] + ([SPLIT_ALIASES[split]] if split in SPLIT_ALIASES else [])
    for name in names:
        images, labels = root / "images" / name, root / "annotations" / name
        if images.is_dir() and labels.is_dir():
            return images, labels
        if images.is_dir() or labels.is_dir():
            missing = labels if images.is_dir() else images
            raise DataError(f"{missing} does not exist: the {split!r} split needs both {images} and {labels}")
    looked = ", ".join(f"{root / 'images' / n} + {root / 'annotations' / n}" for n in names)
    raise DataError(f"{root} has no {split!r} split; looked for {looked}")


def _by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """The files of a folder with one of ``suffixes``, keyed by stem; a DataError if two share a stem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"{found[path.stem]} and {path} share a name; pairs are matched by name, so keep one")
        found[path.stem] = path
    return found


def _few(paths: Sequence[Path]) -> str:
    """Up to three paths for a message."""
    return ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def pair_files(images: Path, labels: Path) -> list[Sample]:
    """Images and label maps matched by file stem; a DataError naming a few unmatched files of either side."""
    image_files, label_files = _by_stem(images, IMAGE_SUFFIXES), _by_stem(labels, (".png",))
    unlabelled = [image_files[s] for s in sorted(image_files.keys() - label_files.keys())]
    orphans = [label_files[s] for s in sorted(label_files.keys() - image_files.keys())]
    problems = []
    if unlabelled:
        problems.append(f"{len(unlabelled)} image(s) without a label map (<name>.png) in {labels}: {_few(unlabelled)}")
    if orphans:
        problems.append(f"{len(orphans)} label map(s) without an image in {images}: {_few(orphans)}")
    if problems:
        raise DataError("; ".join(problems))
    if not image_files:
        raise DataError(f"the split is empty: {images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Sample(image_files[s], label_files[s]) for s in sorted(image_files)]


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` from an image file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except (OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image: {err}") from None


def check_pairs(samples: Sequence[Sample]) -> None:
    """Every label map single-channel and the size of its image (from the headers); a DataError naming the file."""
    for sample in samples:
        (w, h), _ = _header(sample.image)
        (lw, lh), mode = _header(sample.label)
        if mode not in LABEL_MODES:
            raise DataError(f"{sample.label} is a {mode} image; label maps must have one channel of class indices "
                            "(grey or palette PNG)")
        if (lw, lh) != (w, h):
            raise DataError(f"{sample.label} is {lw}x{lh} but its image {sample.image} is {w}x{h}")


# -- COCO sets --------------------------------------------------------------------------------------


def instance_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One annotation's polygons or RLE (compressed or not) as a ``(height, width)`` uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def semantic_map(coco: Any, image_id: int, height: int, width: int) -> np.ndarray:
    """An image's instances as a ``(height, width)`` uint8 class map: 0 background, category k (by id order) -> k,
    crowd regions 255 (ignored); where instances overlap, the later annotation wins."""
    label_of = {c: i + 1 for i, c in enumerate(sorted(coco.cats))}
    out = np.zeros((height, width), dtype=np.uint8)
    with quiet_pycocotools():
        for ann in coco.imgToAnns.get(image_id, []):
            value = IGNORE_INDEX if ann.get("iscrowd", 0) else label_of[ann["category_id"]]
            out[instance_mask(ann["segmentation"], height, width).astype(bool)] = value
    return out


def check_coco(coco: Any, annotations: Path, image_dir: Path) -> None:
    """What stops a COCO set from giving semantic maps (a DataError naming the file): see the module docstring."""
    if not coco.cats:
        raise DataError(f"{annotations} defines no categories")
    if len(coco.cats) >= IGNORE_INDEX:
        raise DataError(f"{annotations} defines {len(coco.cats)} categories; with background at most 255 fit")
    if not coco.dataset["images"]:
        raise DataError(f"the split is empty: {annotations} lists no images")
    for info in coco.dataset["images"]:
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"{annotations} names the image {info['file_name']}, missing from {image_dir}")
        (w, h), _ = _header(path)
        if (w, h) != (info.get("width"), info.get("height")):
            raise DataError(f"{path} is {w}x{h} but {annotations} says {info.get('width')}x{info.get('height')}")
    for ann in coco.dataset["annotations"]:
        if ann.get("category_id") not in coco.cats or ann.get("image_id") not in coco.imgs:
            raise DataError(f"{annotations}: annotation {ann.get('id')} names category {ann.get('category_id')} "
                            f"and image {ann.get('image_id')}, not both defined")
        _check_segmentation(ann, coco.imgs[ann["image_id"]], annotations)


def _check_segmentation(ann: dict, image: dict, annotations: Path) -> None:
    """An annotation's mask: polygons of at least three points, or RLE of its image's size."""
    mask = ann.get("segmentation")
    where = f"{annotations}: annotation {ann.get('id')}"
    if not mask:
        raise DataError(f"{where} has no segmentation; semantic maps need polygons or RLE masks, not boxes alone")
    if isinstance(mask, dict):
        if list(mask.get("size", [])) != [image.get("height"), image.get("width")]:
            raise DataError(f"{where} has an RLE mask of size {mask.get('size')}, not its image's "
                            f"[{image.get('height')}, {image.get('width')}] (height, width)")
    elif not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in mask):
        raise DataError(f"{where} has a polygon that is not a list of at least 3 x, y points: {str(mask)[:80]}")


# -- loading ----------------------------------------------------------------------------------------


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 ("other") -> 255 (ignored), 1..254 -> 0..253, 255 kept."""
    return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1).astype(np.uint8)


def read_label(path: Path, num_classes: int, reduce_zero: bool = False) -> np.ndarray:
    """A label-map file as a uint8 ``(H, W)`` array (255 = ignore); a DataError naming values outside the classes."""
    try:
        with Image.open(path) as image:
            values = np.asarray(image)
    except (OSError, Image.DecompressionBombError) as err:
        raise DataError(f"label map {path} cannot be read: {err}") from None
    if values.ndim != 2:
        raise DataError(f"{path} has {values.shape[-1]} channels; label maps must have one channel of class indices")
    top = num_classes + int(reduce_zero)  # ADE20K's file values count "other" (0) as well
    present = np.unique(values).astype(np.int64)
    bad = present[((present < 0) | (present >= top)) & (present != IGNORE_INDEX)]
    if bad.size:
        meaning = "0 = other and 1..150 the classes" if reduce_zero else "one per class"
        raise DataError(f"{path} has label value(s) {bad[:10].tolist()} outside 0..{top - 1} ({meaning}) and not "
                        f"255 (ignored); the dataset has {num_classes} classes")
    label = values.astype(np.uint8)
    return reduce_zero_label(label) if reduce_zero else label


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``; a DataError naming it when it cannot be decoded."""
    try:
        return np.array(open_rgb(path))  # writable: torch.from_numpy warns on the read-only arrays PIL gives
    except OSError as err:  # PIL.UnidentifiedImageError and truncated files; open_rgb raises DataError itself
        raise DataError(f"image {path} cannot be read: {err}") from None


# -- transforms (mmseg 0.x's pipeline) --------------------------------------------------------------


def rescale_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: ``(width, height)`` scaled to fit ``scale``'s long and short edges, ratio kept."""
    w, h = size
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` image resized bilinearly to ``size`` = ``(width, height)``, still uint8."""
    w, h = size
    if image.shape[:2] == (h, w):
        return image
    # torch, not PIL: like mmcv's cv2 INTER_LINEAR it samples at pixel centres without antialiasing,
    # where PIL's bilinear filter widens with the downscale factor
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map resized to ``size`` = ``(width, height)`` by nearest neighbour, as cv2's INTER_NEAREST picks."""
    h, w = label.shape
    new_w, new_h = size
    # cv2 takes source pixel floor(x * src / dst); indexing does it exactly on any integer dtype
    rows = np.minimum((np.arange(new_h) * (h / new_h)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(new_w) * (w / new_w)).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def balanced(label: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's crop test: more than one class, and none covering ``cat_max_ratio`` or more (ignored pixels left out)."""
    counts = np.bincount(label.ravel(), minlength=IGNORE_INDEX + 1)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float,
                rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's RandomCrop to ``crop_size`` = ``(h, w)`` (whole sides where smaller); with ``cat_max_ratio`` < 1,
    up to ten more draws while the crop is not :func:`balanced` (the last draw is kept regardless)."""
    ch, cw = crop_size

    def draw() -> tuple[int, int]:
        return rng.randint(0, max(label.shape[0] - ch, 0)), rng.randint(0, max(label.shape[1] - cw, 0))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            if balanced(label[top:top + ch, left:left + cw], cat_max_ratio):
                break
            top, left = draw()
    return image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV as OpenCV stores it: hue in degrees / 2 (0..179), saturation and value 0..255."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, chroma = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    safe = np.maximum(chroma, 1e-6)  # grey pixels get hue 0 below; this only avoids dividing by zero
    hue = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe)) * 60
    hue = np.where(chroma > 0, hue % 360, 0)
    sat = np.where(v > 0, chroma / np.maximum(v, 1) * 255, 0)
    return np.stack([np.rint(hue / 2) % 180, np.rint(sat), v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV as OpenCV stores it (see :func:`rgb_to_hsv`) -> uint8 RGB."""
    sector = hsv[..., 0].astype(np.float32) / 30  # OpenCV's hue is degrees / 2: 30 per 60-degree sector
    s, v = hsv[..., 1].astype(np.float32) / 255, hsv[..., 2].astype(np.float32)
    i = np.floor(sector)
    f, i = sector - i, i.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [np.choose(i, c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return np.clip(np.rint(np.stack(rgb, -1)), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``values * alpha + beta`` clipped to 0..255 and truncated to uint8, as mmseg's ``convert``."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: random.Random, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion of a uint8 RGB image: brightness, contrast (first or last), saturation, hue,
    each with probability 1/2; saturation and hue in OpenCV's uint8 HSV."""
    if rng.random() < 0.5:
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.random() < 0.5

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.random() < 0.5 else img

    if contrast_first:
        image = contrast(image)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv_to_rgb(hsv)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv(image)
        # numpy's randint(-18, 18), which mmseg calls, excludes +18
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randint(-hue_delta, hue_delta - 1)) % 180
        image = hsv_to_rgb(hsv)
    return image if contrast_first else contrast(image)


def normalize(image: np.ndarray) -> torch.Tensor:
    """A uint8 ``(H, W, 3)`` RGB image as a float32 ``(3, H, W)`` tensor normalised with mmseg's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def pad(image: torch.Tensor, label: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and label padded at the bottom and right to ``size`` = ``(h, w)``: image with 0, label with 255 (int64)."""
    h, w = label.shape
    border = (0, max(size[1] - w, 0), 0, max(size[0] - h, 0))
    target = torch.from_numpy(np.ascontiguousarray(label)).long()
    return F.pad(image, border, value=0.0), F.pad(target, border, value=IGNORE_INDEX)


# -- dataset ----------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """One split of a segmentation folder in any of the three layouts (see the module docstring).

    Args:
        root: the data folder.
        split: the split's folder name (``train``/``val`` also found as ``training``/``validation``), or
            the ``<split>`` of a COCO set's ``instances_<split>.json``.
        train: training items (mmseg's random train pipeline); otherwise evaluation items.
        crop_size: ``(h, w)`` of training crops (and of the padded items).
        scale: ``(long, short)`` edges an image is resized to fit (mmseg's ``img_scale``).
        ratio_range: training's random factor on ``scale``; ``None`` for none.
        cat_max_ratio: the largest share one class may cover in a training crop (1 turns the test off).
        hflip: probability of a horizontal flip in training.
        photometric: apply mmseg's PhotoMetricDistortion in training.

    ``repeats`` (attribute, default 1) draws the split that many times per pass (iteration-based
    training: each draw gets its own augmentation seed).
    """

    def __init__(self, root: PathLike, split: str, *, train: bool, crop_size: tuple[int, int] = (512, 512),
                 scale: tuple[int, int] = (2048, 512), ratio_range: Optional[tuple[float, float]] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, hflip: float = 0.5, photometric: bool = True) -> None:
        self.root, self.split, self.train = Path(root).expanduser(), split, train
        self.crop_size, self.scale = tuple(crop_size), tuple(scale)
        self.ratio_range = None if ratio_range is None else tuple(ratio_range)
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.layout = detect_layout(self.root)
        self.reduce_zero_label = self.layout == "ade20k"
        self.coco: Any = None
        if self.layout == "coco":
            self.samples, self.classes = self._coco_samples()
        else:
            self.samples, self.classes = self._folder_samples()
        self.seed: Optional[int] = None  # per-sample augmentation seeds (deterministic mode)
        self.epoch = 0
        self.repeats = 1

    def _folder_samples(self) -> tuple[list[Sample], list[str]]:
        """Pairs and classes of the folder and ADE20K layouts, checked."""
        classes = list(ADE20K_CLASSES) if self.layout == "ade20k" else read_classes(self.root / "classes.txt")
        samples = pair_files(*folder_split(self.root, self.split))
        check_pairs(samples)
        return samples, classes

    def _coco_samples(self) -> tuple[list[Sample], list[str]]:
        """Images and classes of a COCO set, checked."""
        annotations, image_dir = find_split(self.root, self.split)
        self.coco = load_coco(annotations)
        check_coco(self.coco, annotations, image_dir)
        names = [self.coco.cats[c].get("name", str(c)) for c in sorted(self.coco.cats)]
        samples = [Sample(image_dir / info["file_name"], info["id"]) for info in self.coco.dataset["images"]]
        return samples, ["background", *names]

    @property
    def name(self) -> str:
        """``<folder name> <split>`` for messages."""
        return f"{self.root.name} {self.split}"

    @property
    def num_classes(self) -> int:
        """Classes the model predicts (255, ignored, not counted)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as stored: uint8 RGB ``(H, W, 3)`` and its uint8 label map ``(H, W)`` (255 = ignore)."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if isinstance(sample.label, Path):
            return image, read_label(sample.label, self.num_classes, self.reduce_zero_label)
        return image, semantic_map(self.coco, sample.label, *image.shape[:2])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index % len(self.samples))
        if self.train:
            return self.train_transform(image, label, self._rng(index))
        return self.eval_transform(image, label)

    def _rng(self, index: int) -> random.Random:
        """The item's random draws: per (seed, epoch, index) in deterministic mode, else from Python's global
        generator, which torch seeds in every loader worker."""
        if self.seed is None:
            return random.Random(random.getrandbits(64))
        return random.Random((self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**31)

    def _random_scale(self, rng: random.Random) -> tuple[int, int]:
        """``scale`` times a ratio drawn from ``ratio_range``, truncated as mmseg's ``random_sample_ratio``."""
        if self.ratio_range is None:
            return self.scale
        lo, hi = self.ratio_range
        ratio = lo + rng.random() * (hi - lo)
        return int(self.scale[0] * ratio), int(self.scale[1] * ratio)

    def train_transform(self, image: np.ndarray, label: np.ndarray,
                        rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """mmseg's train pipeline: ``(3, crop_h, crop_w)`` float32 image, ``(crop_h, crop_w)`` int64 label."""
        size = rescale_size((image.shape[1], image.shape[0]), self._random_scale(rng))
        image, label = resize_image(image, size), resize_label(label, size)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio, rng)
        if rng.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        return pad(normalize(image), label, self.crop_size)

    def eval_transform(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The image normalised and the label, both at the original size: evaluation resizes the image to the test
        scale(s) itself (mmseg's test Resize, in floating point), so single- and multi-scale tests start alike."""
        return normalize(image), torch.from_numpy(label).long()

    @staticmethod
    def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels stacked; items of different sizes (evaluation) are refused with a DataError."""
        shapes = sorted({(tuple(i.shape[1:]), tuple(t.shape)) for i, t in batch})
        if len(shapes) > 1:
            raise DataError(f"cannot batch segmentation items of different sizes (image, label): {shapes[:3]}; "
                            "evaluate with batch size 1, as mmsegmentation does")
        images, labels = zip(*batch)
        return torch.stack(images), torch.stack(labels)
