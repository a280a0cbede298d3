"""Parameters and MACs of segmentors at 512x2048, the input the papers' FLOPs columns count at (150 classes).

    python benchmarks/segmentation_costs.py                      # the README's rows
    python benchmarks/segmentation_costs.py unified_halo_tiny:upernet dwnet_base:upernet

MACs are counted on one 512x2048 image in eval mode by :func:`tokenmixers.costs.count_macs` (torch's
counter: products of convolutions, linear layers and attention); the papers count with mmcv's
``get_flops``, which also counts norms, activations and resizes, so expect theirs a little higher.
Prints a markdown table and writes benchmarks/results/segmentation_costs.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenmixers.costs import count_macs, count_params
from tokenmixers.files import atomic_write_text
from tokenmixers.segmentation import create_segmentor

ROWS = [f"unified_{f}_tiny:upernet" for f in ("halo", "pvt", "swin", "convnext", "dcn_v3")] + [
    "dwnet_tiny:upernet", "dwnet_dynamic_tiny:upernet", "dwnet_base:upernet", "stvit_small:upernet",
    "twins_svt_small:upernet", "twins_pcpvt_small:upernet", "unified_pvt_tiny:semantic_fpn",
    "twins_svt_small:semantic_fpn", "twins_pcpvt_small:semantic_fpn",
]
RESULTS = Path(__file__).parent / "results" / "segmentation_costs.json"


def costs(row: str) -> dict:
    """Parameters and GMACs of one ``model:head`` segmentor with 150 classes at 512x2048."""
    model, head = row.split(":")
    torch.manual_seed(0)
    segmentor = create_segmentor(model, 150, head)
    return {"model": model, "head": head, "params_M": round(count_params(segmentor) / 1e6, 2),
            "GMACs_512x2048": round(count_macs(segmentor, (512, 2048))["macs"] / 1e9, 1)}


def main() -> None:
    """Count every requested row; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", default=ROWS, help="model:head (upernet or semantic_fpn)")
    rows = [costs(row) for row in parser.parse_args().rows]
    print("| backbone | head | params | MACs at 512x2048 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['head']} | {r['params_M']:.1f}M | {r['GMACs_512x2048']:.0f}G |")
    atomic_write_text(RESULTS, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
