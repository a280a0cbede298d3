"""RetinaNet against mmdetection 2.28.2's own in float64 (tools/make_detection_reference.py), and a training step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from tokenmixers.converters import mmdet
from tokenmixers.detection.retinanet import create_retinanet, load_retinanet_weights

from .test_detection_parity import DATA, _input, _inputs, _mmdet_state_dict

NAME = "unified_convnext_micro"


def _reference() -> dict:
    reference = json.loads((DATA / f"retinanet_{NAME}.json").read_text())
    reference.setdefault("model", NAME)
    return reference


def test_converter_keeps_mask_rcnn_and_maps_every_retinanet_key() -> None:
    """Every mmdet RetinaNet key lands on a module name; the Mask R-CNN renames are unchanged."""
    assert mmdet.rename("neck.fpn_convs.3.conv.weight") == "backbone.fpn.layer_blocks.3.0.weight"
    assert mmdet.rename("neck.fpn_convs.3.conv.weight", retinanet=True) == "backbone.fpn.extra_blocks.p6.weight"
    assert mmdet.rename("neck.fpn_convs.4.conv.bias", retinanet=True) == "backbone.fpn.extra_blocks.p7.bias"
    assert mmdet.rename("neck.fpn_convs.2.conv.bias", retinanet=True) == "backbone.fpn.layer_blocks.2.0.bias"
    with torch.device("meta"):
        model = create_retinanet(NAME, 80)
    own = set(model.state_dict())
    heads = [k for k, _ in _reference()["entries"] if not k.startswith("backbone.")]
    assert {mmdet.rename(k, retinanet=True) for k in heads} == {k for k in own if not k.startswith("backbone.body.")}


@pytest.mark.parametrize("tag", ["portrait"])  # the landscape image passes too (boxes 2e-13 px, measured)
def test_retinanet_gives_mmdets_detections(tag: str) -> None:
    """Converted mmdet weights: mmdet's base anchors and its 100 detections (boxes, scores, labels, NMS order)."""
    reference = _reference()
    with torch.device("meta"):  # no random initialisation: every weight comes from the reference
        model = create_retinanet(NAME, 80)
    model = model.to_empty(device="cpu").double().eval()
    report = load_retinanet_weights(model, {"meta": {}, "state_dict": _mmdet_state_dict(reference)})
    assert report.source == "mmdet" and not report.missing and not report.unexpected
    model.anchor_generator.set_cell_anchors(torch.float64, torch.device("cpu"))
    base = np.stack([c.numpy() for c in model.anchor_generator.cell_anchors])
    assert np.array_equal(base, np.array(reference["base_anchors"]))
    meta, expected = _inputs()[tag], np.load(DATA / f"retinanet_{NAME}_{tag}.npz")
    x, size, original = _input(tag), tuple(meta["img_shape"][:2]), tuple(meta["ori_shape"][:2])
    images = ImageList(x, [size])
    with torch.no_grad():
        features = list(model.backbone(x).values())
        outputs = model.head(features)
        anchors = model.anchor_generator(images, features)
        counts = [f.shape[-2] * f.shape[-1] * 9 for f in features]
        split = {k: list(v.split(counts, dim=1)) for k, v in outputs.items()}
        det = model.postprocess_detections(split, [list(a.split(counts)) for a in anchors], [size])[0]
    ref = expected["det_bboxes"]
    assert len(det["boxes"]) == len(ref) == 100
    assert np.array_equal(det["labels"].numpy() - 1, expected["det_labels"])  # same classes in the same order
    assert np.abs(det["scores"].numpy() - ref[:, 4]).max() < 1e-12  # measured ~1e-15
    # mmdet's boxes are rescaled by its float32 scale factor (box / float64(float32 scale)); ours at input scale
    scale = np.array(meta["scale_factor"], dtype=np.float32).astype(np.float64)
    assert np.abs(det["boxes"].numpy() / scale - ref[:, :4]).max() < 1e-9  # pixels; measured <= 2.5e-13
    # through the transform (its own per-axis ratio) the original-scale boxes agree to the float32 precision
    back = model.transform.postprocess([{k: v.clone() for k, v in det.items()}], [size], [original])[0]
    assert np.abs(back["boxes"].numpy() - ref[:, :4]).max() < 1e-4


def test_retinanet_training_step_gives_finite_losses_and_gradients() -> None:
    """One training step with a target and an empty image: finite losses and gradients; eval gives labels 1..K."""
    torch.manual_seed(0)
    model = create_retinanet(NAME, 3, min_size=128, max_size=128).train()
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 5.0, 110.0, 40.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}]
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["bbox_regression"] > 0
    sum(losses.values()).backward()
    # C2 (and its out norm) is computed by the backbone but not used: the FPN starts at C3 as mmdet's does
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    assert unused == {"backbone.body.out_norms.0.weight", "backbone.body.out_norms.0.bias"}
    assert not any(p.requires_grad for p in model.backbone.body.out_norms["0"].parameters())  # frozen: DDP-safe
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(((o["labels"] >= 1) & (o["labels"] <= 3)).all() for o in out)


def test_retinanet_recipe_trains_and_evaluates_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """detect train --detector retinanet on the nuclei tiles (boxes only), then detect eval of its checkpoint."""
    from tokenmixers.detection.task import Detection

    from .conftest import SHARED, cli

    recipe = Detection.load_settings("retinanet_1x")
    assert (recipe.detector, recipe.decay_rule, recipe.weight_decay, recipe.warmup_iters) == ("retinanet", "every", 1e-4, 500)
    nuclei = str(SHARED / "data" / "coco-nuclei")
    code, out, err = cli(capsys, "detect", "train", "--recipe", "smoke", "--detector", "retinanet", "--data", nuclei,
                         "--output", str(tmp_path / "run"), "epochs=1", "workers=0", "min_size=[128]", "max_size=128",
                         "test_size=128")
    assert code == 0, err
    assert "bbox AP" in out and "segm AP" not in out  # RetinaNet: boxes only
    code, out, err = cli(capsys, "detect", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data", nuclei,
                         "--workers", "0")
    assert code == 0, err
    assert "bbox AP" in out and "(1 images)" in out
