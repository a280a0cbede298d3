"""Image classification with the paper's recipe: the classification task of the run engine, and evaluation.

``train(recipe, overrides)`` runs a training job (:func:`tokenmixers.runs.train` with
:class:`Classification`) and returns its summary; ``evaluate`` measures top-1/top-5 and
``evaluate_checkpoint`` does so for a checkpoint, with the data settings saved with it. timm
provides the transforms, Mixup/CutMix, the losses and the optimizer's parameter groups (no weight
decay for norms, biases, 1-D parameters and ``no_weight_decay()`` names); the run engine does the
rest (folder, checkpoints, resume, interrupts, DDP, schedule, EMA, logs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from . import runs
from .augment import build_transform, eval_transform
from .checkpoint import read_checkpoint
from .data import DataError, ImageDataset, build_dataset, check_labels
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .recipe import Overrides
from .runs import RunError, RunSettings, Task
from .zoo import check_model_name, create_model, load_checkpoint

RECIPES = Path(__file__).parent / "recipes"
EVAL_DEFAULTS = {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"}


@dataclass(frozen=True)
class ClassificationSettings(RunSettings):
    """The classification task's settings: the engine's, plus data, augmentation and loss (the paper's Table III)."""

    num_classes: Optional[int] = None        # null: inferred from the data
    label_smoothing: float = 0.1
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: Optional[float] = 0.4      # timm skips colour jitter when auto_augment is set, as the official code did
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    channels_last: bool = False
    grad_checkpointing: bool = False

    BOUNDS: ClassVar[dict[str, tuple[Optional[float], Optional[float]]]] = {
        "num_classes": (1, None), "label_smoothing": (0, 0.999), "input_size": (32, None), "crop_pct": (0.01, None),
        "hflip": (0, 1), "reprob": (0, 1), "recount": (1, None), "mixup": (0, None), "cutmix": (0, None),
        "mixup_prob": (0, 1), "mixup_switch_prob": (0, 1),
    }


class Classification(Task):
    """Train a classifier on an image dataset (class folders, list files, or a built-in set)."""

    name = "classification"
    settings = ClassificationSettings
    recipes = RECIPES
    best_metric = "top1"

    cfg: ClassificationSettings

    def __init__(self, cfg: ClassificationSettings, info: DistInfo, precision: str) -> None:
        super().__init__(cfg, info, precision)
        check_model_name(cfg.model)
        self.num_classes, self.classes_note = 0, ""
        self.mixup: Optional[Mixup] = None

    def datasets(self) -> tuple[ImageDataset, ImageDataset]:
        """The checked train/val data; also decides the number of classes."""
        cfg = self.cfg
        train_set = build_dataset(cfg.data, "train", build_transform(cfg, True), image_size=cfg.input_size)
        val_set = build_dataset(cfg.data, "val", build_transform(cfg, False), image_size=cfg.input_size)
        if cfg.num_classes:
            self.num_classes, self.classes_note = cfg.num_classes, f"{cfg.num_classes} classes (num_classes)"
        else:
            self.num_classes = max(len(train_set.classes), len(val_set.classes))
            labels = {s.label for s in train_set.samples + val_set.samples}
            self.classes_note = f"{self.num_classes} classes, inferred from the data"
            if len(labels) < self.num_classes:  # list files: classes are 0..largest label
                self.classes_note += (
                    f" (the largest label is {self.num_classes - 1} but only {len(labels)} distinct labels occur; "
                    "set num_classes if the model should have another number of outputs)")
        check_labels(train_set, self.num_classes)
        check_labels(val_set, self.num_classes)
        global_batch = cfg.batch_size * cfg.accum_steps * self.info.world_size
        if len(train_set) < global_batch:
            raise DataError(
                f"{train_set.name} has {len(train_set)} images, fewer than one global batch of {global_batch} "
                f"(batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps} x {self.info.world_size} processes); "
                "lower batch_size")
        self.class_names = train_set.classes if len(train_set.classes) == self.num_classes else None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=self.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        return train_set, val_set

    def build_model(self) -> nn.Module:
        """The model with the data's number of classes, from ``init_weights`` if given."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {"num_classes": self.num_classes}
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **kwargs)
        if cfg.init_weights:
            self.init_report = str(load_checkpoint(model, cfg.init_weights))
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def step(self, model: Any, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (with Mixup/CutMix and label smoothing as the recipe says)."""
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if self.mixup is not None:
            if images.shape[0] % 2:
                images, labels = images[:-1], labels[:-1]  # Mixup needs an even batch
            images, targets = self.mixup(images, labels)
        return {"loss": self.criterion(model(images), targets)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Top-1/top-5 (%) and the loss on the validation split."""
        metrics = evaluate(model, loader, self.info, self.precision)
        return {"top1": metrics["top1"], "top5": metrics["top5"], "val_loss": metrics["loss"],
                "val_images": metrics["count"]}

    def describe(self, model: nn.Module, train_set: Any, val_set: Any, steps_per_epoch: int) -> list[str]:
        """The data, the classes and any initial weights."""
        lines = [f"data {self.cfg.data}: {len(train_set)} train / {len(val_set)} val images, {steps_per_epoch} steps "
                 f"per epoch; {self.classes_note}"]
        return lines + ([self.init_report] if getattr(self, "init_report", None) else [])

    def report(self, row: Mapping[str, Any]) -> str:
        """``, top-1 a / top-5 b (EMA c / d)``."""
        if "top1" not in row:
            return ""
        message = f", top-1 {row['top1']:.2f} / top-5 {row['top5']:.2f}"
        if "ema_top1" in row:
            message += f" (EMA {row['ema_top1']:.2f} / {row['ema_top5']:.2f})"
        return message

    def check_resume(self, state: Mapping[str, Any], path: Path) -> None:
        """The checkpoint's classifier must have this run's number of classes."""
        classes = state["model"].get("head.fc.weight") if isinstance(state.get("model"), Mapping) else None
        if classes is not None and classes.shape[0] != self.num_classes:
            raise RunError(f"{path} has a {classes.shape[0]}-class classifier, but this run has {self.num_classes} "
                           f"classes; resume on the data it was trained on (or set num_classes={classes.shape[0]})")

    def checkpoint_values(self) -> dict[str, Any]:
        """The class names travel with the weights."""
        return {"class_names": self.class_names} if self.class_names else {}

    def resolved(self) -> dict[str, Any]:
        """The number of classes the run decided on."""
        return {"num_classes": self.num_classes}

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The last evaluation's top-1/top-5 (raw and EMA)."""
        last = history[-1] if history else {}
        return {k: last.get(k) for k in ("top1", "top5", "ema_top1", "ema_top5")}


def train(recipe: Union[str, Path] = "transformer", overrides: Overrides = None) -> dict[str, Any]:
    """Run a classification training job; return its summary (also written to ``summary.json``).

    Args:
        recipe: a shipped recipe name (``transformer``, ``cnn``, ``fashion``, ``digits``) or a YAML path.
        overrides: settings to change, as a mapping or ``key=value`` strings.

    Raises:
        tokenmixers.runs.Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    return runs.train(Classification, recipe, overrides)


def lr_for(global_batch: int, recipe: Union[str, Path] = "transformer") -> float:
    """The learning rate a recipe uses at a global batch size (linear scaling)."""
    cfg = Classification.load_settings(recipe)
    return cfg.lr * global_batch / cfg.lr_batch


# -- evaluation ---------------------------------------------------------------------------------------


def evaluate(model: nn.Module, loader: DataLoader, info: DistInfo, precision: str = "fp32") -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and loss over a loader; sums over all processes when distributed."""
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct@1, correct@5, loss sum, count
    for logits, labels, _ in runs.predictions(model, loader, info, precision):
        if logits is None:
            continue
        logits, labels = logits.float(), labels.to(info.device)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([  # summed on the device: no host sync per batch
            hits[:, 0].sum(), hits.any(1).sum(), nn.functional.cross_entropy(logits, labels, reduction="sum"),
            torch.tensor(labels.numel(), device=logits.device),
        ]).double()
    totals = all_reduce_sum(totals).cpu()
    n = max(totals[3].item(), 1.0)
    return {"top1": 100 * totals[0].item() / n, "top5": 100 * totals[1].item() / n, "loss": totals[2].item() / n,
            "count": int(totals[3].item())}


def evaluate_checkpoint(
    model_name: Optional[str] = None,
    checkpoint: Optional[str] = None,
    data: Optional[str] = None,
    *,
    split: str = "val",
    batch_size: int = 64,
    input_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    interpolation: Optional[str] = None,
    num_classes: Optional[int] = None,
    device: str = "auto",
    precision: str = "fp32",
    workers: Optional[int] = None,
    label_map: Optional[str] = None,
) -> dict[str, Any]:
    """Evaluate the raw and (when present) EMA weights of a checkpoint; works under torchrun too.

    Settings left as None come from what was saved with the weights (a training checkpoint's run, or
    the ``config.json`` of a weights folder: model, data, input size, crop, interpolation), else from
    the defaults (224, 0.875, bicubic); the number of classes comes from the checkpoint's classifier.
    Returns ``{"raw": metrics, "ema": metrics (if the checkpoint has EMA weights), "settings": {...},
    "sources": {setting: "given" | "checkpoint" | "default" | "data"}}``; ``checkpoint=None``
    evaluates random weights.
    """
    weights = read_checkpoint(checkpoint) if checkpoint is not None else None
    saved = saved_settings(weights) if weights is not None else {}
    given = {"model": model_name, "data": data, "input_size": input_size, "crop_pct": crop_pct,
             "interpolation": interpolation}
    settings, sources = {}, {}
    for key, value in given.items():
        if value is not None:
            settings[key], sources[key] = value, "given"
        elif saved.get(key) is not None:
            settings[key], sources[key] = saved[key], "checkpoint"
        elif key in EVAL_DEFAULTS:
            settings[key], sources[key] = EVAL_DEFAULTS[key], "default"
        else:
            where = f"{checkpoint} does not name it" if checkpoint else "there is no checkpoint"
            raise ValueError(f"no {key} given and {where}; pass --{key}")
    check_model_name(settings["model"])
    info = init_distributed(device)
    transform = eval_transform(settings["input_size"], settings["crop_pct"], settings["interpolation"])
    dataset = build_dataset(settings["data"], split, transform, image_size=settings["input_size"])
    if num_classes is not None:
        sources["num_classes"] = "given"
    elif weights is not None and weights.num_classes is not None:
        num_classes, sources["num_classes"] = weights.num_classes, "checkpoint"
    else:
        num_classes, sources["num_classes"] = len(dataset.classes), "data"
    settings["num_classes"] = num_classes
    check_labels(dataset, num_classes)
    loader = runs.eval_loader(dataset, batch_size, runs.resolve_workers(workers), info)
    results: dict[str, Any] = {}
    for entry in ("raw", "ema"):
        if entry == "ema" and (weights is None or weights.ema is None):
            continue  # plain weights: there is no EMA to report
        model = create_model(settings["model"], num_classes=num_classes)
        if weights is not None:
            load_checkpoint(model, weights, entry="ema" if entry == "ema" else "auto", label_map=label_map)
        results[entry] = evaluate(model.to(info.device), loader, info, precision)
    return {**results, "settings": settings, "sources": sources}


def saved_settings(checkpoint: Any) -> dict[str, Any]:
    """The model and data settings saved with a :class:`~tokenmixers.checkpoint.Checkpoint`.

    A training checkpoint has its run's settings; a weights folder's ``config.json`` has the
    architecture, timm's ``pretrained_cfg`` (input size, crop, interpolation) and the training data.
    """
    if checkpoint.run:
        return dict(checkpoint.run)
    config = checkpoint.model_config
    pretrained = config.get("pretrained_cfg") or {}
    size = pretrained.get("input_size")
    return {"model": config.get("architecture"), "data": config.get("training_data"),
            "input_size": size[-1] if size else None, "crop_pct": pretrained.get("crop_pct"),
            "interpolation": pretrained.get("interpolation")}


__all__ = ["ClassificationSettings", "Classification", "train", "lr_for", "evaluate", "evaluate_checkpoint",
           "saved_settings"]
