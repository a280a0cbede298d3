"""Training and evaluation with the paper's recipe, on a CPU, one GPU or many (torchrun / SLURM).

``train(recipe, overrides)`` runs a whole training job and returns its summary; ``evaluate``
measures top-1/top-5 and ``evaluate_checkpoint`` does so for a checkpoint, with the data settings
of the run that wrote it. The recipe machinery is in :mod:`tokenmixers.recipe`, the data in
:mod:`tokenmixers.data`, the run folder, checkpoints and interrupts in :mod:`tokenmixers.runs`.
timm provides the transforms, Mixup/CutMix, losses, EMA, the optimizer's parameter groups (no
weight decay for norms, biases, 1-D parameters and ``no_weight_decay()`` names) and the per-step
warm-up + cosine schedule.

A training checkpoint holds everything needed to continue exactly: model, EMA, optimizer,
scheduler, grad scaler, the :class:`Progress` counters (epoch, optimizer step, position inside the
epoch, metrics so far, the interrupted epoch's loss and time so far), the RNG states of every
process, the resolved config and the package version. Process 0 writes ``last.pth`` atomically
(every save); ``best.pth`` (best top-1) and ``epoch_XXXX.pth`` (the last ``keep_checkpoints``) are
snapshots of it. ``resume=auto`` continues from ``last.pth`` in the output folder.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .augment import build_transform
from .checkpoint import CheckpointError, checkpoint_classes, load_checkpoint, safe_torch_load
from .data import DataError, EpochSampler, ImageDataset, ShardSampler, build_dataset, check_labels
from .distributed import DistInfo, all_reduce_sum, barrier, convert_batchnorm, init_distributed, on_primary
from .files import atomic_write_csv, atomic_write_text
from .recipe import build_config
from .runs import (
    Interrupted,
    RunError,
    StopRequest,
    check_same_model,
    claim_run,
    ignore_stop_signals,
    keep_snapshots,
    restore_state,
    resume_path,
    rng_state,
    save_state,
    set_rng_state,
)
from .zoo import check_model_name, create_model

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_DEFAULTS = {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"}


# -- small helpers --------------------------------------------------------------------------------------


def _log(info: DistInfo, out: Optional[Path], message: str, echo: bool = True) -> None:
    """Print on process 0 (unless ``echo`` is off) and append to ``log.txt``."""
    if not info.primary:
        return
    if echo:
        print(message, flush=True)
    if out is not None:
        with open(out / "log.txt", "a") as f:
            f.write(message + "\n")


def _seed(seed: int) -> None:
    """Seed Python, NumPy and torch (timm's helper; the rank offset is added by the caller)."""
    from timm.utils import random_seed

    random_seed(seed % 2**32)


def _autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of a precision setting (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 with a grad scaler on CUDA (the official AMP), fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def resolve_workers(workers: Optional[int]) -> int:
    """``None``: min(8, the CPUs this process may use / the training processes on this node)."""
    if workers is not None:
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return max(0, min(8, cpus // max(local, 1)))


def _loader(dataset: ImageDataset, batch_size: int, sampler: Any, workers: int, info: DistInfo, pin_memory: bool,
            drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=ImageDataset.collate,
        drop_last=drop_last,
        pin_memory=pin_memory and info.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,  # Ctrl-C / SIGTERM are the main process's to handle
        persistent_workers=False,
    )


# -- evaluation ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and loss over a loader; sums over all processes when distributed."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels, _ in loader:
        if images.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals += torch.stack([  # summed on the device: no host sync per batch
            hits[:, 0].sum(), hits.any(1).sum(), nn.functional.cross_entropy(logits, labels, reduction="sum"),
            torch.tensor(labels.numel(), device=logits.device),
        ]).double()
    model.train(was_training)
    totals = all_reduce_sum(totals).cpu()
    n = max(totals[3].item(), 1.0)
    return {"top1": 100 * totals[0].item() / n, "top5": 100 * totals[1].item() / n, "loss": totals[2].item() / n,
            "count": int(totals[3].item())}


def run_config(checkpoint: Optional[Union[str, Path]]) -> dict[str, Any]:
    """The training config saved in a tokenmixers training checkpoint (empty for any other file)."""
    path = Path(checkpoint) if checkpoint else None
    if path is None or path.is_dir() or path.suffix == ".safetensors" or not path.is_file():
        return {}
    state = safe_torch_load(path)
    config = state.get("config") if isinstance(state, dict) else None
    return dict(config) if isinstance(config, dict) else {}


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

    Settings left as None come from the run that wrote a training checkpoint (model, data, input
    size, crop, interpolation), else from the defaults (224, 0.875, bicubic); the number of classes
    comes from the checkpoint's classifier. Returns ``{"raw": metrics, "ema": metrics (if the
    checkpoint has EMA weights), "settings": {...}, "sources": {setting: "given" | "checkpoint" |
    "default" | "data"}}``; ``checkpoint=None`` evaluates random weights.
    """
    run = run_config(checkpoint)
    given = {"model": model_name, "data": data, "input_size": input_size, "crop_pct": crop_pct,
             "interpolation": interpolation}
    settings, sources = {}, {}
    for key, value in given.items():
        if value is not None:
            settings[key], sources[key] = value, "given"
        elif run.get(key) is not None:
            settings[key], sources[key] = run[key], "checkpoint"
        elif key in EVAL_DEFAULTS:
            settings[key], sources[key] = EVAL_DEFAULTS[key], "default"
        else:
            where = f"{checkpoint} is not a training checkpoint that names it" if checkpoint else "there is no checkpoint"
            raise ValueError(f"no {key} given and {where}; pass --{key}")
    check_model_name(settings["model"])
    info = init_distributed(device)
    dataset = build_dataset(settings["data"], split, build_transform(settings, training=False),
                            image_size=settings["input_size"])
    classes = checkpoint_classes(checkpoint) if num_classes is None and checkpoint is not None else None
    if num_classes is not None:
        sources["num_classes"] = "given"
    elif classes is not None:
        num_classes, sources["num_classes"] = classes, "checkpoint"
    else:
        num_classes, sources["num_classes"] = len(dataset.classes), "data"
    settings["num_classes"] = num_classes
    check_labels(dataset, num_classes)
    loader = _loader(dataset, batch_size, ShardSampler(len(dataset), info.rank, info.world_size),
                     resolve_workers(workers), info, True, False)
    results: dict[str, Any] = {}
    for entry, label in (("auto", "raw"), ("ema", "ema")):
        model = create_model(settings["model"], num_classes=num_classes)
        if checkpoint is not None:
            try:
                load_checkpoint(model, checkpoint, entry=entry, label_map=label_map)
            except CheckpointError as err:
                if entry == "ema" and "has no 'ema' entry" in str(err):
                    continue  # plain weights: there is no EMA to report
                raise
        elif entry == "ema":
            continue
        results[label] = evaluate(model.to(info.device), loader, info.device, precision)
    return {**results, "settings": settings, "sources": sources}


# -- training -----------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint and restored on resume."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})
    # the current epoch's train loss sum, images and skipped images before an interruption (all
    # processes together), and its training time so far: the resumed epoch reports the whole epoch
    carried: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_time: float = 0.0


@dataclass
class _Job:
    """Everything a training run is built from."""

    cfg: dict[str, Any]
    info: DistInfo
    precision: str
    out: Path
    train_set: ImageDataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    batches_per_epoch: int
    num_classes: int
    global_batch: int
    lr: float
    model: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    mixup: Any
    criterion: nn.Module
    ddp: nn.Module
    forward: Any

    @property
    def parts(self) -> dict[str, Any]:
        """The stateful parts a checkpoint saves and a resume restores."""
        return {"model": self.model, "model_ema": self.ema.module if self.ema is not None else None,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}


def _datasets(cfg: Mapping[str, Any], info: DistInfo) -> tuple[ImageDataset, ImageDataset, int, str]:
    """The checked train/val data, the number of classes and how it was decided."""
    train_set = build_dataset(cfg["data"], "train", build_transform(cfg, True), image_size=cfg["input_size"])
    val_set = build_dataset(cfg["data"], "val", build_transform(cfg, False), image_size=cfg["input_size"])
    if cfg["num_classes"]:
        num_classes, note = cfg["num_classes"], f"{cfg['num_classes']} classes (num_classes)"
    else:
        num_classes = max(len(train_set.classes), len(val_set.classes))
        labels = {s.label for s in train_set.samples + val_set.samples}
        note = f"{num_classes} classes, inferred from the data"
        if len(labels) < num_classes:  # list files: classes are 0..largest label
            note += (f" (the largest label is {num_classes - 1} but only {len(labels)} distinct labels occur; "
                     "set num_classes if the model should have another number of outputs)")
    check_labels(train_set, num_classes)
    check_labels(val_set, num_classes)
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    if len(train_set) < global_batch:
        raise DataError(
            f"{train_set.name} has {len(train_set)} images, fewer than one global batch of {global_batch} "
            f"(batch_size {cfg['batch_size']} x accum_steps {cfg['accum_steps']} x {info.world_size} processes); "
            "lower batch_size"
        )
    return train_set, val_set, num_classes, note


def _build(cfg: dict[str, Any], info: DistInfo, precision: str, out: Path, train_set: ImageDataset,
           val_set: ImageDataset, num_classes: int) -> _Job:
    """Loaders, model, EMA, optimizer, schedule, losses and the (DDP / compiled) forward of a run."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    if cfg["deterministic"]:
        train_set.seed = cfg["seed"]
    workers = resolve_workers(cfg["workers"])
    sampler = EpochSampler(train_set, info.rank, info.world_size, seed=cfg["seed"])
    train_loader = _loader(train_set, cfg["batch_size"], sampler, workers, info, cfg["pin_memory"], drop_last=True)
    val_loader = _loader(val_set, cfg["batch_size"], ShardSampler(len(val_set), info.rank, info.world_size), workers,
                         info, cfg["pin_memory"], False)
    batches_per_epoch = len(train_loader) - len(train_loader) % cfg["accum_steps"]
    if cfg["max_steps_per_epoch"]:
        batches_per_epoch = min(batches_per_epoch, cfg["max_steps_per_epoch"] * cfg["accum_steps"])
    steps_per_epoch = batches_per_epoch // cfg["accum_steps"]

    _seed(cfg["seed"])
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if cfg["drop_path"] is not None:
        kwargs["drop_path_rate"] = cfg["drop_path"]
    model = create_model(cfg["model"], **kwargs)
    if cfg["init_weights"]:
        _log(info, out, str(load_checkpoint(model, cfg["init_weights"])))
    if cfg["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(info.device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if info.distributed and cfg["sync_bn"]:
        model = convert_batchnorm(model, info.device)

    ema = ModelEmaV3(model, decay=cfg["ema_decay"]) if cfg["ema"] else None
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    lr = cfg["lr"] * global_batch / cfg["lr_batch"]
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"], eps=cfg["opt_eps"],
                                    betas=tuple(cfg["opt_betas"]))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"], warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    scaler = torch.amp.GradScaler(info.device.type) if precision == "fp16" else None
    mixup = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                      switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                      label_smoothing=cfg["label_smoothing"], num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg["label_smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(cfg["label_smoothing"])
    else:
        criterion = nn.CrossEntropyLoss()
    ddp = model
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    forward = torch.compile(ddp, dynamic=False, backend=cfg["compile_backend"]) if cfg["compile"] else ddp
    return _Job(cfg, info, precision, out, train_set, sampler, train_loader, val_loader, batches_per_epoch, num_classes,
                global_batch, lr, model, ema, optimizer, scheduler, scaler, mixup, criterion, ddp, forward)


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every process's RNG state, on process 0."""
    state = rng_state()
    if not info.distributed:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _save(job: _Job, progress: Progress, snapshots: Sequence[str] = ()) -> Path:
    """Write ``last.pth`` (every process takes part); ``snapshots``: also ``"epoch"`` and/or ``"best"``."""
    rng = _gather_rng(job.info)
    last = job.out / "last.pth"
    if not job.info.primary:
        return last
    save_state(last, job.parts, **asdict(progress), rng=rng, config=job.cfg, version=__version__,
               world_size=job.info.world_size)
    keep_snapshots(last, progress.epoch, snapshots, job.cfg["keep_checkpoints"])
    return last


def _resume(job: _Job, path: Path) -> Progress:
    """Restore a run's full state from ``path``; the checkpoint must come from the same model and classes."""
    state = safe_torch_load(path)
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or "model" not in state:
        raise RunError(f"{path} is not a tokenmixers training checkpoint (it has no training state); to start from "
                       f"its weights, use init_weights={path} instead of resume")
    check_same_model(path, saved.get("model"), job.cfg["model"])
    classes = state["model"].get("head.fc.weight")
    if classes is not None and classes.shape[0] != job.num_classes:
        raise RunError(f"{path} has a {classes.shape[0]}-class classifier, but this run has {job.num_classes} classes; "
                       f"resume on the data it was trained on (or set num_classes={classes.shape[0]})")
    values = restore_state(state, job.parts, where=path)
    progress = Progress(**{f.name: values[f.name] for f in fields(Progress)})
    if not job.info.primary:
        progress.carried = [0.0, 0.0, 0.0]  # process 0 carries the whole job's partial sums
    if len(values["rng"]) == job.info.world_size:
        set_rng_state(values["rng"][job.info.rank])
    else:
        _log(job.info, job.out, f"warning: checkpoint from {len(values['rng'])} processes, now {job.info.world_size}: "
                                "RNG re-seeded")
        _seed(job.cfg["seed"] + 1000 * progress.step + job.info.rank)
    _log(job.info, job.out, f"resumed from {path}: epoch {progress.epoch}, step {progress.step}, "
                            f"batch {progress.batch_in_epoch} of the epoch")
    return progress


def _train_epoch(job: _Job, progress: Progress, stop: StopRequest) -> dict[str, Any]:
    """Train until the end of the epoch (from where ``progress`` stands); return the epoch's row of metrics.

    Saves at a step boundary when asked (``ckpt_every_steps``) and, after a stop request, saves and
    raises :class:`Interrupted`.
    """
    from tqdm import tqdm

    cfg, info = job.cfg, job.info
    job.model.train()
    job.sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * cfg["batch_size"])
    job.train_set.epoch = progress.epoch
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)  # on the device: no sync per step
    seen, skipped, t0 = 0, 0, time.time()

    def totals() -> list[float]:
        """The epoch's loss sum, images and skipped images so far, over all processes and any interruption."""
        mine = torch.tensor([loss_sum.item(), seen, skipped], dtype=torch.float64)
        mine += torch.tensor(progress.carried, dtype=torch.float64)
        return all_reduce_sum(mine).tolist()

    def save_here() -> Path:
        at = Progress(**{**asdict(progress), "carried": totals(), "epoch_time": progress.epoch_time + time.time() - t0})
        return _save(job, at)

    with tqdm(total=job.batches_per_epoch, initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
              disable=not info.primary, leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as bar:
        for images, labels, n_skipped in job.train_loader:
            if progress.batch_in_epoch >= job.batches_per_epoch:
                break
            skipped += n_skipped
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            if cfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            if job.mixup is not None and images.shape[0] % 2:
                images, labels = images[:-1], labels[:-1]  # Mixup needs an even batch
            targets = labels
            if job.mixup is not None and images.shape[0]:
                images, targets = job.mixup(images, labels)
            sync = (progress.batch_in_epoch + 1) % cfg["accum_steps"] == 0
            with (job.ddp.no_sync() if info.distributed and not sync else nullcontext()):
                with _autocast(info.device, job.precision):
                    if images.shape[0]:
                        loss = job.criterion(job.forward(images), targets)
                    else:  # every image of this batch was unreadable: keep the processes in step
                        loss = sum(p.sum() for p in job.model.parameters()) * 0.0
                scaled = loss / cfg["accum_steps"]
                (job.scaler.scale(scaled) if job.scaler is not None else scaled).backward()
            progress.batch_in_epoch += 1
            loss_sum += loss.detach().double() * images.shape[0]
            seen += images.shape[0]
            if sync:
                _optimizer_step(job)
                progress.step += 1
                job.scheduler.step_update(progress.step)
                if job.ema is not None:
                    job.ema.update(job.model)
                inside = progress.batch_in_epoch < job.batches_per_epoch
                if stop.requested():
                    raise Interrupted(stop.signum, save_here(), progress.epoch, progress.step)
                if cfg["ckpt_every_steps"] and progress.step % cfg["ckpt_every_steps"] == 0 and inside:
                    save_here()
            bar.update(1)
            if progress.batch_in_epoch % cfg["log_every"] == 0 or progress.batch_in_epoch == job.batches_per_epoch:
                rate = seen * info.world_size / max(time.time() - t0, 1e-9)
                lr = job.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                _log(info, job.out, f"epoch {progress.epoch}, batch {progress.batch_in_epoch}/{job.batches_per_epoch}, "
                                    f"step {progress.step}: loss {loss.item():.4f}, lr {lr:.2e}, {rate:.0f} img/s",
                     echo=False)  # the terminal has the progress bar
    epoch_time = progress.epoch_time + time.time() - t0
    loss_total, images_total, skipped_total = totals()
    return {
        "epoch": progress.epoch, "step": progress.step, "train_loss": loss_total / max(images_total, 1),
        "lr": job.optimizer.param_groups[0]["lr"], "img_per_s": images_total / max(epoch_time, 1e-9),
        "skipped_images": int(skipped_total), "epoch_time_s": epoch_time,
    }


def _optimizer_step(job: _Job) -> None:
    """Unscale (fp16), clip, step and zero the gradients."""
    if job.scaler is not None:
        job.scaler.unscale_(job.optimizer)
    if job.cfg["clip_grad"]:
        nn.utils.clip_grad_norm_(job.model.parameters(), job.cfg["clip_grad"])
    if job.scaler is not None:
        job.scaler.step(job.optimizer)
        job.scaler.update()
    else:
        job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)


def epoch_report(row: Mapping[str, Any]) -> str:
    """One log line for an epoch's row of metrics."""
    message = f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, {row['img_per_s']:.0f} img/s"
    if "top1" in row:
        message += f", top-1 {row['top1']:.2f} / top-5 {row['top5']:.2f}"
        if "ema_top1" in row:
            message += f" (EMA {row['ema_top1']:.2f} / {row['ema_top5']:.2f})"
    if row["skipped_images"]:
        message += f", {row['skipped_images']} unreadable image(s) skipped"
    return message


def _header(job: _Job, num_classes_note: str, notes: Sequence[str]) -> None:
    """Log what the run uses and write ``config.yaml``."""
    cfg, info = job.cfg, job.info
    steps_per_epoch = job.batches_per_epoch // cfg["accum_steps"]
    for note in notes:
        _log(info, job.out, note)
    params = sum(p.numel() for p in job.model.parameters())
    _log(info, job.out, f"model {cfg['model']} ({params / 1e6:.2f}M params, {job.num_classes} classes) on {info.device}, "
                        f"{info.world_size} process(es), precision {job.precision}")
    _log(info, job.out, f"data {cfg['data']}: {len(job.train_set)} train / {len(job.val_loader.dataset)} val images, "
                        f"{steps_per_epoch} steps per epoch, {job.train_loader.num_workers} loader worker(s) per process; "
                        f"{num_classes_note}")
    _log(info, job.out, f"lr {job.lr:.3g} = {cfg['lr']:g} x global batch {job.global_batch} / {cfg['lr_batch']}")
    if info.primary:
        import yaml

        atomic_write_text(job.out / "config.yaml", yaml.safe_dump({**cfg, "resolved": {
            "lr": job.lr, "global_batch": job.global_batch, "num_classes": job.num_classes,
            "world_size": info.world_size, "precision": job.precision, "steps_per_epoch": steps_per_epoch,
            "workers": job.train_loader.num_workers}}, sort_keys=False))


def _summary(job: _Job, progress: Progress) -> dict[str, Any]:
    """The run's summary (also ``summary.json``)."""
    last = progress.history[-1] if progress.history else {}
    return {
        "model": job.cfg["model"], "data": job.cfg["data"], "epochs": job.cfg["epochs"], "steps": progress.step,
        "params": sum(p.numel() for p in job.model.parameters()),
        "top1": last.get("top1"), "top5": last.get("top5"), "ema_top1": last.get("ema_top1"),
        "ema_top5": last.get("ema_top5"), "best_top1": progress.best["top1"], "best_epoch": progress.best["epoch"],
        "train_time_s": sum(r["epoch_time_s"] for r in progress.history),
        "skipped_images": sum(r["skipped_images"] for r in progress.history),
        "world_size": job.info.world_size, "lr": job.lr, "global_batch": job.global_batch, "output": str(job.out),
        "history": progress.history, "version": __version__,
    }


def train(
    recipe: Union[str, Path] = "transformer",
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
) -> dict[str, Any]:
    """Run a training job; return its summary (also written to ``summary.json``).

    Args:
        recipe: a shipped recipe name (``transformer``, ``cnn``, ``digits``) or a YAML path.
        overrides: settings to change, as a mapping or ``key=value`` strings.

    Raises:
        Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    cfg = build_config(recipe, overrides)
    check_model_name(cfg["model"])
    if cfg["resume"] and cfg["overwrite"]:
        raise RunError("resume and overwrite were both set: resume continues the run in the output folder, overwrite "
                       "deletes it; choose one")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    info = init_distributed(cfg["device"])
    precision = resolve_precision(cfg["precision"], info.device)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    out = Path(str(cfg["output"]).format(model=cfg["model"]))
    train_set, val_set, num_classes, classes_note = _datasets(cfg, info)  # checked before the folder is touched
    folder = on_primary(lambda: claim_run(out, resume=bool(cfg["resume"]), overwrite=cfg["overwrite"]))
    barrier()
    try:
        with StopRequest() as stop:
            return _run(cfg, info, precision, out, train_set, val_set, num_classes, classes_note,
                        folder.notes if folder else [], stop)
    finally:
        if folder is not None:
            folder.release()


def _run(cfg: dict[str, Any], info: DistInfo, precision: str, out: Path, train_set: ImageDataset,
         val_set: ImageDataset, num_classes: int, classes_note: str, notes: list[str], stop: StopRequest) -> dict[str, Any]:
    """The body of :func:`train`, inside a claimed run folder."""
    job = _build(cfg, info, precision, out, train_set, val_set, num_classes)
    checkpoint, note = resume_path(cfg["resume"], out)
    notes = notes + ([note] if note else [])
    if checkpoint is not None:
        progress = _resume(job, checkpoint)
    else:
        progress = Progress()
        _seed(cfg["seed"] + info.rank)
    job.scheduler.step_update(progress.step)
    _header(job, classes_note, notes)
    writer = None
    if info.primary:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    start_time = time.time()
    while progress.epoch < cfg["epochs"]:
        row = _train_epoch(job, progress, stop)
        progress.epoch += 1
        progress.batch_in_epoch, progress.carried, progress.epoch_time = 0, [0.0, 0.0, 0.0], 0.0
        if progress.epoch % cfg["eval_every"] == 0 or progress.epoch == cfg["epochs"]:
            raw = evaluate(job.model, job.val_loader, info.device, precision)
            row.update(top1=raw["top1"], top5=raw["top5"], val_loss=raw["loss"], val_images=raw["count"])
            if job.ema is not None:
                ema_metrics = evaluate(job.ema.module, job.val_loader, info.device, precision)
                row.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
        progress.history.append(row)
        improved = row.get("top1", -1.0) > progress.best["top1"]
        if improved:
            progress.best = {"top1": row["top1"], "epoch": row["epoch"]}
        last = _save(job, progress, ("epoch", "best") if improved else ("epoch",))
        if info.primary:
            atomic_write_csv(out / "metrics.csv", progress.history)
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()
        _log(info, out, epoch_report(row))
        if progress.epoch < cfg["epochs"] and stop.requested():  # asked during evaluation: the epoch is saved
            raise Interrupted(stop.signum, last, progress.epoch, progress.step)

    summary = _summary(job, progress)
    if info.primary:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        writer.close()
    _log(info, out, f"done in {time.time() - start_time:.0f}s: {out / 'summary.json'}")
    return summary


def lr_for(global_batch: int, recipe: Union[str, Path] = "transformer") -> float:
    """The learning rate a recipe uses at a global batch size (linear scaling)."""
    cfg = build_config(recipe)
    return cfg["lr"] * global_batch / cfg["lr_batch"]


__all__ = ["train", "evaluate", "evaluate_checkpoint", "run_config", "epoch_report", "lr_for", "resolve_precision",
           "resolve_workers", "Progress"]
