"""Mask R-CNN with any backbone: mmdet conversion, COCO data and its errors, evaluation, prediction, invariance."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenmixers_cli
from tokenmixers import CheckpointError
from tokenmixers.coco import coco_ap, to_records
from tokenmixers.data import DataError
from tokenmixers.detection import create_detector, load_detector, load_detector_weights, save_detector
from tokenmixers.detection.data import CocoDetection
from tokenmixers.detection.detector import paste_masks
from tokenmixers.detection.evaluate import run_scale_invariance

from .conftest import SHARED, cli
from .reference import paper_detection_state_dict

NUCLEI = SHARED / "data" / "coco-nuclei"
TREES = SHARED / "data" / "coco-trees"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmixers", *args]


# -- mmdet checkpoints -----------------------------------------------------------------------------------


def mmdet_state_dict(name: str, num_classes: int = 80) -> dict[str, torch.Tensor]:
    """A synthetic mmdetection 2.x Mask R-CNN checkpoint: exact key layout and shapes, random values."""
    g = torch.Generator().manual_seed(0)
    state = {k: v.float() for k, v in paper_detection_state_dict(name).items()}
    dims = [state[f"backbone.out_norm_{i}.weight"].shape[0] for i in range(4)]

    def conv(key: str, out: int, inp: int, k: int) -> None:
        state[f"{key}.weight"] = torch.randn(out, inp, k, k, generator=g) * 0.02
        state[f"{key}.bias"] = torch.randn(out, generator=g) * 0.02

    for i, dim in enumerate(dims):
        conv(f"neck.lateral_convs.{i}.conv", 256, dim, 1)
        conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    conv("rpn_head.rpn_conv", 256, 256, 3)
    conv("rpn_head.rpn_cls", 3, 256, 1)  # sigmoid objectness: one channel per anchor
    conv("rpn_head.rpn_reg", 12, 256, 1)
    for key, out, inp in (("shared_fcs.0", 1024, 256 * 49), ("shared_fcs.1", 1024, 1024),
                          ("fc_cls", num_classes + 1, 1024), ("fc_reg", 4 * num_classes, 1024)):
        state[f"roi_head.bbox_head.{key}.weight"] = torch.randn(out, inp, generator=g) * 0.01
        state[f"roi_head.bbox_head.{key}.bias"] = torch.randn(out, generator=g) * 0.01
    for i in range(4):
        conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3)
    conv("roi_head.mask_head.upsample", 256, 256, 2)  # ConvTranspose2d(256, 256, 2, 2): (in, out, k, k)
    conv("roi_head.mask_head.conv_logits", num_classes, 256, 1)
    return state


@pytest.fixture(scope="module")
def mmdet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mmdet") / "mask_rcnn_halo_micro.pth"
    torch.save({"state_dict": mmdet_state_dict("unified_halo_micro"), "meta": {"epoch": 12, "mmdet_version": "2.25.0"}},
               path)
    return path


def test_mmdet_checkpoint_converts_into_the_detector(mmdet_checkpoint: Path, tmp_path: Path) -> None:
    tokenmixers_cli.main(["convert", str(mmdet_checkpoint), str(tmp_path / "det"), "--model", "unified_halo_micro"])
    detector, report = load_detector(tmp_path / "det")  # the folder `tokenmixers convert` wrote
    assert detector.config["model"] == "unified_halo_micro" and detector.num_classes == 80
    assert not report.missing and not report.unexpected
    source = torch.load(mmdet_checkpoint, weights_only=True)["state_dict"]
    sd = detector.state_dict()
    # mmdet: background last in fc_cls, no background rows in fc_reg / conv_logits; torchvision: background first
    cls = sd["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[0], source["roi_head.bbox_head.fc_cls.weight"][80])
    assert torch.equal(cls[1:], source["roi_head.bbox_head.fc_cls.weight"][:80])
    reg = sd["roi_heads.box_predictor.bbox_pred.weight"]
    assert not reg[:4].any() and torch.equal(reg[4:], source["roi_head.bbox_head.fc_reg.weight"])
    logits = sd["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert not logits[0].any() and torch.equal(logits[1:], source["roi_head.mask_head.conv_logits.weight"])
    assert torch.equal(sd["backbone.fpn.inner_blocks.2.0.weight"], source["neck.lateral_convs.2.conv.weight"])
    assert torch.equal(sd["roi_heads.box_head.fc7.weight"], source["roi_head.bbox_head.shared_fcs.1.weight"])
    assert torch.equal(sd["rpn.head.cls_logits.weight"], source["rpn_head.rpn_cls.weight"])
    assert torch.equal(sd["backbone.body.out_norms.3.bias"], source["backbone.out_norm_3.bias"])
    assert torch.equal(sd["backbone.body.stem.conv1.weight"], source["backbone.downsample_layers.0.stem.0.weight"])
    detector.set_test_scale(128, 192)
    with torch.no_grad():
        out = detector.eval()([torch.rand(3, 120, 150)])[0]
    assert out["masks"].shape[1:] == (1, 120, 150) and out["masks"].dtype == torch.bool
    assert ((out["labels"] >= 1) & (out["labels"] <= 80)).all()


def test_detection_checkpoint_with_other_classes(mmdet_checkpoint: Path) -> None:
    detector = create_detector("unified_halo_micro", 3)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with pytest.raises(CheckpointError, match="predicts 80 classes, the detector 3.*reset_heads=True"):
        load_detector_weights(detector, mmdet_checkpoint)
    assert all(torch.equal(v, before[k]) for k, v in detector.state_dict().items())
    report = load_detector_weights(detector, mmdet_checkpoint, reset_heads=True)
    assert report.source == "mmdet" and "class-specific layers re-initialised (80 -> 3 classes)" in str(report)
    sd = detector.state_dict()
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"], before["roi_heads.box_predictor.cls_score.weight"])
    assert not torch.equal(sd["roi_heads.box_head.fc6.weight"], before["roi_heads.box_head.fc6.weight"])


# -- the detector ---------------------------------------------------------------------------------------


def test_mask_pasting_samples_the_box_at_pixel_centres() -> None:
    mask = torch.zeros(1, 28, 28)
    mask[0, :, :14] = 1.0  # left half of the box
    pasted = paste_masks(mask, torch.tensor([[10.0, 20.0, 50.0, 40.0]]), 60, 80)[0]
    assert pasted.dtype == torch.bool and pasted.shape == (60, 80)
    assert pasted[20:40, 10:30].all() and not pasted[:, 31:].any() and not pasted[:20].any() and not pasted[41:].any()


def test_any_registered_model_detects_including_timm_ones() -> None:
    detector = create_detector("twins_svt_small", 2, masks=False, min_size=96, max_size=128, fpn_channels=32).eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 90, 120)])[0]
    assert set(out) == {"boxes", "labels", "scores"}
    with pytest.raises(KeyError, match="unknown model"):
        create_detector("unified_halo_mini", 2)


# -- COCO data -----------------------------------------------------------------------------------------


def test_coco_data_polygons_rle_and_box_only() -> None:
    nuclei = CocoDetection(NUCLEI, "train", train=True)
    assert nuclei.has_masks and nuclei.num_classes == 1 and len(nuclei) == 3
    image, target = nuclei[0]
    assert image.shape == (3, 256, 256) and 0 <= image.min() and image.max() <= 1
    assert target["masks"].shape == (len(target["boxes"]), 256, 256) and target["masks"].dtype == torch.uint8
    box = target["boxes"][0]
    ys, xs = torch.where(target["masks"][0].bool())
    assert abs(float(xs.min()) - float(box[0])) <= 1 and abs(float(ys.max()) + 1 - float(box[3])) <= 1
    trees = CocoDetection(TREES, "val")
    assert not trees.has_masks and "masks" not in trees[0][1] and len(trees[0][1]["boxes"]) == 37


def _copy(root: Path, tmp: Path) -> Path:
    out = tmp / root.name
    shutil.copytree(root, out)
    return out


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_coco_data_fails_before_training(tmp_path: Path) -> None:
    root = _copy(TREES, tmp_path)
    with pytest.raises(DataError, match="no annotation file for the 'test' split"):
        CocoDetection(root, "test")
    ann = root / "instances_train.json"
    _edit(ann, lambda d: d["images"].append({"id": 7, "file_name": "missing.png", "height": 10, "width": 10}))
    with pytest.raises(DataError, match=r"names 1 image\(s\) missing.*missing.png"):
        CocoDetection(root, "train")
    shutil.copy(TREES / "instances_train.json", ann)
    _edit(ann, lambda d: d["annotations"][3].update(category_id=5))
    with pytest.raises(DataError, match="category_id 5, not among the categories"):
        CocoDetection(root, "train")
    shutil.copy(TREES / "instances_train.json", ann)
    _edit(ann, lambda d: d["annotations"][0].update(bbox=[10, 10, -4, 5]))
    with pytest.raises(DataError, match="negative size"):
        CocoDetection(root, "train")
    # a polygon of two points: pycocotools takes 4 numbers for a box and failed later, inside a loader worker
    nuclei = _copy(NUCLEI, tmp_path)
    _edit(nuclei / "instances_train.json", lambda d: d["annotations"][5].update(segmentation=[[10, 10, 20, 20]]))
    with pytest.raises(DataError, match=r"annotation \d+ has a polygon that is not a list of at least 3 x, y points"):
        CocoDetection(nuclei, "train")


def test_a_crowd_only_validation_set_says_there_is_no_ap(micro_detector: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    root = _copy(NUCLEI, tmp_path)
    _edit(root / "instances_val.json", lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    code, out, err = cli(capsys, "detect", "eval", "--checkpoint", str(micro_detector), "--data", str(root),
                         "--workers", "0")
    assert code == 0, err
    assert "no AP: " in out and "have no objects AP can count (every annotation is a crowd region" in out
    assert "bbox AP" not in out


def test_degenerate_crowd_and_empty_are_handled_as_mmdet(tmp_path: Path) -> None:
    """mmdet's CocoDataset: crowd and degenerate boxes leave the targets, an image with only those still trains
    (as background), only an image without any annotation is left out, and boxes are not clipped."""
    root = _copy(NUCLEI, tmp_path)

    def change(d: dict) -> None:
        anns = d["annotations"]
        first = [a for a in anns if a["image_id"] == d["images"][0]["id"]]
        first[0].update(bbox=[5, 5, 0.5, 8])  # below one pixel wide
        for a in first[1:]:
            a.update(iscrowd=1)  # the first image: one degenerate box, the rest crowd regions
        second = [a for a in anns if a["image_id"] == d["images"][1]["id"]]
        second[0].update(bbox=[250.0, 10.0, 20.0, 10.0])  # 6 of 20 px inside the 256 px tile: kept, not clipped
        d["annotations"] = [a for a in anns if a["image_id"] != d["images"][2]["id"]]  # the third: none at all

    _edit(root / "instances_train.json", change)
    data = CocoDetection(root, "train", train=True)
    crowd = sum(1 for a in data.coco.dataset["annotations"] if a.get("iscrowd"))
    assert data.dropped == {"crowd boxes": crowd, "degenerate boxes": 1, "images without annotations": 1}
    assert len(data) == 2 and len(data.targets[data.image_ids[0]]["boxes"]) == 0
    assert [250.0, 10.0, 270.0, 20.0] in data.targets[data.image_ids[1]]["boxes"].tolist()
    assert len(CocoDetection(root, "train")) == 3  # evaluation keeps every image
    image, target = data[0]  # an image of background only: an empty target the detector trains on
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, *image.shape[1:])


def test_unreadable_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = _copy(NUCLEI, tmp_path)
    (root / "images" / "nuclei_000_256.png").write_bytes(b"not a png")
    data = CocoDetection(root, "train", train=True)
    with pytest.warns(UserWarning, match="unreadable image"):
        images, targets, skipped = CocoDetection.collate([data[i] for i in range(len(data))])
    assert skipped == 1 and len(images) == len(targets) == 2


# -- evaluation -----------------------------------------------------------------------------------------


def _ground_truth_outputs(dataset: CocoDetection) -> list[tuple[int, dict]]:
    """Perfect detections: the ground truth as a detector's output."""
    outs = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        n = len(target["boxes"])
        out = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.linspace(1.0, 0.5, n)}
        if "masks" in target:
            out["masks"] = target["masks"].bool()[:, None]
        outs.append((int(target["image_id"]), out))
    return outs


def test_coco_ap_of_perfect_and_shifted_detections() -> None:
    data = CocoDetection(NUCLEI, "val")
    bbox, segm = [], []
    for image_id, out in _ground_truth_outputs(data):
        b, s = to_records(out, image_id, data.category_ids)
        bbox += b
        segm += s
    assert coco_ap(data.coco, bbox, "bbox", data.image_ids)["AP"] == pytest.approx(100.0)
    assert coco_ap(data.coco, segm, "segm", data.image_ids)["AP"] == pytest.approx(100.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + 0.5 * r["bbox"][2], *r["bbox"][1:]]} for r in bbox]
    assert coco_ap(data.coco, shifted, "bbox", data.image_ids)["AP"] < 10.0
    assert coco_ap(data.coco, [], "bbox", data.image_ids)["AP"] == 0.0


# -- scale invariance, evaluation and prediction from the command line ---------------------------------------


@pytest.fixture(scope="module")
def micro_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro detector for nuclei (random weights) saved as a detector folder."""
    torch.manual_seed(0)
    detector = create_detector("unified_convnext_micro", 1, min_size=128, max_size=128, fpn_channels=32)
    return save_detector(detector, tmp_path_factory.mktemp("det") / "micro", categories=["nucleus"])


def test_scale_invariance_by_box_consistency(micro_detector: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    # the standard scale is the checkpoint's own test scale (128 here), not 800: a detector trained and evaluated
    # small would otherwise be measured at a scale it never saw
    results, scales = run_scale_invariance(["unified_convnext_micro"], str(NUCLEI), [str(micro_detector)],
                                           factors=(0.5, 1.0, 2.0), reference_score=0.0, workers=0, out=tmp_path)
    assert scales == {"unified_convnext_micro": (128, 128)}
    by_factor = {r["factor"]: r for r in results["unified_convnext_micro"]}
    assert by_factor[1.0]["consistency"] == pytest.approx(100.0)  # the reference itself
    assert by_factor[0.5]["consistency"] < 100.0 and by_factor[2.0]["consistency"] < 100.0
    assert all(0.0 <= r["mAP"] <= 100.0 and r["boxes"] > 0 for r in by_factor.values())
    assert len(json.loads((tmp_path / "scale_invariance.json").read_text())) == 3
    assert Image.open(tmp_path / "scale_invariance.png").size[0] > 100
    assert (tmp_path / "scale_invariance.md").read_text().count("| x") == 3
    # the command says which scale it used and prints the table
    code, out, err = cli(capsys, "detect", "invariance", "unified_convnext_micro", "--checkpoint", str(micro_detector),
                         "--data", str(NUCLEI), "--factors", "1.0", "2.0", "--workers", "0", "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert "unified_convnext_micro: standard scale 128 x 128" in out and "| x2 |" in out


def test_detect_eval_and_predict_commands(micro_detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokenmixers_cli.main(["detect", "eval", "--checkpoint", str(micro_detector), "--data", str(NUCLEI),
                          "--workers", "0", "--out", str(tmp_path / "ap.json")])
    printed = capsys.readouterr().out
    assert "bbox AP " in printed and "segm AP " in printed and "(1 images)" in printed
    assert "test scale 128 x 128 (from the checkpoint)" in printed  # the folder's own scale, said
    assert set(json.loads((tmp_path / "ap.json").read_text())) == {"images", "skipped_images", "bbox", "segm",
                                                                    "test_scale", "test_scale_from"}
    image = NUCLEI / "images" / "nuclei_256_256.png"
    tokenmixers_cli.main(["detect", "predict", str(image), "--checkpoint", str(micro_detector), "--out",
                          str(tmp_path / "pred.png"), "--score-threshold", "0.0"])
    drawn = Image.open(tmp_path / "pred.png")
    assert drawn.size == Image.open(image).size and drawn.mode == "RGB"
    assert np.asarray(drawn).std(axis=2).max() > 0  # coloured boxes on a grey image
    with pytest.raises(SystemExit):
        tokenmixers_cli.main(["detect", "predict", str(tmp_path / "ap.json"), "--checkpoint", str(micro_detector)])
    assert "is not a readable image" in capsys.readouterr().err
