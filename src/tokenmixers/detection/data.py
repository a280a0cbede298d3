"""COCO-format instance data for detection, checked before training starts.

A data folder holds, per split, an annotation file and the images it names:

* ``root/instances_<split>.json`` or ``root/annotations/instances_<split>[2017].json``;
* images under ``root/images/``, ``root/<split>/`` or ``root/<split>2017/`` (``file_name`` relative
  to it).

Masks may be polygons or RLE (compressed or not); a set whose annotations carry no
``segmentation`` is box-only (Faster R-CNN, bbox AP). Categories are mapped to contiguous labels
1..K in the order of their ids (0 is background) and mapped back at evaluation.

Checked when the dataset is built, each with a :class:`DataError` naming the file: a missing
annotation file, images that do not exist, category ids outside ``categories``, boxes with negative
width or height. As mmdetection 2.x's ``CocoDataset``: crowd regions and degenerate boxes (no area
inside the image, width or height below one pixel, or no area) are left out of the targets and
counted, boxes are not clipped to the image, and in training only images without any annotation
(or under 32 px) are left out: an image with only crowd regions or degenerate boxes trains as a
picture of background. An image that cannot be decoded is skipped and counted (:meth:`collate`).

Each item is ``(image, target)``: the image as a ``(3, H, W)`` float tensor in [0, 1] at its own
size (the detector resizes it to 1333x800 and pads to 32), the target with ``boxes`` (xyxy,
pixels), ``labels``, ``masks`` ``(N, H, W)`` uint8 (when the set has masks) and ``image_id``.
Training items are flipped horizontally with probability ``hflip``.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..coco import find_split, load_coco, quiet_pycocotools
from ..data import DataError, open_rgb

PathLike = Union[str, Path]


class CocoDetection(Dataset):
    """One split of a COCO-format instance dataset (see the module docstring).

    Args:
        root: the data folder.
        split: ``train``, ``val`` or any split with an annotation file.
        train: training items (images without annotations or under 32 px left out, random flips);
            otherwise every image of the split, in file order.
        hflip: flip probability in training.
        crop_branch: in training, half the images take the crop policy of mmdet's Swin 3x recipe
            (:func:`crop_policy`) after the flip.
    """

    def __init__(self, root: PathLike, split: str, *, train: bool = False, hflip: float = 0.5,
                 crop_branch: bool = False) -> None:
        self.root, self.split, self.train, self.hflip = Path(root).expanduser(), split, train, hflip
        self.crop_branch = crop_branch
        self.annotation_file, self.image_dir = find_split(self.root, split)
        self.coco = load_coco(self.annotation_file)
        self.category_ids = sorted(self.coco.cats)
        self.categories = [self.coco.cats[c].get("name", str(c)) for c in self.category_ids]
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.dropped = {"crowd boxes": 0, "degenerate boxes": 0, "images without annotations": 0}
        self._check()
        annotations = [a for a in self.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
        self.has_masks = bool(annotations) and all(a.get("segmentation") for a in annotations)
        ids = [img["id"] for img in self.coco.dataset["images"]]
        self.targets = {i: self._target(i) for i in ids}
        if train:  # mmdet's _filter_imgs: any annotation of a known category (crowd too), both sides >= 32 px
            kept = [i for i in ids if self.coco.imgToAnns.get(i) and min(self.coco.imgs[i]["width"],
                                                                         self.coco.imgs[i]["height"]) >= 32]
            self.dropped["images without annotations"] = len(ids) - len(kept)
            ids = kept
        self.image_ids = ids
        self.seed: Optional[int] = None  # per-sample flip seeds (deterministic mode)
        self.epoch = 0

    @property
    def name(self) -> str:
        """``<folder>:<split>`` for messages."""
        return f"{self.root}:{self.split}"

    @property
    def group_flags(self) -> Optional[list[int]]:
        """Training: 1 for a landscape image, 0 otherwise, so batches hold one aspect (mmdet's ``GroupSampler``)."""
        if not self.train:
            return None
        return [int(self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] > 1) for i in self.image_ids]

    @property
    def num_classes(self) -> int:
        """Object classes (background not counted)."""
        return len(self.category_ids)

    def _check(self) -> None:
        """The problems that stop a run before it starts (:class:`DataError` naming the file)."""
        where = self.annotation_file
        images = self.coco.dataset["images"]
        if not self.category_ids:
            raise DataError(f"{where} defines no categories")
        absent = [img["file_name"] for img in images if not (self.image_dir / img["file_name"]).is_file()]
        if absent:
            raise DataError(f"{where} names {len(absent)} image(s) missing from {self.image_dir}, e.g. {absent[:3]}")
        image_ids = {img["id"] for img in images}
        for ann in self.coco.dataset["annotations"]:
            if ann.get("category_id") not in self.label_of:
                raise DataError(f"{where}: annotation {ann.get('id')} has category_id {ann.get('category_id')}, not "
                                f"among the categories {self.category_ids}")
            if ann.get("image_id") not in image_ids:
                raise DataError(f"{where}: annotation {ann.get('id')} names image_id {ann.get('image_id')}, "
                                "which is not in 'images'")
            box = ann.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4):
                raise DataError(f"{where}: annotation {ann.get('id')} has no [x, y, width, height] bbox (got {box!r})")
            if box[2] < 0 or box[3] < 0:
                raise DataError(f"{where}: annotation {ann.get('id')} has a box of negative size {box} "
                                "([x, y, width, height] expected)")
            polygons = ann.get("segmentation")
            if isinstance(polygons, list):  # polygons; a dict is RLE, checked by pycocotools
                bad = [p for p in polygons if not (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0)]
                if bad:
                    raise DataError(f"{where}: annotation {ann.get('id')} has a polygon that is not a list of at "
                                    f"least 3 x, y points: {str(bad[0])[:80]}; fix or remove it")

    def _target(self, image_id: int) -> dict[str, Any]:
        """Boxes, labels and annotations kept for training targets (mmdet's ``_parse_ann_info``: boxes not clipped)."""
        info = self.coco.imgs[image_id]
        boxes, labels, anns = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            inside = max(0.0, min(x + w, info["width"]) - max(x, 0.0)) * max(0.0, min(y + h, info["height"]) - max(y, 0.0))
            if ann.get("iscrowd", 0):
                self.dropped["crowd boxes"] += 1
            elif inside == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                self.dropped["degenerate boxes"] += 1
            else:
                boxes.append([x, y, x + w, y + h])
                labels.append(self.label_of[ann["category_id"]])
                anns.append(ann)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "anns": anns}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        image_id = self.image_ids[index]
        try:
            array = np.asarray(open_rgb(self.image_path(index)))
        except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
            warnings.warn(f"skipping unreadable image {self.image_path(index)}: {err}", stacklevel=2)
            return None
        info = self.coco.imgs[image_id]
        if array.shape[:2] != (info["height"], info["width"]):
            warnings.warn(f"skipping {self.image_path(index)}: it is {array.shape[1]}x{array.shape[0]} but the "
                          f"annotations say {info['width']}x{info['height']}", stacklevel=2)
            return None
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
        stored = self.targets[image_id]
        target = {"boxes": stored["boxes"].clone(), "labels": stored["labels"].clone(),
                  "image_id": torch.tensor(image_id)}
        if self.has_masks:
            with quiet_pycocotools():
                masks = [self.coco.annToMask(a) for a in stored["anns"]]
            h, w = image.shape[1:]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.train:
            rng = self._rng(index)
            if rng.random() < self.hflip:
                image, target = flip(image, target)
            if self.crop_branch and rng.random() < 0.5:  # AutoAugment: one of two policies, uniformly
                image, target = crop_policy(image, target, rng)
        return image, target

    def _rng(self, index: int) -> random.Random:
        """The item's random draws: per (seed, epoch, index) in deterministic mode, else from the global generator."""
        if self.seed is None:
            return random.Random(random.getrandbits(64))
        return random.Random((self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**31)

    @staticmethod
    def collate(batch: Sequence[Optional[tuple[torch.Tensor, dict]]]) -> tuple[list[torch.Tensor], list[dict], int]:
        """The readable items as lists (images differ in size); also how many were skipped."""
        good = [b for b in batch if b is not None]
        return [b[0] for b in good], [b[1] for b in good], len(batch) - len(good)


def flip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Horizontal flip of an image and its boxes and masks."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    out = {**target, "boxes": boxes}
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


def rescale_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """mmcv's keep-ratio size: the largest that fits ``short`` x ``long``, each side rounded to nearest.

    (torchvision rounds down: a 640x480 image becomes 1066x800 there, 1067x800 in mmdet.)
    """
    factor = min(short / min(height, width), long / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def crop_policy(image: torch.Tensor, target: dict[str, torch.Tensor], rng: random.Random,
                shorter: Sequence[int] = (400, 500, 600), crop: tuple[int, int] = (384, 600),
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The second AutoAugment policy of mmdet's Swin ``ms-crop-3x`` recipe, before its final multi-scale resize.

    Resize keeping the ratio to a shorter side of 400, 500 or 600 (longer side at most 1333), then
    ``RandomCrop(crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True)``: each
    side 384-600 px (at most the image's), at a random offset; boxes shifted and clipped into the
    crop, those left without area dropped with their labels and masks (an image may end up empty).
    """
    h, w = image.shape[1:]
    size = rescale_size(h, w, rng.choice(list(shorter)), 1333)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    boxes = target["boxes"] * torch.tensor([size[1] / w, size[0] / h] * 2)
    masks = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte() if "masks" in target else None
    ch, cw = (rng.randint(min(n, crop[0]), min(n, crop[1])) for n in size)
    y0, x0 = rng.randint(0, size[0] - ch), rng.randint(0, size[1] - cw)
    boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}
    if masks is not None:
        out["masks"] = masks[keep][:, y0: y0 + ch, x0: x0 + cw]
    return image[:, y0: y0 + ch, x0: x0 + cw], out
