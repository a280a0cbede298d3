"""COCO with pycocotools: finding and reading a COCO-format folder, detections as result records, AP of records
against a ground truth.

Shared by detection, segmentation (COCO instance sets as semantic maps) and the analyses (scale
invariance); it knows no model.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import DataError

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def quiet_pycocotools() -> Iterator[None]:
    """Silence pycocotools' prints and its NumPy 2 deprecation warning (``__array__`` without ``copy``)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        yield


def find_split(root: Path, split: str) -> tuple[Path, Path]:
    """The annotation file and image folder of a COCO-format folder's split, or a DataError listing where it looked.

    ``root/instances_<split>.json`` or ``root/annotations/instances_<split>[2017].json``; images under
    ``root/images/``, ``root/<split>/`` or ``root/<split>2017/``.
    """
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    candidates = [root / f"instances_{split}.json", root / "annotations" / f"instances_{split}.json",
                  root / "annotations" / f"instances_{split}2017.json"]
    annotations = next((p for p in candidates if p.is_file()), None)
    if annotations is None:
        raise DataError(f"{root} has no annotation file for the {split!r} split; looked for "
                        + ", ".join(str(p) for p in candidates))
    folders = [root / "images", root / split, root / f"{split}2017"]
    images = next((p for p in folders if p.is_dir()), None)
    if images is None:
        raise DataError(f"{root} has no image folder for the {split!r} split; looked for "
                        + ", ".join(str(p) for p in folders))
    return annotations, images


def load_coco(annotations: Path) -> Any:
    """A pycocotools ``COCO`` index of an annotation file (its index messages silenced)."""
    try:
        data = json.loads(annotations.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{annotations} is not a readable COCO annotation file: {err}") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing or not isinstance(data.get("images"), list):
        raise DataError(f"{annotations} lacks the COCO key(s) {missing or ['images']} (instances format expected)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_records(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
               masks: bool = True) -> tuple[list[dict], list[dict]]:
    """One image's detections as COCO result records: bbox (xywh) and, with masks, segm (RLE)."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    common = [{"image_id": image_id, "category_id": category_ids[int(label) - 1], "score": float(score)}
              for label, score in zip(output["labels"].tolist(), output["scores"].tolist())]
    bbox = [{**c, "bbox": b} for c, b in zip(common, xywh)]
    segm = []
    if masks and "masks" in output:
        for c, m in zip(common, output["masks"][:, 0].cpu().numpy()):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            segm.append({**c, "segmentation": rle})
    return bbox, segm


def coco_ap(coco_gt: Any, records: list[dict], iou_type: str, image_ids: Sequence[int]) -> dict[str, Optional[float]]:
    """AP, AP50, AP75, APs, APm, APl (in %) of result records over ``image_ids`` (None: no such objects)."""
    if not records:
        return {k: 0.0 for k in METRICS}
    with quiet_pycocotools():
        coco_dt = coco_gt.loadRes(copy.deepcopy(records))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (100 * float(v) if v >= 0 else None) for k, v in zip(METRICS, evaluator.stats[:6])}


def countable_objects(coco_gt: Any, image_ids: Sequence[int]) -> int:
    """Ground-truth objects AP can count on these images (crowd regions are ignored, not counted)."""
    ids = set(image_ids)
    return sum(1 for a in coco_gt.dataset["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0))


def reference_coco(coco_gt: Any, records: list[dict], min_score: float) -> Any:
    """A COCO ground truth made of detections (score >= ``min_score``) on the images of ``coco_gt``."""
    annotations = [
        {"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
         "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
        for i, r in enumerate(r for r in records if r["score"] >= min_score)
    ]
    coco = COCO()
    coco.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                    "annotations": annotations}
    with quiet_pycocotools():
        coco.createIndex()
    return coco


__all__ = ["METRICS", "quiet_pycocotools", "to_records", "coco_ap", "countable_objects", "reference_coco"]
