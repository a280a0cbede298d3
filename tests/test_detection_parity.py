"""The whole Mask R-CNN against mmdetection 2.28.2's own code in float64 (tools/make_detection_reference.py)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.image_list import ImageList

from tokenmixers.detection import create_detector, load_detector_weights

from .reference import official_state_dict

DATA = Path(__file__).parent / "data" / "detection"


@lru_cache(maxsize=None)
def _inputs() -> dict:
    return json.loads((DATA / "inputs.json").read_text())["images"]


def _input(tag: str) -> torch.Tensor:
    """mmdet's network input, rebuilt in float64 from its resized image (see tests/data/detection/README.md)."""
    meta = _inputs()[tag]
    rgb = torch.from_numpy(np.asarray(Image.open(DATA / meta["png"]))).double()
    mean = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64)
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float64)
    x = torch.zeros(1, 3, *meta["pad_shape"][:2], dtype=torch.float64)
    h, w = rgb.shape[:2]
    x[0, :, :h, :w] = ((rgb - mean) / std).permute(2, 0, 1)
    return x


def _mmdet_state_dict(reference: dict) -> dict[str, torch.Tensor]:
    """The reference's weights in mmdet's layout by the key-seeded recipe: the backbone's by their official keys
    (for a paper model: ``paper_detection_state_dict``), the rest by their full mmdet keys; the class weights
    scaled as recorded."""
    entries = [(k, s) for k, s in reference["entries"] if k not in reference.get("constructed", [])]
    backbone = official_state_dict([(k.removeprefix("backbone."), s) for k, s in entries if k.startswith("backbone.")])
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update(official_state_dict([(k, s) for k, s in entries if not k.startswith("backbone.")]))
    for key in reference["cls_scale"]["keys"]:
        state[key] = state[key] * reference["cls_scale"]["factor"]
    return state


# every pair passes (measured: proposals <= 5.3e-12 px, boxes <= 2.3e-12 px, no mask pixel differs); two are run.
# The portrait image pads both sides at every stage (Swin's padded windows), and has boxes shrunk so far that
# decoding needs mmdet's clamp of the size change in both directions.
@pytest.mark.parametrize("name, tag", [("unified_convnext_micro", "landscape"), ("unified_swin_micro", "portrait")])
def test_mask_rcnn_gives_mmdets_detections(name: str, tag: str) -> None:
    """Converted mmdet weights: the same 1000 proposals, detections (boxes, scores, labels, order) and masks."""
    reference = json.loads((DATA / f"mask_rcnn_{name}.json").read_text())
    reference.setdefault("model", name)
    with torch.device("meta"):  # no random initialisation: every weight comes from the reference
        detector = create_detector(name, 80)
    detector = detector.to_empty(device="cpu").double().eval()
    report = load_detector_weights(detector, {"meta": {}, "state_dict": _mmdet_state_dict(reference)})
    assert report.source == "mmdet" and not report.missing
    meta, expected = _inputs()[tag], np.load(DATA / f"mask_rcnn_{name}_{tag}.npz")
    x, size, original = _input(tag), tuple(meta["img_shape"][:2]), tuple(meta["ori_shape"][:2])
    images = ImageList(x, [size])
    with torch.no_grad():
        features = detector.backbone(x)
        proposals, _ = detector.rpn(images, features)
        detections, _ = detector.roi_heads(features, proposals, images.image_sizes)
    proposals = proposals[0].numpy()
    assert proposals.shape == expected["proposals"][:, :4].shape
    assert np.abs(proposals - expected["proposals"][:, :4]).max() < 1e-9  # pixels; measured <= 1e-11
    det = detections[0]
    boxes = det["boxes"].numpy()
    ref_boxes, ref_labels = expected["bboxes_noscale"], expected["labels_noscale"]
    # in mmdet's own order (multiclass_nms: score descending) ...
    assert np.array_equal(det["labels"].numpy() - 1, expected["det_labels"])
    assert np.abs(det["scores"].numpy() - expected["det_bboxes"][:, 4]).max() < 1e-12
    # ... and as simple_test lists them (per class), with the masks
    order = np.lexsort((-det["scores"].numpy(), det["labels"].numpy()))
    assert np.array_equal(det["labels"].numpy()[order] - 1, ref_labels)
    assert np.abs(boxes[order] - ref_boxes[:, :4]).max() < 1e-9
    assert np.abs(det["scores"].numpy()[order] - ref_boxes[:, 4]).max() < 1e-12
    pasted = detector.transform.postprocess([{k: v.clone() for k, v in det.items()}], [size], [original])[0]
    masks = np.unpackbits(expected["masks"])[: np.prod(expected["mask_shape"])].reshape(expected["mask_shape"])
    ours = pasted["masks"][:, 0].numpy()[order]
    assert ours.shape == masks.shape
    assert (ours != masks.astype(bool)).sum() <= 5  # pixels within float noise of the 0.5 threshold may flip
    # mmdet rescales boxes by its float32 scale factor: the original-scale boxes agree to that precision
    assert np.abs(pasted["boxes"].numpy()[order] - expected["bboxes"][:, :4]).max() < 1e-4
