"""CPU speed of Mask R-CNN with the micro backbone of each paper mixer: inference and a training step.

One image per call, fp32, at a small size (320x320) and at the paper's test scale (800x1333): inference
(eval mode, up to 100 detections with masks pasted) and a training step (forward with the losses of
a real COCO target, backward, AdamW step). The real nuclei tiles (256x256, resized by the detector)
give the images and targets. Models are timed round-robin (every model once per round, median) so
that load on the shared CPU hits them alike.

    python benchmarks/detection.py                       # all five micro detectors, both sizes
    python benchmarks/detection.py --sizes 320 --iters 5
    python benchmarks/detection.py --models unified_convnext_micro unified_convnext_tiny torchvision_r50
        # side by side with torchvision's own maskrcnn_resnet50_fpn (random weights, same image)

Prints a markdown table and writes benchmarks/results/detection.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from speed import FAMILIES, round_robin
from tokenmixers.detection import create_detector
from tokenmixers.detection.data import CocoDetection
from tokenmixers.files import atomic_write_text

NUCLEI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-nuclei"
TORCHVISION = "torchvision_r50"  # torchvision's maskrcnn_resnet50_fpn, the detector users know
SIZES = {320: (320, 320), 800: (800, 1333)}


def detector_fns(names: list[str], size: int) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """Inference and training-step closures per model, one image resized to ``SIZES[size]``."""
    short, long = SIZES[size]
    image, target = CocoDetection(NUCLEI, "train", train=True, hflip=0.0)[0]
    infer, train = {}, {}
    for name in names:
        torch.manual_seed(0)
        if name == TORCHVISION:
            detector = torchvision.models.detection.maskrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, num_classes=2, min_size=short, max_size=long)
        else:
            detector = create_detector(name, 1, min_size=short, max_size=long)
        # a wide image (the 256x256 tile stretched) so the long side reaches the cap at the large size
        wide = torch.nn.functional.interpolate(image[None], size=(256, round(256 * long / short)), mode="bilinear")[0]
        scale_x = wide.shape[-1] / image.shape[-1]
        tgt = {**target, "boxes": target["boxes"] * torch.tensor([scale_x, 1, scale_x, 1]),
               "masks": torch.nn.functional.interpolate(target["masks"][None].float(), size=wide.shape[1:])[0].byte()}
        optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4)

        def run_infer(d: torch.nn.Module = detector, x: torch.Tensor = wide) -> None:
            d.eval()
            with torch.no_grad():
                d([x])

        def run_train(d: torch.nn.Module = detector, x: torch.Tensor = wide, t: dict = tgt,
                      opt: torch.optim.Optimizer = optimizer) -> None:
            d.train()
            sum(d([x], [t]).values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        infer[name], train[name] = run_infer, run_train
    return infer, train


def main() -> None:
    """Time the detectors and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[f"unified_{f}_micro" for f in FAMILIES])
    parser.add_argument("--sizes", nargs="+", type=int, default=sorted(SIZES), choices=sorted(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "detection.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": args.threads, "seconds": {}}
    for size in args.sizes:
        infer, train = detector_fns(args.models, size)
        t0 = time.time()
        inf_s = round_robin(infer, args.warmup, args.iters)
        train_s = round_robin(train, args.warmup, args.iters)
        for name in args.models:
            results["seconds"][f"{name}@{size}"] = {"inference": statistics.median(inf_s[name]),
                                                    "train_step": statistics.median(train_s[name])}
        print(f"size {SIZES[size]} timed in {time.time() - t0:.0f}s", flush=True)
    print(f"\n| model | {' | '.join(f'inference {SIZES[s][0]}x{SIZES[s][1]} (s)' for s in args.sizes)} | "
          f"{' | '.join(f'train step {SIZES[s][0]}x{SIZES[s][1]} (s)' for s in args.sizes)} |")
    print("|---" * (1 + 2 * len(args.sizes)) + "|")
    for name in args.models:
        cells = [results["seconds"][f"{name}@{s}"][k] for k in ("inference", "train_step") for s in args.sizes]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
