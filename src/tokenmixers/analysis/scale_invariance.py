"""Scale invariance of a detector (the paper's Fig. 7, third row): box consistency and box mAP vs scale factor.

Every image is run at its standard test scale and at ``factor`` times it (0.25, 0.5, ..., 3.0); the
boxes come back at the original resolution and are scored by box mAP against the boxes the same
detector predicts at the standard scale ("box consistency"; predictions scoring at least
``reference_score`` serve as ground truth) and against the real ground truth. The detector is seen
only through ``predict(factor) -> COCO bbox records``, so any detector works.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from ..coco import coco_ap, reference_coco
from ..files import atomic_write_csv, atomic_write_text
from .plots import Panel, plot_panels

FACTORS = tuple(0.25 * i for i in range(1, 13))


def scale_invariance(predict: Callable[[float], list[dict]], coco_gt: Any, image_ids: Sequence[int],
                     factors: Sequence[float] = FACTORS, reference_score: float = 0.5) -> list[dict[str, Any]]:
    """Box consistency and box mAP (%) at each factor: one row per factor."""
    at_base = predict(1.0)
    reference = reference_coco(coco_gt, at_base, reference_score)
    rows = []
    for factor in factors:
        records = at_base if factor == 1.0 else predict(factor)
        rows.append({
            "factor": factor,
            "consistency": coco_ap(reference, records, "bbox", image_ids)["AP"],
            "mAP": coco_ap(coco_gt, records, "bbox", image_ids)["AP"],
            "reference_boxes": len(reference.anns), "boxes": len(records),
        })
    return rows


def plot_scale_invariance(results: dict[str, list[dict[str, Any]]], path: Union[str, Path]) -> Path:
    """Box consistency and box mAP vs scale factor, one line per model."""
    grid = [[Panel("factor", "consistency", "box consistency", "scale factor", "box consistency (%)"),
             Panel("factor", "mAP", "box mAP", "scale factor", "box mAP (%)")]]
    return plot_panels(results, grid, path)


def scale_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table: a row per factor, consistency / mAP of each model."""
    models = list(results)
    lines = ["| factor | " + " | ".join(f"{m} consistency / mAP" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for i, row in enumerate(results[models[0]]):
        cells = [f"{results[m][i]['consistency'] or 0:.1f} / {results[m][i]['mAP'] or 0:.1f}" for m in models]
        lines.append(f"| x{row['factor']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_scale_invariance(results: dict[str, list[dict[str, Any]]], out: Union[str, Path]) -> list[Path]:
    """``scale_invariance.json`` / ``.csv`` / ``.md`` (one row per model and factor) and ``scale_invariance.png``."""
    out = Path(out)
    flat = [{"model": model, **row} for model, rows in results.items() for row in rows]
    return [atomic_write_text(out / "scale_invariance.json", json.dumps(flat, indent=2) + "\n"),
            atomic_write_csv(out / "scale_invariance.csv", flat),
            atomic_write_text(out / "scale_invariance.md", scale_table(results) + "\n"),
            plot_scale_invariance(results, out / "scale_invariance.png")]


__all__ = ["FACTORS", "scale_invariance", "plot_scale_invariance", "scale_table", "write_scale_invariance"]
