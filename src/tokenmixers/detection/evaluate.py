"""COCO AP of a detector (bbox, segm; pycocotools) and scale invariance by box consistency.

Evaluation runs the detector on every image of a split once — under torchrun each process takes
every world-th image and the predictions are gathered — and scores them with pycocotools'
``COCOeval`` against the annotation file, category ids mapped back from the contiguous labels.
Box-only data reports bbox AP only.

Scale invariance (the paper's Fig. 7, third row): every image is run at its standard test scale
(shorter side 800, longer at most 1333) and at ``factor`` times it for factors 0.25, 0.5, ..., 3.0;
the boxes come back at the original resolution (the detector maps them), and are scored by box mAP
against the boxes the same detector predicts at the standard scale ("box consistency"; predictions
scoring at least ``reference_score`` serve as ground truth) and against the real ground truth.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import ShardSampler
from ..distributed import DistInfo, init_distributed
from .data import CocoDetection, quiet_pycocotools

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FACTORS = tuple(0.25 * i for i in range(1, 13))


def to_records(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
               masks: bool = True) -> tuple[list[dict], list[dict]]:
    """One image's detections as COCO result records: bbox (xywh) and, with masks, segm (RLE)."""
    from pycocotools import mask as mask_util

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
    from pycocotools.cocoeval import COCOeval

    if not records:
        return {k: 0.0 for k in METRICS}
    with contextlib.redirect_stdout(io.StringIO()), quiet_pycocotools():
        coco_dt = coco_gt.loadRes(copy.deepcopy(records))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (100 * float(v) if v >= 0 else None) for k, v in zip(METRICS, evaluator.stats[:6])}


def _gather(items: list, info: DistInfo) -> list:
    """Every process's list, concatenated in rank order (a no-op on one process)."""
    if not info.distributed:
        return items
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def _autocast(device: torch.device, precision: str) -> Any:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


@torch.no_grad()
def predict_dataset(
    detector: torch.nn.Module, dataset: CocoDetection, info: DistInfo, *, batch_size: int = 2, workers: int = 2,
    precision: str = "fp32", progress: bool = False,
) -> tuple[list[dict], list[dict], int, int]:
    """This process's share of the images -> gathered (bbox records, segm records, images run, images skipped)."""
    from tqdm import tqdm

    was_training = detector.training
    detector.eval()
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=CocoDetection.collate)
    bbox, segm, seen, skipped = [], [], 0, 0
    for images, targets, n_skipped in tqdm(loader, desc="evaluating", disable=not (progress and info.primary),
                                           leave=False, dynamic_ncols=True):
        skipped += n_skipped
        if not images:
            continue
        with _autocast(info.device, precision):
            outputs = detector([im.to(info.device) for im in images])
        for output, target in zip(outputs, targets):
            b, s = to_records(output, int(target["image_id"]), dataset.category_ids, masks=dataset.has_masks)
            bbox += b
            segm += s
        seen += len(images)
    detector.train(was_training)
    counts = _gather([(seen, skipped)], info)
    return _gather(bbox, info), _gather(segm, info), sum(c[0] for c in counts), sum(c[1] for c in counts)


def evaluate_detector(
    detector: torch.nn.Module, dataset: CocoDetection, info: Optional[DistInfo] = None, *, batch_size: int = 2,
    workers: int = 2, precision: str = "fp32", progress: bool = False,
) -> dict[str, Any]:
    """bbox (and, with masks, segm) AP of a detector on a split; every image counted once under torchrun."""
    info = info or init_distributed("cpu")
    bbox, segm, seen, skipped = predict_dataset(detector, dataset, info, batch_size=batch_size, workers=workers,
                                                precision=precision, progress=progress)
    result: dict[str, Any] = {"images": seen, "skipped_images": skipped}
    if info.primary:
        ids = dataset.image_ids
        result["bbox"] = coco_ap(dataset.coco, bbox, "bbox", ids)
        if dataset.has_masks and getattr(detector.roi_heads, "has_mask", lambda: False)():
            result["segm"] = coco_ap(dataset.coco, segm, "segm", ids)
    if info.distributed:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result


# -- scale invariance ------------------------------------------------------------------------------------


def reference_coco(dataset: CocoDetection, records: list[dict], min_score: float) -> Any:
    """A COCO ground truth made of a detector's own predictions (score >= ``min_score``)."""
    from pycocotools.coco import COCO

    annotations = [
        {"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
         "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
        for i, r in enumerate(r for r in records if r["score"] >= min_score)
    ]
    coco = COCO()
    coco.dataset = {"images": dataset.coco.dataset["images"], "categories": dataset.coco.dataset["categories"],
                    "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def scale_invariance(
    detector: torch.nn.Module, dataset: CocoDetection, factors: Sequence[float] = FACTORS, *,
    info: Optional[DistInfo] = None, base_size: tuple[int, int] = (800, 1333), reference_score: float = 0.5,
    batch_size: int = 1, workers: int = 2, precision: str = "fp32", progress: bool = False,
) -> list[dict[str, Any]]:
    """Box consistency and box mAP at each scale factor (one row per factor; see the module docstring)."""
    info = info or init_distributed("cpu")
    short, long = base_size
    saved = detector.transform.min_size, detector.transform.max_size

    def run(factor: float) -> list[dict]:
        detector.set_test_scale(max(round(short * factor), 1), max(round(long * factor), 1))
        return predict_dataset(detector, dataset, info, batch_size=batch_size, workers=workers, precision=precision,
                               progress=progress)[0]

    try:
        at_base = run(1.0)
        reference = reference_coco(dataset, at_base, reference_score)
        rows = []
        for factor in factors:
            records = at_base if factor == 1.0 else run(factor)
            rows.append({
                "factor": factor,
                "consistency": coco_ap(reference, records, "bbox", dataset.image_ids)["AP"],
                "mAP": coco_ap(dataset.coco, records, "bbox", dataset.image_ids)["AP"],
                "reference_boxes": len(reference.anns), "boxes": len(records),
            })
    finally:
        detector.transform.min_size, detector.transform.max_size = saved
    return rows


def plot_scale_invariance(results: dict[str, list[dict[str, Any]]], path: Union[str, Path]) -> Path:
    """Box consistency and box mAP vs scale factor, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, title in ((axes[0], "consistency", "box consistency"), (axes[1], "mAP", "box mAP")):
        for model, rows in results.items():
            ax.plot([r["factor"] for r in rows], [r[metric] for r in rows], marker=".", label=model.removeprefix("unified_"))
        ax.set(xlabel="scale factor", ylabel=f"{title} (%)", title=title)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_scale_invariance(results: dict[str, list[dict[str, Any]]], out: Union[str, Path]) -> list[Path]:
    """``scale_invariance.json`` / ``.csv`` (one row per model and factor) and ``scale_invariance.png``."""
    from ..files import atomic_write_csv, atomic_write_text

    out = Path(out)
    flat = [{"model": model, **row} for model, rows in results.items() for row in rows]
    return [atomic_write_text(out / "scale_invariance.json", json.dumps(flat, indent=2) + "\n"),
            atomic_write_csv(out / "scale_invariance.csv", flat),
            plot_scale_invariance(results, out / "scale_invariance.png")]


# -- from checkpoints ----------------------------------------------------------------------------------


def _detector_for(checkpoint: Optional[str], model: Optional[str], dataset: CocoDetection, **kwargs: Any) -> Any:
    """A detector from a checkpoint (ours or mmdet's), or with random weights when there is none."""
    from .detector import create_detector, load_detector

    if checkpoint is None:
        if model is None:
            raise ValueError("give a checkpoint or a model name")
        return create_detector(model, dataset.num_classes, masks=dataset.has_masks, **kwargs)
    detector, report = load_detector(checkpoint, model, dataset.num_classes, **kwargs)
    return detector


def evaluate_checkpoint(
    checkpoint: str, data: str, *, model: Optional[str] = None, split: str = "val", batch_size: int = 2,
    device: str = "auto", precision: str = "fp32", workers: int = 2, limit: Optional[int] = None, **kwargs: Any,
) -> dict[str, Any]:
    """bbox / segm AP of a detection checkpoint (ours, or mmdet's with ``model``) on a split; torchrun-aware."""
    info = init_distributed(device)
    dataset = CocoDetection(data, split)
    if limit:
        dataset.image_ids = dataset.image_ids[:limit]
    detector = _detector_for(checkpoint, model, dataset, **kwargs).to(info.device)
    return evaluate_detector(detector, dataset, info, batch_size=batch_size, workers=workers, precision=precision,
                             progress=True)


def run_scale_invariance(
    models: Sequence[str], data: str, checkpoints: Optional[Sequence[Optional[str]]] = None, *, split: str = "val",
    limit: Optional[int] = None, factors: Sequence[float] = FACTORS, base_size: tuple[int, int] = (800, 1333),
    reference_score: float = 0.5, device: str = "auto", workers: int = 2, out: Union[str, Path, None] = None,
) -> dict[str, list[dict[str, Any]]]:
    """Scale invariance of several detectors on one split (torchrun shards the images); writes JSON/CSV/plot to ``out``."""
    info = init_distributed(device)
    dataset = CocoDetection(data, split)
    if limit:
        dataset.image_ids = dataset.image_ids[:limit]
    results = {}
    for name, checkpoint in zip(models, checkpoints or [None] * len(models)):
        detector = _detector_for(checkpoint, name, dataset).to(info.device)
        results[name] = scale_invariance(detector, dataset, factors, info=info, base_size=base_size,
                                         reference_score=reference_score, workers=workers, progress=True)
    if out is not None and info.primary:
        write_scale_invariance(results, out)
    return results
