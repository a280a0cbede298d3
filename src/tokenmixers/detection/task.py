"""Detection training: the detection task of the run engine, with the official Mask R-CNN recipe.

``train(recipe, overrides)`` trains a :func:`~tokenmixers.detection.create_detector` Mask R-CNN (with
``detector=cascade_mask_rcnn`` its cascade; with ``detector=retinanet`` a
:func:`~tokenmixers.detection.create_retinanet` RetinaNet) on a COCO-format folder and returns its summary.
Recipes are YAML files in ``recipes/detection`` (``mask_rcnn_1x``, ``mask_rcnn_3x``, ``cascade_mask_rcnn_3x``,
``retinanet_1x``, ``smoke``) or any path, with ``key=value`` overrides. The
schedule is mmdetection's ``step`` policy (linear warm-up over ``warmup_iters`` steps from
``warmup_ratio`` x lr, then x ``gamma`` after each epoch in ``milestones``); AdamW decaying exactly
what the official config decays (:func:`param_groups`); fp32; evaluation one image at a time;
``best.pth`` by bbox AP. Everything else a run does
is the engine's (:mod:`tokenmixers.runs`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import runs
from ..coco import countable_objects
from ..data import DataError
from ..recipe import Overrides
from ..runs import RunError, RunSettings, Task
from ..zoo import check_model_name, family_of
from .data import CocoDetection
from .detector import Detector, create_detector, load_detector_weights
from .evaluate import evaluate_detector
from .retinanet import create_retinanet, load_retinanet_weights

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "detection"
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
RETINANET_LOSSES = ("classification", "bbox_regression")
CASCADE_LOSSES = ("loss_objectness", "loss_rpn_box_reg",
                  *(f"s{i}.{name}" for i in range(3) for name in ("loss_cls", "loss_bbox", "loss_mask")))


@dataclass(frozen=True)
class DetectionSettings(RunSettings):
    """The detection task's settings: the engine's (mmdetection's 1x schedule by default) plus the detector's."""

    output: str = "runs/detection/{model}"
    epochs: int = 12
    batch_size: int = 2                   # images per process
    lr: float = 1.0e-4
    lr_batch: int = 16
    clip_grad: float = 0.0
    sched: str = "step"
    warmup_iters: int = 1000
    milestones: tuple[int, ...] = (8, 11)
    ema: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # the official configs train and test in fp32
    detector: Literal["mask_rcnn", "cascade_mask_rcnn", "retinanet"] = "mask_rcnn"
    decay_rule: Literal["official", "all_norms", "every"] = "official"  # which parameters AdamW decays (param_groups)
    drop_path: Optional[float] = None     # null: the official Mask R-CNN rate of the model's scale
    train_split: str = "train"
    val_split: str = "val"
    backbone_weights: Optional[str] = None  # an ImageNet classification checkpoint (official or ours)
    reset_heads: bool = False             # init_weights with another number of classes: new class-specific layers
    variant: Literal["official", "masked"] = "official"  # the backbone's padding / shift / position behaviour
    min_size: tuple[int, ...] = (800,)    # training shorter side(s); several: one drawn per image
    crop_branch: bool = False             # half the images resized to 400-600 and cropped first (Swin's 3x recipe)
    max_size: int = 1333                  # longer side cap
    test_size: int = 800                  # evaluation shorter side
    hflip: float = 0.5
    rois_per_image: int = 512             # RoIs sampled per image for the box and mask heads
    anchor_scale: float = 8.0             # anchor side / level stride (mmdet's octave_base_scale: 32-512 px)
    fpn_channels: int = 256               # FPN / RPN / RoI-head width (narrower for CPU smoke runs)
    eval_images: int = 0                  # evaluate on the first N validation images (0: all)

    BOUNDS: ClassVar[dict[str, tuple[Optional[float], Optional[float]]]] = {
        "max_size": (32, None), "test_size": (32, None), "hflip": (0, 1), "rois_per_image": (1, None),
        "anchor_scale": (0, None), "fpn_channels": (1, None), "eval_images": (0, None),
    }


# The official config's paramwise_cfg: no decay where one of these is part of the *official* parameter name. Its
# stem and downsampling norms are ``downsample_layers.*.stem.1/4`` and ``reduction.1`` (decayed there), and Halo's
# relative tables and PVT's position embedding carry other names (decayed there too).
OFFICIAL_NO_DECAY = ("norm", "relative_position_bias_table", "absolute_pos_embed")
_DECAYED_NORMS = re.compile(r"(^|\.)(stem\.norm\d|downsample\.norm)\.")
# DWNet's blocks name their BatchNorms bn0 / bn / bn2 (conv branch) and bn (before the MLP): no "norm", so DWNet's
# config decays them (here: the mixer's in/spatial/out norms and the block's norm2); its stem and downsampling
# LayerNorms are patch_embed.norm and downsample.norm there, so they are not decayed
_DWNET_DECAYED_NORMS = re.compile(r"\.blocks\.\d+\.(norm2|mixer\.(in_norm|spatial_norm|out_norm))\.")


def param_groups(model: Detector, weight_decay: float, rule: str = "official") -> list[dict[str, Any]]:
    """AdamW groups: ``official`` decays exactly what the official config decays (see OFFICIAL_NO_DECAY);
    ``all_norms`` exempts every norm and the backbone's position tables, as the classification recipe does;
    ``every`` decays every parameter (a config without ``paramwise_cfg``, e.g. Twins' RetinaNet)."""
    if rule == "every":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = model.no_weight_decay() if rule == "all_norms" else set()
    dwnet = family_of(str(getattr(model, "config", {}).get("model"))) == "dwnet"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if rule == "official":
            decayed = _DWNET_DECAYED_NORMS if dwnet else _DECAYED_NORMS
            exempt = any(key in name for key in OFFICIAL_NO_DECAY) and not decayed.search(name)
        else:
            exempt = "norm" in name or name in skip
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Detection(Task):
    """Train Mask R-CNN (Faster R-CNN on box-only data) with any backbone on a COCO-format folder."""

    name = "detection"
    settings = DetectionSettings
    recipes = RECIPES
    loss_names = LOSSES
    best_metric = "bbox_AP"

    cfg: DetectionSettings

    def __init__(self, cfg: DetectionSettings, info: Any, precision: str) -> None:
        super().__init__(cfg, info, precision)
        check_model_name(cfg.model)
        self.init_report: Optional[str] = None
        self.loss_names = {"retinanet": RETINANET_LOSSES, "cascade_mask_rcnn": CASCADE_LOSSES}.get(cfg.detector, LOSSES)

    def datasets(self) -> tuple[CocoDetection, CocoDetection]:
        """The checked train and val splits."""
        cfg = self.cfg
        if not cfg.data:
            raise DataError("no data: give a COCO-format folder (data=<folder>, command line --data)")
        train_set = CocoDetection(cfg.data, cfg.train_split, train=True, hflip=cfg.hflip, crop_branch=cfg.crop_branch)
        val_set = CocoDetection(cfg.data, cfg.val_split)
        if cfg.eval_images:
            val_set.image_ids = val_set.image_ids[: cfg.eval_images]
        if val_set.category_ids != train_set.category_ids:
            raise DataError(f"{val_set.annotation_file} has categories {val_set.category_ids}, but "
                            f"{train_set.annotation_file} has {train_set.category_ids}; both splits need the same ones")
        global_batch = cfg.batch_size * cfg.accum_steps * self.info.world_size
        if len(train_set) < global_batch:
            raise DataError(f"{train_set.name} has {len(train_set)} training images with boxes, fewer than one "
                            f"global batch of {global_batch} (batch_size {cfg.batch_size} x accum_steps "
                            f"{cfg.accum_steps} x {self.info.world_size} processes); lower batch_size")
        self.train_set, self.val_set = train_set, val_set
        return train_set, val_set

    def build_model(self) -> nn.Module:
        """The detector, from ``init_weights`` (a detection checkpoint) or ``backbone_weights`` (ImageNet)."""
        cfg, train_set = self.cfg, self.train_set
        common = dict(variant=cfg.variant, backbone_weights=cfg.backbone_weights, min_size=cfg.min_size,
                      max_size=cfg.max_size, **({"drop_path_rate": cfg.drop_path} if cfg.drop_path is not None else {}))
        if cfg.detector == "retinanet":
            model: nn.Module = create_retinanet(cfg.model, train_set.num_classes, **common)
            load = load_retinanet_weights
        else:
            model = create_detector(cfg.model, train_set.num_classes, masks=train_set.has_masks,
                                    rois_per_image=cfg.rois_per_image, fpn_channels=cfg.fpn_channels,
                                    anchor_scale=cfg.anchor_scale, cascade=cfg.detector == "cascade_mask_rcnn", **common)
            load = load_detector_weights
        model.config["categories"] = train_set.categories
        if cfg.init_weights:
            self.init_report = str(load(model, cfg.init_weights, reset_heads=cfg.reset_heads))
        self.model = model
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """mmdet's decay rule (see :func:`param_groups`)."""
        return param_groups(model, self.cfg.weight_decay, self.cfg.decay_rule)

    def step(self, model: Any, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """The detector's losses (RPN, box head, mask head)."""
        return model(images, targets)

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """bbox (and segm) AP on the validation split at the test scale; every image once under torchrun."""
        saved = model.transform.min_size, model.transform.max_size
        model.set_test_scale(self.cfg.test_size, self.cfg.max_size)
        try:
            # one image at a time, as mmdet tests: padding to a batch partner's size changes attention features
            result = evaluate_detector(model, self.val_set, self.info, batch_size=1,
                                       workers=loader.num_workers, precision=self.precision)
        finally:
            model.transform.min_size, model.transform.max_size = saved
        if "note" in result and self.info.primary:
            print(f"warning: {result['note']}", flush=True)
        row = {f"{t}_{k}": v for t in ("bbox", "segm") for k, v in result.get(t, {}).items() if v is not None}
        return {**row, "val_images": result["images"]}

    def describe(self, model: nn.Module, train_set: Any, val_set: Any, steps_per_epoch: int) -> list[str]:
        """The classes, masks or boxes, and what was dropped as mmdet drops it."""
        dropped = ", ".join(f"{v} {k}" for k, v in train_set.dropped.items() if v)
        kind = "RetinaNet" if self.cfg.detector == "retinanet" else "Mask R-CNN" if train_set.has_masks else "Faster R-CNN"
        kind = f"Cascade {kind}" if self.cfg.detector == "cascade_mask_rcnn" else kind
        lines = [f"{kind} with {train_set.num_classes} classes ({'masks' if train_set.has_masks else 'boxes only'}); "
                 f"data {self.cfg.data}: {len(train_set)} train / {len(val_set)} val images"
                 f"{f' ({dropped} dropped as mmdet does)' if dropped else ''}, {steps_per_epoch} steps per epoch"]
        if not countable_objects(val_set.coco, val_set.image_ids):
            lines.append(f"warning: {val_set.annotation_file} has no objects AP can count on the evaluated images "
                         "(only crowd regions, or none): the run reports no AP and keeps no best.pth")
        return lines + ([self.init_report] if self.init_report else [])

    def report(self, row: Mapping[str, Any]) -> str:
        """``, bbox AP a, segm AP b``."""
        return "".join(f", {t} AP {row[f'{t}_AP']:.1f}" for t in ("bbox", "segm") if f"{t}_AP" in row)

    def check_resume(self, state: Mapping[str, Any], path: Path) -> None:
        """A detection checkpoint of the same number of classes."""
        saved = (state.get("detector") or {}).get("num_classes")
        if saved is not None and saved != self.train_set.num_classes:
            raise RunError(f"{path} is a detector of {saved} classes, but this run's data has "
                           f"{self.train_set.num_classes}; resume on the data it was trained on")

    def checkpoint_values(self) -> dict[str, Any]:
        """How to rebuild the detector (``detect eval`` / ``predict`` read it)."""
        return {"detector": self.model.config}

    def resolved(self) -> dict[str, Any]:
        """The classes the run decided on."""
        return {"num_classes": self.train_set.num_classes, "categories": self.train_set.categories}

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The last evaluation's bbox and segm AP."""
        last = history[-1] if history else {}
        return {t: {k.removeprefix(f"{t}_"): v for k, v in last.items() if k.startswith(f"{t}_")}
                for t in ("bbox", "segm")}


def train(recipe: Union[str, Path] = "mask_rcnn_1x", overrides: Overrides = None) -> dict[str, Any]:
    """Run a detection training job; return its summary (also written to ``summary.json``).

    Raises:
        tokenmixers.runs.Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    return runs.train(Detection, recipe, overrides)


__all__ = ["DetectionSettings", "Detection", "train", "param_groups", "LOSSES"]
