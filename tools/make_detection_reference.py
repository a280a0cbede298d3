"""Write the detection references in ``tests/data/detection/`` by running mmdetection 2.28.2 itself.

What it runs, in float64 on the CPU, in eval mode:

- **Mask R-CNN** exactly as the official STM-Evaluation config builds it
  (``detection/configs/unified_models/unified_<x>/mask_rcnn_<x>_micro.py`` over ``../mask_rcnn_meta.py`` over
  mmdet's ``_base_/models/mask_rcnn_r50_fpn.py``, ``_base_/datasets/coco_instance.py``,
  ``_base_/schedules/schedule_1x.py``, ``_base_/default_runtime.py``; the ``_base_`` files are the ones shipped in
  the mmdet 2.28.2 wheel, which equal the official repository's copies but for ``data_root``) on the official
  ``unified_convnext_micro`` and ``unified_swin_micro`` detection backbones, ``backbone.pretrained=None``, 80 classes;
- **RetinaNet** in the PVT setting of Twins (Meituan-AutoML/Twins ``detection/configs/
  retinanet_pcpvt_s_fpn_1x_coco_pvt_setting.py``): mmdet's ``_base_/models/retinanet_r50_fpn.py`` with the backbone
  replaced by the official ``unified_convnext_micro`` detection backbone (its kwargs as in its Mask R-CNN config) and
  the neck ``FPN(in_channels=<4 widths>, out_channels=256, start_level=1, add_extra_convs='on_input', num_outs=5)``;
- **Cascade Mask R-CNN** exactly as DWNet's config builds it (Atten4Vis/DemystifyLocalViT ``downstreams/detection/
  configs/dwnet/cascade_mask_rcnn_dwnet_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py`` over
  its ``_base_`` files, all from that repository) on the official DWNet-T detection backbone (its
  ``downstreams/detection/mmdet/models/backbones/dwnet.py``, registered in mmdet 2.28.2's BACKBONES) and, with the
  backbone replaced, on the official ``unified_convnext_micro`` detection backbone (neck ``in_channels`` = its widths).
  mmdet's own ``CascadeRoIHead`` runs it, on the two images at half the test scale (``--cascade-scale``, 333x200,
  tagged ``<tag>_small``), keeping 40 RPN proposals per image (``CASCADE_PROPOSALS``) instead of 1000, so that the
  float64 test stays quick.

Inputs are real JPEGs from ``../shared/data/imagenet-mini`` put through mmdet's own test pipeline
(``LoadImageFromFile`` / ``MultiScaleFlipAug(img_scale=(1333, 800))`` -> ``Resize(keep_ratio)`` / ``Normalize`` /
``Pad(size_divisor=32)``). Every weight comes from the key-seeded recipe of ``tests/reference.py`` (the backbone by its
official key without ``backbone.``, i.e. ``paper_detection_state_dict``; every other tensor by its full mmdet key),
with only the classification weight scaled (``CLS_SCALE``: Mask R-CNN x0.55 so that tens of detections pass
``score_thr``; RetinaNet x1, for which no weight scale helps). See
``tests/data/detection/README.md`` for what is stored and how to check against it.

Nothing here is imported by the package or the tests; mmcv/mmdet live in a scratch folder, never in the venv:

    .venv/bin/python tools/make_detection_reference.py \\
        [--mmlab ../scratch/mmlab] [--official ../scratch/official] \\
        [--mirror ../.mirror/OpenGVLab+STM-Evaluation/repo] [--twins-mirror ../.mirror/Meituan-AutoML+Twins/repo]

``--mmlab`` gets mmcv 1.7.2 / mmseg 0.30.0 (as ``make_segmentation_reference.py`` installs them) and mmdet 2.28.2
(pip ``--target``, ``--no-deps``) when they are missing; ``--official`` is made from the git mirror with
``../shared/tools/official_setup.py`` when missing; the Twins mirror is only read to check the neck settings.
All files take about 2 minutes on 2 CPU threads; two runs give bit-identical npz/png files (JSON: only the seconds).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "tests" / "data" / "detection"
sys.path.insert(0, str(REPO))
from tests.reference import official_state_dict, paper_detection_state_dict  # noqa: E402  (the project's recipe)
from tools.make_segmentation_reference import (  # noqa: E402
    DWNET_FILES,
    MIRRORS,
    common_arguments,
    dump_json,
    ensure_official,
    git_head,
    install_mmlab,
    register_dwnet,
)

MMDET, MMCV = "2.28.2", "1.7.2"
# paper model -> its official Mask R-CNN config, relative to detection/configs/
MASK_RCNN = {
    "unified_convnext_micro": "unified_models/unified_convnext/mask_rcnn_convnext_micro.py",
    "unified_swin_micro": "unified_models/unified_swin/mask_rcnn_swin_micro.py",
}
RETINANET_BACKBONE = "unified_convnext_micro"
TWINS_CONFIG = "detection/configs/retinanet_pcpvt_s_fpn_1x_coco_pvt_setting.py"
DWNET_CONFIG = "dwnet/cascade_mask_rcnn_dwnet_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py"
CASCADE = ("dwnet_tiny", "unified_convnext_micro")  # backbones of the cascade references
CASCADE_PROPOSALS = 40  # test_cfg.rpn.max_per_img (the config: 1000) -- 3 stages of 4 convs per RoI in float64
# the classification layers' weights are multiplied by these (their biases are not), measured on the two images:
# - Mask R-CNN: with the recipe's weights (x1) the softmax scores reach 0.2-0.3 and every image fills the cap of
#   max_per_img=100 detections (1,500+ class scores over score_thr=0.05); x0.55 flattens them so that tens of
#   detections pass score_thr (x0.5: 1-12, x0.6: 47-100) and the cap is not reached;
# - RetinaNet: no factor helps: the recipe's classifier biases are ~0 (0.1 * randn), so nearly every one of the
#   ~13M anchor x class sigmoid scores is near 0.5, far over score_thr, for any weight scale (x20 even saturates
#   scores to exact 1.0 ties); kept at x1: 100 detections per image, the per-level top-1000 and the cap do the
#   selecting. See README.md.
# - Cascade: the score is the softmax of the three stages' mean logits; every stage's class weight gets the factor.
CLS_SCALE = {"mask_rcnn": 0.55, "retinanet": 1.0, "cascade": 1.0}
CASCADE_CLS_SCALE = {"dwnet_tiny": 0.75, "unified_convnext_micro": 2.8}  # per backbone: tens of detections, under 100
CLS_KEY = {"mask_rcnn": ["roi_head.bbox_head.fc_cls.weight"], "retinanet": ["bbox_head.retina_cls.weight"],
           "cascade": [f"roi_head.bbox_head.{i}.fc_cls.weight" for i in range(3)]}
# name -> image (relative to ../shared/data); one landscape, one portrait, neither side a multiple of 32 after resizing
IMAGES = {
    "landscape": "imagenet-mini/val/ILSVRC2012_val_00000078.JPEG",  # 500 x 359 (w x h)
    "portrait": "imagenet-mini/val/ILSVRC2012_val_00000098.JPEG",  # 386 x 500
}
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
RPN_KEEP = 1000  # proposals stored (all of them: test_cfg.rpn.max_per_img)


# ---------------------------------------------------------------- mmcv / mmdet on the CPU

class _Ext(types.ModuleType):
    """Stand-in for mmcv's compiled ``mmcv._ext``: torchvision's ``nms`` / ``roi_align``, every other op raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"mmcv._ext.{name} is not built")
        return missing

    @staticmethod
    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
        assert offset == 0, offset
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    @staticmethod
    def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                          argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                          sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
        assert pool_mode == 1, pool_mode  # 'avg'
        output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                               sampling_ratio, aligned))


def install_mmdet(target: Path) -> None:
    if not (target / "mmseg").is_dir() or not (target / "mmcv").is_dir():
        install_mmlab(target)
    if not (target / "mmdet").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--target", str(target), "--no-deps", f"mmdet=={MMDET}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def import_mmdet(mmlab: Path, official: Path) -> types.ModuleType:
    """Import mmdet with the ``mmcv._ext`` stand-in and register the official backbones in its BACKBONES."""
    sys.path.insert(0, str(mmlab))
    sys.modules["mmcv._ext"] = _Ext("mmcv._ext")
    import mmcv
    import mmdet
    assert (mmdet.__version__, mmcv.__version__) == (MMDET, MMCV), (mmdet.__version__, mmcv.__version__)
    # the real mmdet registry this time (not official_setup's stubs): `import mmdet_custom` registers Unified*
    sys.path[:0] = [str(official / "detection"), str(official / "classification")]
    import mmdet_custom  # noqa: F401
    patch_mask_paste()
    return mmdet


def patch_mask_paste() -> None:
    """float64 mask pasting: ``fcn_mask_head._do_paste_mask`` casts the mask probabilities to float32 before
    ``F.grid_sample``; this re-defines the function from its own source with that one cast removed."""
    from mmdet.models.roi_heads.mask_heads import fcn_mask_head as module
    source = inspect.getsource(module._do_paste_mask)
    old = "masks.to(dtype=torch.float32), grid, align_corners=False)"
    assert source.count(old) == 1
    exec(compile(source.replace(old, "masks, grid.to(masks.dtype), align_corners=False)"), module.__file__, "exec"),
         module.__dict__)


# ---------------------------------------------------------------- configs

def config_folder(mmdet: types.ModuleType, official: Path, scratch: Path) -> Path:
    """``detection/configs`` of the official code with ``_base_`` = the mmdet wheel's configs/_base_."""
    folder = scratch / "configs"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(official / "detection" / "configs", folder)
    shutil.copytree(Path(mmdet.__file__).parent / ".mim" / "configs" / "_base_", folder / "_base_")
    return folder


def check_base_equals_official(folder: Path, mirror: Path) -> list[str]:
    """The wheel's ``_base_`` files used here against the official repository's copies: only ``data_root`` differs."""
    import mmcv
    notes = []
    for rel in ("models/mask_rcnn_r50_fpn.py", "datasets/coco_instance.py", "schedules/schedule_1x.py",
                "default_runtime.py"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(rel).name
            path.write_text(git_head(mirror, f"detection/configs/_base_/{rel}"))
            theirs = mmcv.Config.fromfile(str(path)).to_dict()
        ours = mmcv.Config.fromfile(str(folder / "_base_" / rel)).to_dict()
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if rel.startswith("datasets"):
            # data_root changes the data paths only, never the pipelines
            assert ours["test_pipeline"] == theirs["test_pipeline"] and set(differ) <= {"data_root", "data"}, differ
        else:
            assert not differ, (rel, differ)
        notes.append(f"_base_/{rel}: " + (f"differs from the official copy in {differ} only" if differ else "same"))
    return notes


def mask_rcnn_config(folder: Path, name: str) -> Any:
    import mmcv
    cfg = mmcv.Config.fromfile(str(folder / MASK_RCNN[name]))
    cfg.model.backbone.pretrained = None
    assert cfg.model.roi_head.bbox_head.num_classes == 80 and cfg.model.roi_head.mask_head.num_classes == 80
    return cfg


def retinanet_config(folder: Path, twins_mirror: Path, backbone: dict) -> tuple[Any, dict]:
    """mmdet's retinanet_r50_fpn with the official backbone and the Twins PVT-setting neck (in_channels = widths)."""
    import mmcv
    cfg = mmcv.Config.fromfile(str(folder / "_base_" / "models" / "retinanet_r50_fpn.py"))
    cfg.merge_from_dict({"data": mmcv.Config.fromfile(str(folder / "_base_" / "datasets" / "coco_detection.py")).data})
    cfg.model.backbone = mmcv.ConfigDict(backbone)
    neck = dict(type="FPN", in_channels=list(backbone["dims"]), out_channels=256, start_level=1,
                add_extra_convs="on_input", num_outs=5)
    twins = {"repo": "Meituan-AutoML/Twins", "config": TWINS_CONFIG}
    if twins_mirror.is_dir():
        text = git_head(twins_mirror, TWINS_CONFIG)
        twins["commit"] = git_head(twins_mirror).strip()
        # the file's `model` alone (its _base_ list names Twins' own copies of mmdet 2.0 base configs)
        ns: dict = {}
        exec(text.split("# optimizer")[0].replace("_base_ = [", "_unused = ["), ns)
        theirs = ns["model"]["neck"]
        assert {**theirs, "in_channels": None} == {**neck, "in_channels": None}, theirs
        twins["neck"] = theirs
    else:
        print(f"no Twins mirror at {twins_mirror}: the neck settings are not checked against it")
    cfg.model.neck = mmcv.ConfigDict(neck)
    assert cfg.model.bbox_head.num_classes == 80
    return cfg, twins


def cascade_config(dwnet_mirror: Path, scratch: Path, name: str, paper_backbone: Optional[dict]) -> Any:
    """DWNet's cascade config from its own repository's files; ``paper_backbone`` replaces DWNet-T's backbone."""
    import mmcv
    folder = scratch / "dwnet-configs"
    if folder.exists():
        shutil.rmtree(folder)
    for rel in (DWNET_CONFIG, "_base_/models/cascade_mask_rcnn_dwnet_fpn.py", "_base_/datasets/coco_instance.py",
                "_base_/schedules/schedule_1x.py", "_base_/default_runtime.py"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(git_head(dwnet_mirror, f"downstreams/detection/configs/{rel}"))
    cfg = mmcv.Config.fromfile(str(folder / DWNET_CONFIG))
    heads = cfg.model.roi_head.bbox_head
    assert [h.type for h in heads] == ["ConvFCBBoxHead"] * 3 and not any(h.reg_class_agnostic for h in heads)
    assert all(h.reg_decoded_bbox and h.loss_bbox.type == "GIoULoss" for h in heads)
    if paper_backbone is not None:
        cfg.model.backbone = mmcv.ConfigDict(paper_backbone)
        cfg.model.neck.in_channels = list(paper_backbone["dims"])
    cfg.model.test_cfg.rpn.max_per_img = CASCADE_PROPOSALS
    return cfg


# ---------------------------------------------------------------- inputs

def load_input(cfg: Any, path: Path, scale: tuple[int, int]) -> tuple[np.ndarray, dict, torch.Tensor]:
    """mmdet's test pipeline on one image: returns (resized RGB uint8 image, img_meta, float64 input).

    The float64 input is ``(rgb - mean) / std`` of the resized uint8 image in float64, zero-padded at the bottom and
    right to ``pad_shape`` -- what mmdet's pipeline computes in float32 (checked here to 1e-5).
    """
    from mmdet.datasets.builder import PIPELINES
    from mmdet.datasets.pipelines import Compose
    resized: list[np.ndarray] = []

    @PIPELINES.register_module(force=True)
    class _KeepResized:  # noqa: N801  (a pipeline step that records the resized uint8 image)
        def __call__(self, results: dict) -> dict:
            resized.append(results["img"].copy())
            return results

    pipeline = copy.deepcopy(cfg.data.test.pipeline)
    steps = pipeline[1]["transforms"]
    assert pipeline[1]["type"] == "MultiScaleFlipAug" and steps[0]["type"] == "Resize", pipeline
    pipeline[1]["img_scale"] = tuple(scale)  # the released test scale is (1333, 800); smaller keeps the tests quick
    steps.insert(1, dict(type="_KeepResized"))
    data = Compose(pipeline)(dict(img_info=dict(filename=str(path)), img_prefix=None))
    img32 = data["img"][0]
    meta = data["img_metas"][0].data
    (bgr,) = resized
    assert bgr.dtype == np.uint8 and bgr.shape == meta["img_shape"]
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    x = build_input(rgb, meta["pad_shape"])
    assert float((x[0].float() - img32).abs().max()) < 1e-5
    meta = {k: meta[k] for k in ("filename", "ori_filename", "ori_shape", "img_shape", "pad_shape", "scale_factor",
                                 "flip", "flip_direction")}
    meta["batch_input_shape"] = tuple(x.shape[2:])
    return rgb, meta, x


def build_input(rgb: np.ndarray, pad_shape: tuple) -> torch.Tensor:
    """The float64 network input from the resized RGB uint8 image (the recipe stated in README.md)."""
    norm = (torch.from_numpy(rgb).double() - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    x = torch.zeros(1, 3, pad_shape[0], pad_shape[1], dtype=torch.float64)
    x[0, :, : rgb.shape[0], : rgb.shape[1]] = norm.permute(2, 0, 1)
    return x


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- weights and models

def recipe_state(model: torch.nn.Module, name: str, kind: str) -> tuple[dict[str, torch.Tensor], list, list]:
    """The detector's weights in mmdet's layout: ``backbone.<official key>`` seeded by the official key, every other
    tensor by its full mmdet key, ``num_batches_tracked`` as constructed, the classification weight scaled."""
    own = model.state_dict()
    constructed = [k for k in own if k.endswith("num_batches_tracked")]
    drawn = [(k, list(v.shape)) for k, v in own.items() if k not in constructed]
    backbone = [(k[len("backbone."):], shape) for k, shape in drawn if k.startswith("backbone.")]
    state = {f"backbone.{k}": v for k, v in official_state_dict(backbone).items()}
    if name.startswith("unified_"):
        paper = paper_detection_state_dict(name)  # the same tensors, by the project's own helper
        assert sorted(paper) == sorted(state) and all(torch.equal(paper[k], state[k]) for k in paper), name
    state.update(official_state_dict([(k, s) for k, s in drawn if not k.startswith("backbone.")]))
    state.update({k: own[k] for k in constructed})
    for key in CLS_KEY[kind]:
        state[key] = state[key] * cls_scale(kind, name)
    entries = [[k, list(v.shape)] for k, v in own.items()]
    return state, entries, constructed


def cls_scale(kind: str, name: str) -> float:
    return CASCADE_CLS_SCALE[name] if kind == "cascade" else CLS_SCALE[kind]


def build(cfg: Any, name: str, kind: str) -> tuple[torch.nn.Module, list, list]:
    from mmdet.models import build_detector
    model = build_detector(copy.deepcopy(cfg.model)).double()
    state, entries, constructed = recipe_state(model, name, kind)
    model.load_state_dict(state, strict=True)
    return model.eval(), entries, constructed


# ---------------------------------------------------------------- running

def gaps(scores: np.ndarray) -> Optional[float]:
    """Smallest difference between two scores (how safe comparing orders is); None for fewer than 2."""
    s = np.sort(scores)
    return float(np.diff(s).min()) if len(s) > 1 else None


def topk_gap(scores: torch.Tensor, k: int) -> Optional[float]:
    """Gap between the k-th and (k+1)-th largest score (how safe a top-k cut is); None when there are <= k."""
    if scores.numel() <= k:
        return None
    top = scores.flatten().topk(k + 1).values
    return float(top[k - 1] - top[k])


def per_class(bbox_result: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """mmdet's per-class ``[(n_c, 5)] * 80`` flattened in class order: (n, 5) boxes+scores and (n,) labels."""
    boxes = np.concatenate(bbox_result, 0) if bbox_result else np.zeros((0, 5))
    labels = np.concatenate([np.full(len(b), c, dtype=np.int64) for c, b in enumerate(bbox_result)])
    return boxes, labels


def pack_masks(segm_result: list[list[np.ndarray]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    masks = [m for cls in segm_result for m in cls]
    stack = np.stack(masks).astype(bool) if masks else np.zeros((0, *shape), dtype=bool)
    assert stack.shape[1:] == tuple(shape), (stack.shape, shape)
    return np.packbits(stack.reshape(-1)), np.array(stack.shape)


def run_mask_rcnn(model: torch.nn.Module, x: torch.Tensor, meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    metas = [meta]
    roi = model.roi_head
    with torch.no_grad():
        feats = model.extract_feat(x)
        proposals = model.rpn_head.simple_test_rpn(feats, metas)[0]
        det_boxes, det_labels = roi.simple_test_bboxes(feats, metas, [proposals], roi.test_cfg, rescale=True)
        (bbox_true, segm_true), = model.simple_test(x, metas, rescale=True)  # the whole thing, as mmdet tests it
        (bbox_false, segm_false), = roi.simple_test(feats, [proposals], metas, rescale=False)
        # the pre-NMS class scores of all proposals (to see how far the candidates are from score_thr)
        rois = proposals.new_zeros(len(proposals), 5)
        rois[:, 1:] = proposals[:, :4]
        cls_prob = torch.softmax(roi._bbox_forward(feats, rois)["cls_score"], -1)[:, :-1]
        objectness = [s.sigmoid() for s in model.rpn_head(feats)[0]]
    assert proposals.dtype == torch.float64 and det_boxes[0].dtype == torch.float64
    boxes, labels = per_class(bbox_true)
    boxes_f, labels_f = per_class(bbox_false)
    masks, mask_shape = pack_masks(segm_true, meta["ori_shape"][:2])
    masks_f, mask_shape_f = pack_masks(segm_false, meta["img_shape"][:2])
    out = {
        "proposals": proposals[:RPN_KEEP].numpy(),  # (n, 5): x1 y1 x2 y2 score, mmdet's order
        "det_bboxes": det_boxes[0].numpy(), "det_labels": det_labels[0].numpy(),  # multiclass_nms order, rescaled
        "bboxes": boxes, "labels": labels, "masks": masks, "mask_shape": mask_shape,  # per class, rescale=True
        "bboxes_noscale": boxes_f, "labels_noscale": labels_f, "masks_noscale": masks_f,
        "mask_shape_noscale": mask_shape_f,
    }
    p = cls_prob.flatten().numpy()
    margins = {
        "detections": int(len(labels)),
        "proposals": int(len(proposals)),
        "proposal_score_min_gap": gaps(proposals[:, 4].numpy()),
        "rpn_nms_pre_gap_per_level": [topk_gap(o, model.rpn_head.test_cfg.nms_pre) for o in objectness],
        "detection_score_min_gap": gaps(boxes[:, 4]),
        "candidates_over_score_thr": int((p > roi.test_cfg.score_thr).sum()),
        "closest_class_score_to_score_thr": float(np.abs(p - roi.test_cfg.score_thr).min()),
        "detections_per_class_max": int(np.bincount(labels, minlength=80).max()) if len(labels) else 0,
    }
    assert (boxes[:, 4] > roi.test_cfg.score_thr).all() and len(boxes) == len(det_boxes[0])
    return out, margins


def run_retinanet(model: torch.nn.Module, x: torch.Tensor, meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    metas = [meta]
    with torch.no_grad():
        feats = model.extract_feat(x)
        (det_boxes, det_labels), = model.bbox_head.simple_test(feats, metas, rescale=True)
        bbox_true, = model.simple_test(x, metas, rescale=True)
        cfg = model.bbox_head.test_cfg
        cfg.max_per_img += 1  # one more, to see the score gap at the cut
        (one_more, _), = model.bbox_head.simple_test(feats, metas, rescale=True)
        cfg.max_per_img -= 1
        assert torch.equal(one_more[:len(det_boxes)], det_boxes)
        levels = [s.sigmoid() for s in model.bbox_head(feats)[0]]
        scores = torch.cat([s.flatten() for s in levels]).numpy()
    assert det_boxes.dtype == torch.float64
    boxes, labels = per_class(bbox_true)
    out = {"det_bboxes": det_boxes.numpy(), "det_labels": det_labels.numpy(), "bboxes": boxes, "labels": labels}
    margins = {
        "detections": int(len(labels)),
        "detection_score_min_gap": gaps(boxes[:, 4]),
        "max_per_img_gap": float(det_boxes[-1, 4] - one_more[-1, 4]) if len(one_more) > len(det_boxes) else None,
        "anchor_scores_over_score_thr": int((scores > cfg.score_thr).sum()),
        "nms_pre_gap_per_level": [topk_gap(s[s > cfg.score_thr], cfg.nms_pre) for s in levels],
        "closest_anchor_score_to_score_thr": float(np.abs(scores - cfg.score_thr).min()),
    }
    return out, margins


def run_cascade(model: torch.nn.Module, x: torch.Tensor, meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    """mmdet's ``CascadeRoIHead``: each stage's input boxes, best logit and class, and the final detections."""
    from mmdet.core import bbox2roi
    metas = [meta]
    roi = model.roi_head
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        feats = model.extract_feat(x)
        proposals = model.rpn_head.simple_test_rpn(feats, metas)[0]
        rois, logits, label_gaps = bbox2roi([proposals[:, :4]]), [], []
        for i in range(roi.num_stages):  # simple_test's loop, one image
            result = roi._bbox_forward(i, feats, rois)
            score, pred = result["cls_score"], result["bbox_pred"]
            out[f"stage{i}_boxes"] = rois[:, 1:].numpy()
            out[f"stage{i}_max_logit"], out[f"stage{i}_label"] = (v.numpy() for v in score[:, :-1].max(1))
            logits.append(score)
            top2 = score[:, :-1].topk(2, dim=1).values
            label_gaps.append(float((top2[:, 0] - top2[:, 1]).min()))  # how safe each stage's argmax class is
            if i < roi.num_stages - 1:
                rois = roi.bbox_head[i].regress_by_class(rois, score[:, :-1].argmax(1), pred, meta)
        mean = sum(logits) / float(len(logits))
        det_boxes, det_labels = roi.bbox_head[-1].get_bboxes(rois, mean, pred, meta["img_shape"], meta["scale_factor"],
                                                             rescale=False, cfg=roi.test_cfg)
        (bbox_true, segm_true), = model.simple_test(x, metas, rescale=True)
        (bbox_false, segm_false), = roi.simple_test(feats, [proposals], metas, rescale=False)
        probs = torch.softmax(mean, -1)[:, :-1].flatten().numpy()
    boxes, labels = per_class(bbox_true)
    boxes_f, labels_f = per_class(bbox_false)
    masks, mask_shape = pack_masks(segm_true, meta["ori_shape"][:2])
    out.update({
        "proposals": proposals.numpy(), "det_bboxes": det_boxes.numpy(), "det_labels": det_labels.numpy(),
        "bboxes": boxes, "labels": labels, "masks": masks, "mask_shape": mask_shape,
        "bboxes_noscale": boxes_f, "labels_noscale": labels_f,
    })
    assert np.allclose(np.sort(boxes_f[:, 4]), np.sort(det_boxes[:, 4].numpy()), rtol=0, atol=0)
    margins = {
        "detections": int(len(labels)), "proposals": int(len(proposals)),
        "proposal_score_min_gap": gaps(proposals[:, 4].numpy()),
        "detection_score_min_gap": gaps(boxes[:, 4]),
        "candidates_over_score_thr": int((probs > roi.test_cfg.score_thr).sum()),
        "closest_class_score_to_score_thr": float(np.abs(probs - roi.test_cfg.score_thr).min()),
        "stage_label_logit_gap_min": label_gaps,
    }
    # under the cap of max_per_img, and under mmcv's batched_nms split_thr (10000), where it switches to per-class NMS
    assert len(labels) < roi.test_cfg.max_per_img and margins["candidates_over_score_thr"] < 10000, margins
    return out, margins


def savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)
    size = path.stat().st_size
    print(f"  {path.name}: {size / 1024:.0f} KiB", flush=True)
    assert size < 300 * 1024, f"{path} is {size} bytes"


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser, "mmcv/mmseg/mmdet")
    parser.add_argument("--twins-mirror", type=Path, default=MIRRORS / "Meituan-AutoML+Twins" / "repo")
    parser.add_argument("--dwnet-mirror", type=Path, default=MIRRORS / "Atten4Vis+DemystifyLocalViT" / "repo")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--test-scale", type=int, nargs=2, default=(666, 400), metavar=("LONG", "SHORT"),
                        help="the test pipeline's img_scale (released: 1333 800; half of it keeps the tests quick)")
    parser.add_argument("--cascade-scale", type=int, nargs=2, default=(333, 200), metavar=("LONG", "SHORT"),
                        help="the cascade references' img_scale (their images are tagged <tag>_small)")
    parser.add_argument("--models", nargs="*", default=[*(f"mask_rcnn_{n}" for n in MASK_RCNN),
                                                         f"retinanet_{RETINANET_BACKBONE}",
                                                         *(f"cascade_mask_rcnn_{n}" for n in CASCADE)])
    args = parser.parse_args()

    install_mmdet(args.mmlab)
    ensure_official(args.official, args.mirror)
    mmdet = import_mmdet(args.mmlab, args.official)
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = config_folder(mmdet, args.official, args.mmlab.with_name(args.mmlab.name + "-det"))
    base_notes = check_base_equals_official(folder, args.mirror)
    official_commit = git_head(args.mirror).strip()
    meta_common = {"mmdet": MMDET, "mmcv": MMCV, "torch": torch.__version__, "torchvision": torchvision.__version__,
                   "official": {"repo": "OpenGVLab/STM-Evaluation", "commit": official_commit},
                   "dtype": "float64", "device": "cpu", "threads": torch.get_num_threads()}

    # inputs: the same test pipeline for both detectors (coco_instance's == coco_detection's, checked)
    first = mask_rcnn_config(folder, next(iter(MASK_RCNN)))
    inputs = {}
    image_record = {}
    scales = {tag: args.test_scale for tag in IMAGES} | {f"{tag}_small": args.cascade_scale for tag in IMAGES}
    for tag, scale in scales.items():
        rel = IMAGES[tag.removesuffix("_small")]
        rgb, meta, x = load_input(first, SHARED / "data" / rel, scale)
        png = png_bytes(rgb)
        (args.out / f"input_{tag}.png").write_bytes(png)
        inputs[tag] = (meta, x)
        image_record[tag] = {
            "source": f"../shared/data/{rel}", "png": f"input_{tag}.png", "test_scale": list(scale),
            "png_sha256": hashlib.sha256(png).hexdigest(),
            "ori_shape": list(meta["ori_shape"]), "img_shape": list(meta["img_shape"]),
            "pad_shape": list(meta["pad_shape"]), "batch_input_shape": list(meta["batch_input_shape"]),
            "scale_factor": [float(v) for v in meta["scale_factor"]],  # float32 values, as mmdet stores them
            "input_sum": float(x.sum()), "input_abs_sum": float(x.abs().sum()),
            "input_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),  # (1, 3, H, W) float64, C order
        }
        print(f"{tag}: {rel} {meta['ori_shape']} -> {meta['img_shape']} padded {meta['pad_shape']}", flush=True)
    (args.out / "inputs.json").write_text(json.dumps({
        "pipeline": jsonable(first.data.test.pipeline), "test_scale": list(args.test_scale),
        "cascade_test_scale": list(args.cascade_scale),
        "mean_rgb": MEAN.tolist(), "std_rgb": STD.tolist(),
        "rebuild": "x = zeros(1, 3, *pad_shape[:2]); x[0, :, :h, :w] = ((png_rgb_uint8 - mean) / std) (all float64, "
                   "mean/std too; HWC -> CHW); the PNG is mmdet's resized image (cv2 bilinear), BGR -> RGB",
        "images": image_record}, indent=1) + "\n")

    dwnet_commit = None
    for model_name in args.models:
        kind = next(k for k in ("mask_rcnn", "retinanet", "cascade_mask_rcnn") if model_name.startswith(k + "_"))
        name = model_name[len(kind) + 1:]
        kind = "cascade" if kind == "cascade_mask_rcnn" else kind
        start = time.time()
        if kind == "mask_rcnn":
            cfg, extra = mask_rcnn_config(folder, name), {"config_files": [
                f"official detection/configs/{MASK_RCNN[name]}", "official detection/configs/unified_models/"
                "mask_rcnn_meta.py", *(f"mmdet {MMDET} wheel .mim/configs/{n}" for n in (
                    "_base_/models/mask_rcnn_r50_fpn.py", "_base_/datasets/coco_instance.py",
                    "_base_/schedules/schedule_1x.py", "_base_/default_runtime.py"))], "base_check": base_notes}
        elif kind == "cascade":
            if dwnet_commit is None:
                dwnet_commit = register_dwnet(args.dwnet_mirror, args.mmlab.with_name(args.mmlab.name + "-dwnet-det"),
                                              "mmdet")
            paper = None if name == "dwnet_tiny" else dict(mask_rcnn_config(folder, name).model.backbone)
            cfg = cascade_config(args.dwnet_mirror, args.mmlab.with_name(args.mmlab.name + "-det"), name, paper)
            assert jsonable(cfg.data.test.pipeline) == jsonable(first.data.test.pipeline)
            extra = {"config_files": [f"DemystifyLocalViT downstreams/detection/configs/{DWNET_CONFIG}",
                                      "DemystifyLocalViT downstreams/detection/configs/_base_/models/"
                                      "cascade_mask_rcnn_dwnet_fpn.py (and its datasets/schedules/runtime _base_)"],
                     "dwnet": {"repo": "Atten4Vis/DemystifyLocalViT", "commit": dwnet_commit,
                               "backbone_code": DWNET_FILES["mmdet"]},
                     "changed": {"test_cfg.rpn.max_per_img": [1000, CASCADE_PROPOSALS]}
                     | ({"backbone": f"official {name} (detection/configs/{MASK_RCNN[name]})",
                         "neck.in_channels": list(paper["dims"])} if paper else {})}
        else:
            backbone = dict(mask_rcnn_config(folder, name).model.backbone)
            cfg, twins = retinanet_config(folder, args.twins_mirror, backbone)
            assert jsonable(cfg.data.test.pipeline) == jsonable(first.data.test.pipeline)
            extra = {"config_files": [f"mmdet {MMDET} wheel .mim/configs/_base_/models/retinanet_r50_fpn.py",
                                      f"mmdet {MMDET} wheel .mim/configs/_base_/datasets/coco_detection.py (pipeline)",
                                      f"backbone: official detection/configs/{MASK_RCNN[name]} (pretrained=None)"],
                     "neck_from": twins}
        model, entries, constructed = build(cfg, name, kind)
        params = sum(p.numel() for p in model.parameters())
        head = model.bbox_head if kind == "retinanet" else model.rpn_head
        assert all(a.dtype == torch.float32 for a in head.prior_generator.base_anchors)
        if model_name == "mask_rcnn_unified_convnext_micro":
            assert params == 23_983_696, params
        margins = {}
        for tag, (meta, x) in inputs.items():
            if tag.endswith("_small") != (kind == "cascade"):
                continue
            t0 = time.time()
            run = {"mask_rcnn": run_mask_rcnn, "retinanet": run_retinanet, "cascade": run_cascade}[kind]
            arrays, margins[tag] = run(model, x, meta)
            margins[tag]["seconds"] = round(time.time() - t0, 1)
            print(f"{model_name} {tag}: {margins[tag]}", flush=True)
            savez(args.out / f"{model_name}_{tag}.npz", arrays)
        record = {
            "detector": kind, "backbone": name, **meta_common, **extra,
            "cls_scale": {"keys": CLS_KEY[kind], "factor": cls_scale(kind, name)},
            "seed": "backbone.<k>: official_state_dict([(k, shape)]) (= paper_detection_state_dict); every other key: "
                    "official_state_dict([(key, shape)]) by its full mmdet key; then state[cls_scale.key] *= factor",
            "inputs": sorted(margins), "margins": margins, "parameters": params,
            "seconds": round(time.time() - start, 1),
            # mmdet computes these in float32 (AnchorGenerator keeps scales/ratios as torch.Tensor) and casts them to
            # the features' dtype; (x1, y1, x2, y2) around (0, 0), ratio-major, per level; anchors = these + stride*(x, y)
            "base_anchors": [a.tolist() for a in head.prior_generator.base_anchors],
            "config": jsonable(cfg.model.to_dict()),
            "entries": entries, "constructed": constructed,
        }
        (args.out / f"{model_name}.json").write_text(dump_json(record))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
