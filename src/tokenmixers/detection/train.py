"""Detection training with the official Mask R-CNN recipe, on the classification run machinery.

``train_detector(recipe, overrides)`` trains a :func:`~tokenmixers.detection.create_detector`
detector on a COCO-format folder and returns its summary. Recipes are YAML files in
``recipes/detection`` (``mask_rcnn_1x``, ``mask_rcnn_3x``, ``smoke``) or any path, with
``key=value`` overrides (:mod:`tokenmixers.recipe`). What it shares with classification
(:mod:`tokenmixers.runs`, :mod:`tokenmixers.training`): the locked run folder, atomic full-state
checkpoints (``last.pth``, ``best.pth`` by bbox AP, ``epoch_XXXX.pth``), ``resume=auto``,
SIGINT/SIGTERM -> save and stop, DDP under torchrun / SLURM, AMP, the progress bar, ``metrics.csv``,
TensorBoard, ``log.txt`` and ``summary.json``.

The schedule is mmdetection's: linear warm-up over ``warmup_iters`` steps from ``warmup_ratio``
x lr, then the lr times ``gamma`` after each epoch in ``milestones``; it is a function of the step,
so a resumed run needs no scheduler state. AdamW without weight decay on parameters whose name
contains ``norm`` (mmdet's ``custom_keys``) and on the backbone's ``no_weight_decay()`` tables and
embeddings.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..data import DataError, EpochSampler
from ..distributed import DistInfo, all_reduce_sum, barrier, init_distributed, on_primary
from ..files import atomic_write_csv, atomic_write_text
from ..recipe import build_config
from ..runs import (
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
from ..training import Progress, _autocast, _log, _seed, resolve_precision, resolve_workers
from ..zoo import check_model_name
from .data import CocoDetection
from .detector import Detector, create_detector, load_detector_weights
from .evaluate import evaluate_detector

LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def recipe_path(recipe: Union[str, Path]) -> Union[str, Path]:
    """A shipped detection recipe name (``mask_rcnn_1x``) as the config loader names it; paths unchanged."""
    return recipe if Path(recipe).suffix or "/" in str(recipe) else f"detection/{recipe}"


def lr_factor(step: int, steps_per_epoch: int, cfg: Mapping[str, Any]) -> float:
    """mmdet's lr multiplier at an optimizer step: linear warm-up, then ``gamma`` per milestone epoch passed."""
    warm = 1.0
    if step < cfg["warmup_iters"]:
        warm = 1 - (1 - step / cfg["warmup_iters"]) * (1 - cfg["warmup_ratio"])
    passed = sum(step >= m * steps_per_epoch for m in cfg["milestones"])
    return warm * cfg["gamma"] ** passed


def param_groups(model: Detector, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for norms and the backbone's position tables / embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "norm" in name or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Job:
    """What a detection run is built from (data, detector, optimizer, loaders)."""

    def __init__(self, cfg: dict[str, Any], info: DistInfo, precision: str, out: Path, train_set: CocoDetection,
                 val_set: CocoDetection) -> None:
        self.cfg, self.info, self.precision, self.out = cfg, info, precision, out
        self.train_set, self.val_set = train_set, val_set
        if cfg["deterministic"]:
            train_set.seed = cfg["seed"]
        self.workers = resolve_workers(cfg["workers"])
        self.sampler = EpochSampler(train_set, info.rank, info.world_size, seed=cfg["seed"])
        self.loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=self.sampler,
                                 num_workers=self.workers, collate_fn=CocoDetection.collate, drop_last=True,
                                 pin_memory=cfg["pin_memory"] and info.device.type == "cuda",
                                 worker_init_fn=ignore_stop_signals)
        self.steps_per_epoch = len(self.loader)
        if cfg["max_steps_per_epoch"]:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg["max_steps_per_epoch"])
        _seed(cfg["seed"])
        self.model = create_detector(
            cfg["model"], train_set.num_classes, masks=train_set.has_masks, variant=cfg["variant"],
            backbone_weights=cfg["backbone_weights"], min_size=tuple(cfg["min_size"]), max_size=cfg["max_size"],
            rois_per_image=cfg["rois_per_image"], fpn_channels=cfg["fpn_channels"],
            anchor_scale=cfg["anchor_scale"],
            **({"drop_path_rate": cfg["drop_path"]} if cfg["drop_path"] is not None else {}))
        self.model.config["categories"] = train_set.categories
        self.notes: list[str] = []
        self.pending_rng: Optional[dict[str, Any]] = None  # a mid-epoch resume's RNG state (see _resume)
        if cfg["init_weights"]:
            self.notes.append(str(load_detector_weights(self.model, cfg["init_weights"], reset_heads=cfg["reset_heads"])))
        self.model.to(info.device)
        self.global_batch = cfg["batch_size"] * info.world_size
        self.lr = cfg["lr"] * self.global_batch / cfg["lr_batch"]
        # fused: one kernel over all parameters instead of a loop over tensors (the micro detector's 8.6M: 4x faster on a CPU)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg["weight_decay"]), lr=self.lr,
                                           betas=tuple(cfg["opt_betas"]), eps=cfg["opt_eps"], fused=True)
        self.scaler = torch.amp.GradScaler(info.device.type) if precision == "fp16" else None
        self.ddp: nn.Module = self.model
        if info.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)

    @property
    def parts(self) -> dict[str, Any]:
        """The stateful parts a checkpoint saves and a resume restores."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def set_lr(self, step: int) -> float:
        """Set the schedule's lr for the optimizer step ``step``; return it."""
        lr = self.lr * lr_factor(step, self.steps_per_epoch, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def _save(job: _Job, progress: Progress, snapshots: Sequence[str] = ()) -> Path:
    """Write ``last.pth`` (every process takes part); ``snapshots``: also ``"epoch"`` and/or ``"best"``."""
    rng = [rng_state()]
    if job.info.distributed:
        rng = [None] * job.info.world_size
        torch.distributed.all_gather_object(rng, rng_state())
    last = job.out / "last.pth"
    if job.info.primary:
        save_state(last, job.parts, **asdict(progress), rng=rng, config=job.cfg, detector=job.model.config,
                   version=__version__, world_size=job.info.world_size)
        keep_snapshots(last, progress.epoch, snapshots, job.cfg["keep_checkpoints"])
    return last


def _resume(job: _Job, path: Path) -> Progress:
    """Restore a detection run from ``path``: same backbone and classes, or a clear error."""
    from ..checkpoint import safe_torch_load

    state = safe_torch_load(path)
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or "detector" not in state:
        raise RunError(f"{path} is not a tokenmixers detection training checkpoint; to start from its weights, use "
                       f"init_weights={path} instead of resume")
    check_same_model(path, saved.get("model"), job.cfg["model"])
    values = restore_state(state, job.parts, where=path)
    progress = Progress(**{f.name: values[f.name] for f in fields(Progress)})
    if not job.info.primary:
        progress.carried = [0.0] * len(progress.carried)
    if len(values["rng"]) == job.info.world_size:
        if progress.batch_in_epoch:  # mid-epoch: restored once the epoch's loader has drawn its seed (as it had)
            job.pending_rng = values["rng"][job.info.rank]
        else:
            set_rng_state(values["rng"][job.info.rank])
    else:
        _seed(job.cfg["seed"] + 1000 * progress.step + job.info.rank)
    _log(job.info, job.out, f"resumed from {path}: epoch {progress.epoch}, step {progress.step}")
    return progress


def _train_epoch(job: _Job, progress: Progress, stop: StopRequest) -> dict[str, Any]:
    """Train to the end of the epoch from where ``progress`` stands; return the epoch's row of metrics."""
    from tqdm import tqdm

    cfg, info = job.cfg, job.info
    job.model.train()
    job.sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * cfg["batch_size"])
    job.train_set.epoch = progress.epoch
    # per-loss and total loss x images, images, skipped images; on the device: no sync per step
    sums = torch.zeros(len(LOSSES) + 3, dtype=torch.float64, device=info.device)
    t0 = time.time()

    def totals() -> list[float]:
        """The epoch's sums so far, over all processes and any interruption."""
        carried = torch.tensor(progress.carried, dtype=torch.float64, device=info.device)
        return all_reduce_sum(sums + carried).tolist()

    def save_here() -> Path:
        return _save(job, Progress(**{**asdict(progress), "carried": totals(),
                                      "epoch_time": progress.epoch_time + time.time() - t0}))

    with tqdm(total=job.steps_per_epoch, initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
              disable=not info.primary, leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as bar:
        batches = iter(job.loader)
        if job.pending_rng is not None:
            set_rng_state(job.pending_rng)
            job.pending_rng = None
        for images, targets, skipped in batches:
            if progress.batch_in_epoch >= job.steps_per_epoch:
                break
            lr = job.set_lr(progress.step)
            images = [im.to(info.device, non_blocking=True) for im in images]
            targets = [{k: v.to(info.device, non_blocking=True) for k, v in t.items()} for t in targets]
            with _autocast(info.device, job.precision):
                if images:
                    losses = job.ddp(images, targets)
                    loss = sum(losses.values())
                else:  # every image of this batch was unreadable: keep the processes in step
                    losses, loss = {}, sum(p.sum() for p in job.model.parameters()) * 0.0
            (job.scaler.scale(loss) if job.scaler is not None else loss).backward()
            _step(job)
            progress.step += 1
            progress.batch_in_epoch += 1
            n, zero = len(images), loss.new_zeros(())
            step_sums = torch.stack([losses.get(k, zero).detach() for k in LOSSES] + [loss.detach()]).double() * n
            sums[: len(LOSSES) + 1] += step_sums
            sums[len(LOSSES) + 1:] += torch.tensor([n, skipped], dtype=torch.float64, device=info.device)
            if stop.requested():
                raise Interrupted(stop.signum, save_here(), progress.epoch, progress.step)
            if cfg["ckpt_every_steps"] and progress.step % cfg["ckpt_every_steps"] == 0 \
                    and progress.batch_in_epoch < job.steps_per_epoch:
                save_here()
            bar.update(1)
            if progress.batch_in_epoch % cfg["log_every"] == 0 or progress.batch_in_epoch == job.steps_per_epoch:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                parts = ", ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())
                _log(info, job.out, f"epoch {progress.epoch}, step {progress.step}: loss {loss.item():.4f} ({parts}), "
                                    f"lr {lr:.2e}", echo=False)
    epoch_time = progress.epoch_time + time.time() - t0
    *loss_sums, total, seen, skipped_total = totals()
    row = {"epoch": progress.epoch, "step": progress.step, "train_loss": total / max(seen, 1)}
    row.update({k: s / max(seen, 1) for k, s in zip(LOSSES, loss_sums) if s})
    row.update(lr=job.optimizer.param_groups[0]["lr"], img_per_s=seen / max(epoch_time, 1e-9),
               skipped_images=int(skipped_total), epoch_time_s=epoch_time)
    return row


def _step(job: _Job) -> None:
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


def _evaluate(job: _Job) -> dict[str, Any]:
    """bbox (and segm) AP on the validation split at the test scale; every image once under torchrun."""
    model = job.model
    saved = model.transform.min_size
    model.set_test_scale(job.cfg["test_size"], job.cfg["max_size"])
    try:
        result = evaluate_detector(model, job.val_set, job.info, batch_size=job.cfg["batch_size"],
                                   workers=job.workers, precision=job.precision)
    finally:
        model.transform.min_size = saved
    row = {f"{t}_{k}": v for t in ("bbox", "segm") for k, v in result.get(t, {}).items() if v is not None}
    return {**row, "val_images": result["images"]}


def _datasets(cfg: Mapping[str, Any], world_size: int) -> tuple[CocoDetection, CocoDetection]:
    """The checked train and val splits (errors before the run folder is touched)."""
    if not cfg["data"]:
        raise DataError("no data: give a COCO-format folder (data=<folder>, command line --data)")
    train_set = CocoDetection(cfg["data"], cfg["train_split"], train=True, hflip=cfg["hflip"])
    val_set = CocoDetection(cfg["data"], cfg["val_split"])
    if cfg["eval_images"]:
        val_set.image_ids = val_set.image_ids[: cfg["eval_images"]]
    if val_set.category_ids != train_set.category_ids:
        raise DataError(f"{val_set.annotation_file} has categories {val_set.category_ids}, but "
                        f"{train_set.annotation_file} has {train_set.category_ids}; both splits need the same ones")
    global_batch = cfg["batch_size"] * world_size
    if len(train_set) < global_batch:
        raise DataError(f"{train_set.name} has {len(train_set)} training images with boxes, fewer than one global "
                        f"batch of {global_batch} (batch_size {cfg['batch_size']} x {world_size} processes); "
                        "lower batch_size")
    return train_set, val_set


def train_detector(
    recipe: Union[str, Path] = "mask_rcnn_1x",
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
) -> dict[str, Any]:
    """Run a detection training job; return its summary (also written to ``summary.json``).

    Raises:
        Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    cfg = build_config(recipe_path(recipe), overrides)
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
    train_set, val_set = _datasets(cfg, info.world_size)
    folder = on_primary(lambda: claim_run(out, resume=bool(cfg["resume"]), overwrite=cfg["overwrite"]))
    barrier()
    try:
        with StopRequest() as stop:
            return _run(cfg, info, precision, out, train_set, val_set, folder.notes if folder else [], stop)
    finally:
        if folder is not None:
            folder.release()


def _run(cfg: dict[str, Any], info: DistInfo, precision: str, out: Path, train_set: CocoDetection,
         val_set: CocoDetection, notes: list[str], stop: StopRequest) -> dict[str, Any]:
    """The body of :func:`train_detector`, inside a claimed run folder."""
    job = _Job(cfg, info, precision, out, train_set, val_set)
    checkpoint, note = resume_path(cfg["resume"], out)
    progress = Progress(best={"bbox_AP": -1.0, "epoch": -1}, carried=[0.0] * (len(LOSSES) + 3))
    if checkpoint is not None:
        progress = _resume(job, checkpoint)
    else:
        _seed(cfg["seed"] + info.rank)
    for line in notes + ([note] if note else []) + job.notes:
        _log(info, out, line)
    params = sum(p.numel() for p in job.model.parameters())
    dropped = ", ".join(f"{v} {k}" for k, v in train_set.dropped.items() if v)
    _log(info, out, f"detector {cfg['model']} ({params / 1e6:.2f}M params, {train_set.num_classes} classes, "
                    f"{'masks' if train_set.has_masks else 'boxes only'}) on {info.device}, {info.world_size} "
                    f"process(es), precision {precision}")
    _log(info, out, f"data {cfg['data']}: {len(train_set)} train / {len(val_set)} val images"
                    f"{f' ({dropped} dropped as mmdet does)' if dropped else ''}, {job.steps_per_epoch} steps per "
                    f"epoch; lr {job.lr:.3g} = {cfg['lr']:g} x global batch {job.global_batch} / {cfg['lr_batch']}")
    writer = None
    if info.primary:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        writer = SummaryWriter(str(out / "tensorboard"))
    start = time.time()
    while progress.epoch < cfg["epochs"]:
        row = _train_epoch(job, progress, stop)
        progress.epoch += 1
        progress.batch_in_epoch, progress.carried, progress.epoch_time = 0, [0.0] * (len(LOSSES) + 3), 0.0
        if progress.epoch % cfg["eval_every"] == 0 or progress.epoch == cfg["epochs"]:
            row.update(_evaluate(job))
        progress.history.append(row)
        improved = row.get("bbox_AP", -1.0) > progress.best["bbox_AP"]
        if improved:
            progress.best = {"bbox_AP": row["bbox_AP"], "epoch": row["epoch"]}
        stopping = progress.epoch < cfg["epochs"] and stop.requested()
        if (improved or stopping or progress.epoch == cfg["epochs"]
                or progress.epoch % cfg["ckpt_every_epochs"] == 0):
            last = _save(job, progress, ("epoch", "best") if improved else ("epoch",))
        if writer is not None:
            atomic_write_csv(out / "metrics.csv", progress.history)
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()
        ap = "".join(f", {t} AP {row[f'{t}_AP']:.1f}" for t in ("bbox", "segm") if f"{t}_AP" in row)
        _log(info, out, f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
                        f"{row['img_per_s']:.1f} img/s{ap}")
        if stopping:
            raise Interrupted(stop.signum, last, progress.epoch, progress.step)
    last_row = progress.history[-1] if progress.history else {}
    summary = {
        "model": cfg["model"], "data": cfg["data"], "epochs": cfg["epochs"], "steps": progress.step, "params": params,
        "bbox": {k.removeprefix("bbox_"): v for k, v in last_row.items() if k.startswith("bbox_")},
        "segm": {k.removeprefix("segm_"): v for k, v in last_row.items() if k.startswith("segm_")},
        "best": progress.best, "train_time_s": sum(r["epoch_time_s"] for r in progress.history),
        "world_size": info.world_size, "lr": job.lr, "global_batch": job.global_batch, "output": str(out),
        "history": progress.history, "version": __version__,
    }
    if writer is not None:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        writer.close()
    _log(info, out, f"done in {time.time() - start:.0f}s: {out / 'summary.json'}")
    return summary


__all__ = ["train_detector", "lr_factor", "param_groups", "recipe_path"]
