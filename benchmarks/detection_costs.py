"""Parameters and MACs of Cascade Mask R-CNN detectors at 1280x800, as mmdetection's ``get_flops`` counts them.

    python benchmarks/detection_costs.py                       # the README's rows
    python benchmarks/detection_costs.py dwnet_tiny unified_halo_tiny

mmdet's ``tools/analysis_tools/get_flops.py`` (default shape 1280x800: an input of height 1280 and width 800)
runs ``forward_dummy``: backbone, FPN, RPN head, then the three stages' box heads on 1000 random proposals and
the three mask heads on the first 100. The same is run here on one (3, 1280, 800) image in eval mode and counted
by torch's counter (products of convolutions, linear layers and attention, :mod:`tokenmixers.costs`); mmcv's
counter also counts norms, activations, pooling and resizes, so expect the published numbers a little higher.
80 classes. Prints a markdown table and writes benchmarks/results/detection_costs.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenmixers.costs import count_params
from tokenmixers.detection import Detector, create_detector
from tokenmixers.files import atomic_write_text

ROWS = ["dwnet_tiny", "dwnet_dynamic_tiny", "dwnet_base", "dwnet_dynamic_base",
        *(f"unified_{f}_tiny" for f in ("halo", "pvt", "swin", "convnext", "dcn_v3"))]
PUBLISHED = {"dwnet_tiny": (82, 730), "dwnet_dynamic_tiny": (108, 730), "dwnet_base": (132, 924),
             "dwnet_dynamic_base": (219, 924)}  # DWNet's README: params M, FLOPs G
RESULTS = Path(__file__).parent / "results" / "detection_costs.json"


def dummy_forward(detector: Detector, x: torch.Tensor, proposals: int = 1000, mask_rois: int = 100) -> None:
    """mmdet's ``forward_dummy`` of a cascade: every head on random boxes inside the image."""
    features = detector.backbone(x)
    detector.rpn.head(list(features.values()))
    h, w = x.shape[-2:]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(proposals, 2, generator=g) * torch.tensor([w, h]) * 0.8
    boxes = torch.cat([xy, xy + torch.rand(proposals, 2, generator=g) * torch.tensor([w, h]) * 0.2 + 8], dim=1)
    heads = detector.roi_heads
    for i in range(len(heads.bbox_head)):
        heads.stage(i, features, [boxes])
    roi_features = heads.mask_roi_extractor(features, [boxes[:mask_rois]])
    for head in heads.mask_head:
        head(roi_features)


def costs(model: str) -> dict:
    """Parameters and GMACs of one cascade detector at 1280x800."""
    torch.manual_seed(0)
    detector = create_detector(model, 80, cascade=True).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dummy_forward(detector, torch.randn(1, 3, 1280, 800))
    params, macs = count_params(detector), counter.get_total_flops() // 2
    row = {"model": model, "params_M": round(params / 1e6, 2), "GMACs_1280x800": round(macs / 1e9, 1)}
    if model in PUBLISHED:
        row["published_params_M"], row["published_GFLOPs"] = PUBLISHED[model]
    return row


def main() -> None:
    """Count every requested detector; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=ROWS)
    rows = [costs(model) for model in parser.parse_args().models]
    print("| backbone | params | MACs at 1280x800 | published params / FLOPs |\n|---|---|---|---|")
    for r in rows:
        published = f"{r['published_params_M']}M / {r['published_GFLOPs']}G" if "published_params_M" in r else "–"
        print(f"| {r['model']} | {r['params_M']:.1f}M | {r['GMACs_1280x800']:.0f}G | {published} |")
    atomic_write_text(RESULTS, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
