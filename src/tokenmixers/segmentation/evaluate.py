"""Segmentation evaluation as mmsegmentation's: test-time resizing, whole or sliding-window inference, mIoU.

* :class:`Predictor` wraps a segmentor for evaluation: the original image is resized to fit the test
  scale (keep ratio; times each ratio for multi-scale), decoded whole or in sliding windows, the
  logits resized back to the original size, softmaxed, averaged over scales and flips.
* :func:`intersect_and_union` / :func:`summarize`: per-class areas accumulated over the whole set
  (not averaged per image), then aAcc, IoU and Acc per class, and mIoU / mAcc over the classes that
  occur (in the ground truth or the prediction for IoU, in the ground truth for Acc); percentages.
* :func:`evaluate_segmentor`: the set through the run engine's one evaluation loop, every image once
  under torchrun (areas summed over the processes).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import DataError
from ..distributed import DistInfo, all_reduce_sum, init_distributed
from ..runs import eval_loader, predictions
from .data import IGNORE_INDEX, SegmentationDataset, rescale_size
from .heads import resize
from .segmentor import load_segmentor

MODES = ("whole", "slide")
MULTI_SCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's aug-test ratios


class Predictor(nn.Module):
    """A segmentor at test time: ``(1, 3, H, W)`` original image -> class probabilities ``(1, K, H, W)``.

    Args:
        model: the segmentor (logits at its input size).
        scale: the test scale ``(long edge, short edge)``, mmseg's ``img_scale`` (2048, 512).
        ratios: scale ratios (``(1.0,)`` single-scale; :data:`MULTI_SCALE` for mmseg's aug test).
        flip: also decode the mirrored image and average.
        mode: ``"whole"`` (the resized image at once) or ``"slide"`` (``crop`` windows every ``stride``).
    """

    def __init__(self, model: nn.Module, scale: Sequence[int] = (2048, 512), ratios: Sequence[float] = (1.0,),
                 flip: bool = False, mode: str = "whole", crop: Sequence[int] = (512, 512),
                 stride: Sequence[int] = (341, 341)) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown inference mode {mode!r}; accepted: {', '.join(MODES)}")
        self.model, self.scale, self.ratios, self.flip, self.mode = model, tuple(scale), tuple(ratios), flip, mode
        self.crop, self.stride = tuple(crop), tuple(stride)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits at the image's own size, whole or by sliding windows (mmseg's ``slide_inference``)."""
        if self.mode == "whole":
            return self.model(image)
        (h, w), (ch, cw), (sh, sw) = image.shape[2:], self.crop, self.stride
        rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
        total = count = None
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
                y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
                out = self.model(image[:, :, y1:y2, x1:x2])
                if total is None:
                    total = out.new_zeros(out.shape[0], out.shape[1], h, w)
                    count = out.new_zeros(1, 1, h, w)
                total[:, :, y1:y2, x1:x2] += out
                count[:, :, y1:y2, x1:x2] += 1
        return total / count

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities at the original size, averaged over the ratios (and flips)."""
        size = image.shape[2:]
        probs = None
        for ratio in self.ratios:
            width, height = rescale_size((size[1], size[0]), (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
            resized = resize(image, (height, width)) if (height, width) != tuple(size) else image
            for flipped in (False, True) if self.flip else (False,):
                x = resized.flip(3) if flipped else resized
                logits = resize(self.logits(x), size)
                p = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)  # fp16/bf16 up
                p = p.flip(3) if flipped else p
                probs = p if probs is None else probs + p
        return probs / (len(self.ratios) * (2 if self.flip else 1))


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(4, K)`` float64 areas of one image: intersection, union, prediction, ground truth (ignored pixels out)."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    hit = pred[pred == label]
    area = [torch.bincount(t, minlength=num_classes)[:num_classes].double() for t in (hit, pred, label)]
    return torch.stack([area[0], area[1] + area[2] - area[0], area[1], area[2]])


def summarize(areas: torch.Tensor, classes: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """mmseg's summary of accumulated areas: ``aAcc``, ``mIoU``, ``mAcc`` and per-class IoU / Acc, in percent."""
    intersect, union, _, label = areas.double()
    iou = intersect / union  # 0/0 = nan: a class in neither the ground truth nor the prediction
    acc = intersect / label
    names = list(classes) if classes else [str(i) for i in range(len(iou))]

    def mean(t: torch.Tensor) -> Optional[float]:
        kept = t[~t.isnan()]
        return round(100 * float(kept.mean()), 2) if len(kept) else None

    per_class = {n: {"IoU": None if math.isnan(i) else round(100 * i, 2), "Acc": None if math.isnan(a) else round(100 * a, 2)}
                 for n, i, a in zip(names, iou.tolist(), acc.tolist())}
    total = float(label.sum())
    return {"aAcc": round(100 * float(intersect.sum()) / total, 2) if total else None, "mIoU": mean(iou),
            "mAcc": mean(acc), "classes": per_class}


def evaluate_segmentor(model: nn.Module, dataset: Dataset, info: DistInfo, *, num_classes: int,
                       classes: Optional[Sequence[str]] = None, scale: Sequence[int] = (2048, 512),
                       ratios: Sequence[float] = (1.0,), flip: bool = False, mode: str = "whole",
                       crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341), workers: int = 0,
                       precision: str = "fp32", ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """mIoU / mAcc / aAcc of a segmentor on a dataset of ``(original image, original label)`` items."""
    tester = Predictor(model, scale, ratios, flip, mode, crop, stride)
    areas = torch.zeros(4, num_classes, dtype=torch.float64)
    images = 0
    for probs, labels, _ in predictions(tester, eval_loader(dataset, 1, workers, info), info, precision):
        if probs is None:
            continue
        pred = probs.argmax(1).cpu()
        for p, label in zip(pred, labels):
            areas += intersect_and_union(p, label, num_classes, ignore_index)
            images += 1
    areas = all_reduce_sum(areas.to(info.device)).cpu()
    count = int(all_reduce_sum(torch.tensor(images, device=info.device)).item())
    return {**summarize(areas, classes), "images": count}


def evaluate_checkpoint(
    checkpoint: str, data: str, *, model: Optional[str] = None, split: str = "val", mode: Optional[str] = None,
    multi_scale: bool = False, scale: Optional[Sequence[int]] = None, device: str = "auto", precision: str = "fp32",
    workers: int = 2, limit: Optional[int] = None,
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc of a segmentation checkpoint (ours, or mmseg's with ``model``) on a split; torchrun-aware.

    The test scale and mode are the ones given, else the checkpoint's run's, else mmseg's (2048, 512),
    whole-image; ``multi_scale`` adds mmseg's aug test (ratios 0.5-1.75, flips).
    """
    info = init_distributed(device)
    segmentor, report = load_segmentor(checkpoint, model)
    scale = tuple(scale or segmentor.config.get("scale") or (2048, 512))
    mode = mode or segmentor.config.get("test_mode") or "whole"
    dataset: Union[SegmentationDataset, torch.utils.data.Subset] = SegmentationDataset(data, split, train=False,
                                                                                          scale=scale)
    classes = dataset.classes
    saved = segmentor.config.get("classes")
    if dataset.num_classes != segmentor.num_classes or (saved and list(saved) != list(classes)):
        theirs = f" ({', '.join(saved[:4])}, ...)" if saved else ""
        raise DataError(f"{checkpoint} predicts {segmentor.num_classes} classes{theirs}, but {dataset.name} has "
                        f"{dataset.num_classes} ({', '.join(classes[:4])}, ...); evaluate it on the data it was trained for")
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    result = evaluate_segmentor(segmentor.to(info.device), dataset, info, num_classes=segmentor.num_classes,
                                classes=classes, scale=scale, ratios=MULTI_SCALE if multi_scale else (1.0,),
                                flip=multi_scale, mode=mode, workers=workers, precision=precision)
    return {**result, "scale": list(scale), "mode": mode, "multi_scale": multi_scale, "loaded": str(report)}
