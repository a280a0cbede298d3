"""Cascade Mask R-CNN (DWNet's configs) against mmdetection 2.28.2's own ``CascadeRoIHead`` in float64
(tools/make_detection_reference.py), and its size as published."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from tokenmixers.detection import create_detector, load_detector_weights
from tokenmixers.detection.cascade import CascadeRoIHeads
from tokenmixers.detection.task import param_groups
from tokenmixers.detection.task import train as train_detector

from .conftest import cli
from .test_detection_parity import DATA, _input, _inputs, _mmdet_state_dict
from .test_detection_training import MICRO, NUCLEI


# measured on both images: proposals <= 9.4e-12 px, every stage's boxes <= 1.4e-11 px, its logits <= 4.7e-13, final boxes
# <= 8.6e-12 px, scores <= 7.8e-15, no mask pixel differs
@pytest.mark.parametrize("name, tag", [("dwnet_tiny", "landscape_small"), ("unified_convnext_micro", "portrait_small")])
def test_cascade_gives_mmdets_detections(name: str, tag: str) -> None:
    """A DWNet-format cascade checkpoint: mmdet's proposals, each stage's boxes and classes, detections and masks."""
    reference = json.loads((DATA / f"cascade_mask_rcnn_{name}.json").read_text())
    with torch.device("meta"):  # no random initialisation: every weight comes from the reference
        detector = create_detector(name, 80, cascade=True)
    detector = detector.to_empty(device="cpu").double().eval()
    report = load_detector_weights(detector, {"meta": {}, "state_dict": _mmdet_state_dict(reference)})
    assert report.source == "mmdet" and not report.missing
    detector.rpn._post_nms_top_n["testing"] = reference["changed"]["test_cfg.rpn.max_per_img"][1]
    heads: CascadeRoIHeads = detector.roi_heads
    meta, expected = _inputs()[tag], np.load(DATA / f"cascade_mask_rcnn_{name}_{tag}.npz")
    x, size, original = _input(tag), tuple(meta["img_shape"][:2]), tuple(meta["ori_shape"][:2])
    seen: list = []  # each stage's input boxes and outputs, as the heads run (forward hooks, one pass)
    heads.bbox_roi_extractor.register_forward_hook(lambda m, args, out: seen.append(args[1][0]))
    for head in heads.bbox_head:
        head.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        features = detector.backbone(x)
        proposals, _ = detector.rpn(ImageList(x, [size]), features)
        det = heads(features, proposals, [size])[0][0]
    assert np.abs(proposals[0].numpy() - expected["proposals"][:, :4]).max() < 1e-9  # pixels
    for i, (boxes, (logits, _)) in enumerate(zip(seen[0::2], seen[1::2])):
        assert np.abs(boxes.numpy() - expected[f"stage{i}_boxes"]).max() < 1e-9
        best = logits[:, :-1].max(1)
        assert np.array_equal(best.indices.numpy(), expected[f"stage{i}_label"])
        assert np.abs(best.values.numpy() - expected[f"stage{i}_max_logit"]).max() < 1e-10
    assert len(seen) == 6
    # in mmdet's multiclass_nms order (score descending), boxes in the resized image
    assert len(det["labels"]) == len(expected["det_labels"]) > 3
    assert np.array_equal(det["labels"].numpy() - 1, expected["det_labels"])
    assert np.abs(det["boxes"].numpy() - expected["det_bboxes"][:, :4]).max() < 1e-9
    assert np.abs(det["scores"].numpy() - expected["det_bboxes"][:, 4]).max() < 1e-12
    # as simple_test lists them (per class), with the masks of the three heads averaged and pasted
    order = np.lexsort((-det["scores"].numpy(), det["labels"].numpy()))
    assert np.array_equal(det["labels"].numpy()[order] - 1, expected["labels_noscale"])
    pasted = detector.transform.postprocess([{k: v.clone() for k, v in det.items()}], [size], [original])[0]
    masks = np.unpackbits(expected["masks"])[: np.prod(expected["mask_shape"])].reshape(expected["mask_shape"])
    ours = pasted["masks"][:, 0].numpy()[order]
    assert ours.shape == masks.shape and masks.any()
    assert (ours != masks.astype(bool)).sum() <= 5  # pixels within float noise of the 0.5 threshold may flip
    assert np.abs(pasted["boxes"].numpy()[order] - expected["bboxes"][:, :4]).max() < 1e-4


def test_dwnet_tiny_cascade_counts_the_published_parameters() -> None:
    """DWNet-T's Cascade Mask R-CNN: 82 M parameters as DWNet publishes it (81.5 M counted), mmdet's key names."""
    with torch.device("meta"):
        detector = create_detector("dwnet_tiny", 80, cascade=True)
    count = sum(p.numel() for p in detector.parameters())
    assert round(count / 1e6) == 82, count
    reference = json.loads((DATA / "cascade_mask_rcnn_dwnet_tiny.json").read_text())
    assert count == reference["parameters"]
    heads = [k for k in detector.state_dict() if k.startswith("roi_heads.")]
    assert {k.removeprefix("roi_heads.") for k in heads} == {
        k.removeprefix("roi_head.") for k, _ in reference["entries"] if k.startswith("roi_head.")}


def test_cascade_learns_the_nuclei_then_detect_eval_reloads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The smoke recipe with ``detector=cascade_mask_rcnn``: the losses of all stages fall and AP is reported."""
    quick = {**MICRO, "min_size": [160], "max_size": 160, "test_size": 160, "fpn_channels": 32, "rois_per_image": 64,
             "epochs": 5, "ckpt_every_epochs": 5, "eval_every": 5}  # 3 steps per epoch
    trained = train_detector("smoke", {**quick, "detector": "cascade_mask_rcnn", "output": str(tmp_path / "run")})
    history = trained["history"]
    assert all(f"s{i}.loss_{k}" in history[0] for i in range(3) for k in ("cls", "bbox", "mask"))
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]  # measured: 5.71 -> 3.60
    assert trained["bbox"]["AP"] > 2 and trained["segm"]["AP"] > 0.5  # measured: 3.7 (AP50 12.9), 1.4 (AP50 7.7)
    code, out, err = cli(capsys, "detect", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data",
                         str(NUCLEI), "--split", "train", "--min-size", "160", "--max-size", "160", "--workers", "0",
                         "--batch-size", "1")
    assert code == 0, err
    assert f"bbox AP {trained['bbox']['AP']:.1f}" in out and "segm AP" in out


def test_dwnet_decay_follows_its_official_names() -> None:
    """DWNet's config exempts names holding "norm": its LayerNorms and out norms; its blocks' BatchNorms (bn*) decay."""
    with torch.device("meta"):
        detector = create_detector("dwnet_tiny", 80, cascade=True)
    decay, no_decay = param_groups(detector, 0.05)
    names = {id(p): n for n, p in detector.named_parameters()}
    exempt = {re.sub(r"\.\d+\.", ".N.", names[id(p)]) for p in no_decay["params"]}
    assert exempt == {f"backbone.body.{m}.{w}" for m in ("stem.norm", "stages.N.downsample.norm", "out_norms.N")
                      for w in ("weight", "bias")}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "backbone.body.stages.0.blocks.0.norm2.weight" in decayed  # official layers.0.blocks.0.bn.weight
    assert "roi_heads.bbox_head.0.shared_convs.0.bn.weight" in decayed  # mmdet's ConvModule BatchNorm: "bn"
