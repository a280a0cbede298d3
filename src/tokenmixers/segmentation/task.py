"""Segmentation training: the segmentation task of the run engine, with mmsegmentation's recipes.

``train(recipe, overrides)`` trains a :func:`~tokenmixers.segmentation.create_segmentor` segmentor
on a folder (ADE20K's layout, images + PNG label maps with ``classes.txt``, or a COCO instance set)
and returns its summary. Recipes are YAML files in ``recipes/segmentation`` (``upernet_160k``: the
Swin setting; ``semantic_fpn_80k``: the PVT setting; ``smoke``) or any path, with ``key=value``
overrides.

Training is by iterations as mmseg's: ``iters`` optimizer steps, evaluated and saved every
``eval_interval``; the engine's epoch is one interval (the training set repeated as often as an
interval needs and shuffled as one, where mmseg's infinite sampler runs whole passes one after the other). The schedule is mmcv's ``poly``
with linear warm-up; AdamW without weight decay on the parameters whose names hold one of
``no_decay_keys`` (mmcv's ``custom_keys``); ``best.pth`` by mIoU. Everything else a run does is the engine's
(:mod:`tokenmixers.runs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import runs
from ..data import DataError
from ..recipe import Overrides, RecipeError
from ..runs import RunError, RunSettings, Task
from ..zoo import check_model_name, load_checkpoint
from .data import SegmentationDataset
from .evaluate import MULTI_SCALE, evaluate_segmentor
from .heads import HEADS
from .segmentor import Segmentor, create_segmentor

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "segmentation"
LOSSES = ("loss_ce", "aux_loss_ce")


@dataclass(frozen=True)
class SegmentationSettings(RunSettings):
    """The segmentation task's settings: the engine's (mmseg's UperNet 160k, Swin setting, by default) plus its own."""

    output: str = "runs/segmentation/{model}"
    head: Literal["upernet", "semantic_fpn"] = "upernet"
    iters: int = 160000                   # optimizer steps in all
    eval_interval: int = 16000            # steps between evaluations and checkpoints (one engine epoch)
    batch_size: int = 2                   # images per process (mmseg: 2 per GPU on 8 GPUs)
    lr: float = 6.0e-5
    lr_batch: int = 16
    weight_decay: float = 0.01
    no_decay_keys: tuple[str, ...] = ("absolute_pos_embed", "relative_position_bias_table", "norm")  # Swin's config
    clip_grad: float = 0.0
    sched: str = "poly"
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1.0e-6
    ema: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # mmseg's configs train in fp32
    drop_path: Optional[float] = None     # null: the official Mask R-CNN rate of the model's scale
    train_split: str = "train"
    val_split: str = "val"
    backbone_weights: Optional[str] = None  # an ImageNet classification checkpoint (official or ours)
    variant: Literal["official", "masked"] = "official"  # the backbone's padding / shift / position behaviour
    channels: Optional[int] = None        # decode head width (null: 512 UperNet, 128 Semantic FPN)
    aux_channels: int = 256
    crop_size: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)  # the resize target (long, short edge), in training times ratio_range
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    test_mode: Literal["whole", "slide"] = "whole"
    test_multi_scale: bool = False        # mmseg's aug test: ratios 0.5-1.75 and flips
    slide_crop: tuple[int, int] = (512, 512)
    slide_stride: tuple[int, int] = (341, 341)
    eval_images: int = 0                  # evaluate on the first N validation images (0: all)

    BOUNDS: ClassVar[dict[str, tuple[Optional[float], Optional[float]]]] = {
        "iters": (1, None), "eval_interval": (1, None), "aux_channels": (1, None), "channels": (1, None),
        "cat_max_ratio": (0, 1), "hflip": (0, 1), "eval_images": (0, None),
    }


def param_groups(model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str]) -> list[dict[str, Any]]:
    """mmcv's ``paramwise_cfg.custom_keys`` with ``decay_mult=0``: no decay where a key is part of the parameter's name,
    nor (when there are keys) on the position tables the backbone names in ``no_weight_decay()`` under other names
    (PVT's ``pos_embed``, Halo's relative tables, Twins' ``pos_block``)."""
    tables = model.no_weight_decay() if no_decay_keys and hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in tables or any(key in name for key in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Segmentation(Task):
    """Train UperNet or Semantic FPN with any backbone on a segmentation folder."""

    name = "segmentation"
    settings = SegmentationSettings
    recipes = RECIPES
    loss_names = LOSSES
    best_metric = "mIoU"

    cfg: SegmentationSettings

    @classmethod
    def load_settings(cls, recipe: Union[str, Path, None] = None, overrides: Overrides = None) -> SegmentationSettings:
        """The recipe's settings, with the engine's epochs set from ``iters`` / ``eval_interval``."""
        cfg = super().load_settings(recipe, overrides)
        if cfg.iters % cfg.eval_interval:
            raise RecipeError(f"iters ({cfg.iters}) must be a multiple of eval_interval ({cfg.eval_interval}): "
                              "every interval ends with an evaluation and a checkpoint")
        return cfg.replace(epochs=cfg.iters // cfg.eval_interval, max_steps_per_epoch=cfg.eval_interval,
                           eval_every=1, ckpt_every_epochs=1)

    def __init__(self, cfg: SegmentationSettings, info: Any, precision: str) -> None:
        super().__init__(cfg, info, precision)
        check_model_name(cfg.model)
        self.init_report: Optional[str] = None

    def datasets(self) -> tuple[SegmentationDataset, Dataset]:
        """The checked train and val splits; the training split drawn as often as an interval needs."""
        cfg = self.cfg
        if not cfg.data:
            raise DataError("no data: give a segmentation folder (data=<folder>, command line --data)")
        train_set = SegmentationDataset(cfg.data, cfg.train_split, train=True, crop_size=cfg.crop_size,
                                        scale=cfg.scale, ratio_range=cfg.ratio_range,
                                        cat_max_ratio=cfg.cat_max_ratio, hflip=cfg.hflip, photometric=cfg.photometric)
        val_set = SegmentationDataset(cfg.data, cfg.val_split, train=False, scale=cfg.scale)
        if val_set.classes != train_set.classes:
            raise DataError(f"the {cfg.val_split!r} split has classes {val_set.classes[:5]}..., the "
                            f"{cfg.train_split!r} split {train_set.classes[:5]}...; both need the same ones")
        if cfg.eval_images:
            val_set = torch.utils.data.Subset(val_set, range(min(cfg.eval_images, len(val_set))))  # type: ignore[assignment]
        global_batch = cfg.batch_size * cfg.accum_steps * self.info.world_size
        if cfg.head == "upernet" and cfg.batch_size * self.info.world_size < 2:
            raise DataError("UperNet's pooling branch normalises a 1x1 map over the batch, which needs at least 2 "
                            "images per step: set batch_size=2 or more (or train on several processes)")
        train_set.repeats = max(1, math.ceil(cfg.eval_interval * global_batch / len(train_set)))
        self.train_set, self.val_set = train_set, val_set
        return train_set, val_set

    @property
    def classes(self) -> list[str]:
        """The class names of the training split."""
        return list(self.train_set.classes)

    def build_model(self) -> Segmentor:
        """The segmentor, from ``init_weights`` (a segmentor checkpoint) or ``backbone_weights`` (ImageNet)."""
        cfg = self.cfg
        model = create_segmentor(
            cfg.model, self.train_set.num_classes, cfg.head, channels=cfg.channels, aux_channels=cfg.aux_channels,
            backbone_weights=cfg.backbone_weights, variant=cfg.variant,
            **({"drop_path_rate": cfg.drop_path} if cfg.drop_path is not None else {}))
        model.config.update(classes=self.classes, scale=list(cfg.scale), test_mode=cfg.test_mode)
        if cfg.init_weights:
            self.init_report = str(load_checkpoint(model, cfg.init_weights))
        self.model = model
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """mmseg's decay rule (see :func:`param_groups`)."""
        return param_groups(model, self.cfg.weight_decay, self.cfg.no_decay_keys)

    def step(self, model: Any, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decode head's (and auxiliary head's) cross-entropy."""
        return model(images, labels)

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """mIoU, mAcc and aAcc on the validation split at the test scale; every image once under torchrun."""
        cfg = self.cfg
        result = evaluate_segmentor(
            model, self.val_set, self.info, num_classes=self.train_set.num_classes, classes=self.classes,
            scale=cfg.scale, ratios=MULTI_SCALE if cfg.test_multi_scale else (1.0,), flip=cfg.test_multi_scale,
            mode=cfg.test_mode, crop=cfg.slide_crop, stride=cfg.slide_stride, workers=loader.num_workers,
            precision=self.precision)
        self.last_classes = result["classes"]
        return {k: result[k] for k in ("mIoU", "mAcc", "aAcc") if result[k] is not None} | {"val_images": result["images"]}

    def describe(self, model: nn.Module, train_set: Any, val_set: Any, steps_per_epoch: int) -> list[str]:
        """The head, the classes and the schedule in mmseg's terms."""
        cfg = self.cfg
        lines = [f"{cfg.head} segmentor with {self.train_set.num_classes} classes; data {cfg.data} "
                 f"({self.train_set.layout}): {len(self.train_set.samples)} train / {len(self.val_set)} val images; "
                 f"{cfg.iters} iterations, evaluated every {cfg.eval_interval}"]
        return lines + ([self.init_report] if self.init_report else [])

    def report(self, row: Mapping[str, Any]) -> str:
        """``, mIoU a, mAcc b, aAcc c``."""
        return "".join(f", {k} {row[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc") if k in row)

    def check_resume(self, state: Mapping[str, Any], path: Path) -> None:
        """A segmentor checkpoint of the same classes."""
        saved = (state.get("segmentor") or {}).get("classes")
        if saved is not None and list(saved) != self.classes:
            raise RunError(f"{path} is a segmentor of {len(saved)} classes ({', '.join(saved[:4])}, ...), but this "
                           f"run's data has {len(self.classes)}; resume on the data it was trained on")

    def checkpoint_values(self) -> dict[str, Any]:
        """How to rebuild the segmentor (``segment eval`` / ``predict`` read it)."""
        return {"segmentor": self.model.config}

    def resolved(self) -> dict[str, Any]:
        """The classes the run decided on."""
        return {"num_classes": self.train_set.num_classes, "classes": self.classes}

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The last evaluation's metrics and per-class IoU / Acc."""
        last = history[-1] if history else {}
        return {**{k: last[k] for k in ("mIoU", "mAcc", "aAcc") if k in last},
                "classes": getattr(self, "last_classes", {})}


def train(recipe: Union[str, Path] = "upernet_160k", overrides: Overrides = None) -> dict[str, Any]:
    """Run a segmentation training job; return its summary (also written to ``summary.json``).

    Raises:
        tokenmixers.runs.Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    return runs.train(Segmentation, recipe, overrides)


__all__ = ["SegmentationSettings", "Segmentation", "train", "param_groups", "LOSSES", "HEADS"]
