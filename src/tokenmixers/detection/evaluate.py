"""COCO AP of a detector (bbox, segm; pycocotools), from a model or a checkpoint, and its scale invariance.

Evaluation runs the detector on every image of a split once — under torchrun each process takes
every world-th image and the predictions are gathered — and scores them with pycocotools'
``COCOeval`` against the annotation file, category ids mapped back from the contiguous labels.
Box-only data reports bbox AP only. A split whose every object is a crowd region has nothing AP can
count: the result says so (``note``) instead of reporting numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..analysis.scale_invariance import FACTORS, scale_invariance, write_scale_invariance
from ..checkpoint import Checkpoint, read_checkpoint
from ..coco import coco_ap, countable_objects, to_records
from ..distributed import DistInfo, init_distributed
from ..runs import eval_loader, predictions
from .data import CocoDetection
from .detector import Detector, create_detector, load_detector
from .retinanet import holds_retinanet, load_retinanet


def _gather(items: list, info: DistInfo) -> list:
    """Every process's list, concatenated in rank order (a no-op on one process)."""
    if not info.distributed:
        return items
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def predict_dataset(
    detector: torch.nn.Module, dataset: CocoDetection, info: DistInfo, *, batch_size: int = 1, workers: int = 2,
    precision: str = "fp32",
) -> tuple[list[dict], list[dict], int, int]:
    """This process's share of the images -> gathered (bbox records, segm records, images run, images skipped)."""
    bbox, segm, seen, skipped = [], [], 0, 0
    for outputs, targets, n_skipped in predictions(detector, eval_loader(dataset, batch_size, workers, info), info,
                                                   precision):
        skipped += n_skipped
        if outputs is None:
            continue
        for output, target in zip(outputs, targets):
            b, s = to_records(output, int(target["image_id"]), dataset.category_ids,
                              masks=dataset.has_masks and "masks" in output)
            bbox += b
            segm += s
        seen += len(outputs)
    counts = _gather([(seen, skipped)], info)
    return _gather(bbox, info), _gather(segm, info), sum(c[0] for c in counts), sum(c[1] for c in counts)


def evaluate_detector(
    detector: torch.nn.Module, dataset: CocoDetection, info: Optional[DistInfo] = None, *, batch_size: int = 1,
    workers: int = 2, precision: str = "fp32",
) -> dict[str, Any]:
    """bbox (and, with masks, segm) AP of a detector on a split; every image counted once under torchrun."""
    info = info or init_distributed("cpu")
    bbox, segm, seen, skipped = predict_dataset(detector, dataset, info, batch_size=batch_size, workers=workers,
                                                precision=precision)
    result: dict[str, Any] = {"images": seen, "skipped_images": skipped}
    if not countable_objects(dataset.coco, dataset.image_ids):
        result["note"] = (f"{dataset.annotation_file}: the {len(dataset.image_ids)} evaluated image(s) have no "
                          "objects AP can count (every annotation is a crowd region, or there are none); no AP")
        return result
    if info.primary:
        ids = dataset.image_ids
        result["bbox"] = coco_ap(dataset.coco, bbox, "bbox", ids)
        if dataset.has_masks and getattr(getattr(detector, "roi_heads", None), "has_mask", lambda: False)():
            result["segm"] = coco_ap(dataset.coco, segm, "segm", ids)
    if info.distributed:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result


def saved_test_scale(checkpoint: Checkpoint) -> tuple[Optional[int], Optional[int]]:
    """The (shorter side, longer side cap) a checkpoint's run evaluated at; None where it does not say."""
    run, config = checkpoint.run, checkpoint.model_config
    short = run.get("test_size") or (config.get("min_size") or [None])[-1]
    return short, run.get("max_size") or config.get("max_size")


def _detector_for(checkpoint: Optional[Checkpoint], model: Optional[str], dataset: CocoDetection,
                  **kwargs: Any) -> Detector:
    """A detector from a checkpoint (ours or mmdet's), or with random weights when there is none."""
    if checkpoint is None:
        if model is None:
            raise ValueError("give a checkpoint or a model name")
        return create_detector(model, dataset.num_classes, masks=dataset.has_masks, **kwargs)
    if holds_retinanet(checkpoint):
        return load_retinanet(checkpoint, model, dataset.num_classes, **kwargs)[0]
    return load_detector(checkpoint, model, dataset.num_classes, **kwargs)[0]


def evaluate_checkpoint(
    checkpoint: str, data: str, *, model: Optional[str] = None, split: str = "val", batch_size: int = 1,
    device: str = "auto", precision: str = "fp32", workers: int = 2, limit: Optional[int] = None,
    min_size: Optional[int] = None, max_size: Optional[int] = None,
) -> dict[str, Any]:
    """bbox / segm AP of a detection checkpoint (ours, or mmdet's with ``model``) on a split; torchrun-aware.

    The test scale is ``min_size`` x ``max_size`` when given, else the one the checkpoint's run used,
    else mmdetection's 800 x 1333; the result says which (``test_scale``, ``test_scale_from``).
    """
    info = init_distributed(device)
    dataset = CocoDetection(data, split)
    if limit:
        dataset.image_ids = dataset.image_ids[:limit]
    read = read_checkpoint(checkpoint)
    saved_short, saved_long = saved_test_scale(read)
    short, long, source = min_size, max_size, "given"
    if short is None:
        short, source = (saved_short, "checkpoint") if saved_short else (800, "default")
    if long is None:
        long = saved_long or 1333
    detector = _detector_for(read, model, dataset).to(info.device)
    detector.set_test_scale(short, long)
    result = evaluate_detector(detector, dataset, info, batch_size=batch_size, workers=workers, precision=precision)
    return {**result, "test_scale": [short, long], "test_scale_from": source}


def run_scale_invariance(
    models: Sequence[str], data: str, checkpoints: Optional[Sequence[Optional[str]]] = None, *, split: str = "val",
    limit: Optional[int] = None, factors: Sequence[float] = FACTORS, base_size: Optional[tuple[int, int]] = None,
    reference_score: float = 0.5, device: str = "auto", workers: int = 2, out: Union[str, Path, None] = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, tuple[int, int]]]:
    """Scale invariance of several detectors on one split (torchrun shards the images); JSON/CSV/table/plot to ``out``.

    Each detector's standard scale is ``base_size`` (shorter side, longer side cap) when given, else
    the test scale its checkpoint's run used, else 800 x 1333. Returns the rows and the scales used.
    """
    info = init_distributed(device)
    dataset = CocoDetection(data, split)
    if limit:
        dataset.image_ids = dataset.image_ids[:limit]
    results, scales = {}, {}
    for name, path in zip(models, checkpoints or [None] * len(models)):
        read = read_checkpoint(path) if path is not None else None
        saved = saved_test_scale(read) if read is not None else (None, None)
        short, long = base_size or (saved[0] or 800, saved[1] or 1333)
        detector = _detector_for(read, name, dataset).to(info.device)

        def predict(factor: float, detector: Detector = detector, short: int = short, long: int = long) -> list[dict]:
            detector.set_test_scale(max(round(short * factor), 1), max(round(long * factor), 1))
            return predict_dataset(detector, dataset, info, batch_size=1, workers=workers)[0]

        results[name] = scale_invariance(predict, dataset.coco, dataset.image_ids, factors, reference_score)
        scales[name] = (short, long)
    if out is not None and info.primary:
        write_scale_invariance(results, out)
    return results, scales


__all__ = ["predict_dataset", "evaluate_detector", "evaluate_checkpoint", "run_scale_invariance", "saved_test_scale"]
