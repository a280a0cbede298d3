"""Training and evaluation with the paper's recipe, on a CPU, one GPU or many (torchrun / SLURM).

``train(recipe, overrides)`` runs a whole training job and returns its summary; ``evaluate``
measures top-1/top-5. The recipe machinery is in :mod:`tokenmixers.config`, the data in
:mod:`tokenmixers.data`. timm provides the transforms, Mixup/CutMix, losses, EMA, the optimizer's
parameter groups (no weight decay for norms, biases, 1-D parameters and ``no_weight_decay()``
names) and the per-step warm-up + cosine schedule.

A training checkpoint holds everything needed to continue exactly: model, EMA, optimizer,
scheduler, grad scaler, epoch, optimizer step, position inside the epoch, the RNG states of
every process, the resolved config, the metrics so far and the package version. Checkpoints are
written atomically by process 0: ``last.pth`` (every save), ``best.pth`` (best top-1) and
``epoch_XXXX.pth`` (the last ``keep_checkpoints``). ``resume=auto`` continues from ``last.pth``
in the output folder.
"""
from __future__ import annotations

import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint, read_state_dict, safe_torch_load
from .config import build_config
from .converters import to_tokenmixers
from .data import DataError, EpochSampler, ImageDataset, ShardSampler, build_dataset, check_labels
from .distributed import DistInfo, all_reduce_sum, barrier, convert_batchnorm, init_distributed
from .files import atomic_write, atomic_write_csv, atomic_write_text
from .zoo import check_model_name, create_model

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- small helpers --------------------------------------------------------------------------------------


def _log(info: DistInfo, out: Optional[Path], message: str) -> None:
    """Print on process 0 and append to ``log.txt``."""
    if not info.primary:
        return
    print(message, flush=True)
    if out is not None:
        with open(out / "log.txt", "a") as f:
            f.write(message + "\n")


def _rng_state() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _transforms(cfg: Mapping[str, Any], training: bool) -> Any:
    """timm's ImageNet transforms for the recipe (train: RandomResizedCrop, RandAugment, erasing)."""
    from timm.data import create_transform

    if not training:
        return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    return create_transform(
        cfg["input_size"],
        is_training=True,
        scale=tuple(cfg["scale"]),
        ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"],
        color_jitter=cfg["color_jitter"],
        auto_augment=cfg["auto_augment"],
        interpolation=cfg["interpolation"],
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
        re_count=cfg["recount"],
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


def _loader(dataset: ImageDataset, batch_size: int, sampler: Any, cfg: Mapping[str, Any], info: DistInfo,
            drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg["workers"],
        collate_fn=ImageDataset.collate,
        drop_last=drop_last,
        pin_memory=cfg["pin_memory"] and info.device.type == "cuda",
        persistent_workers=False,
    )


def evaluate_checkpoint(
    model_name: str,
    checkpoint: Optional[str],
    data: str,
    *,
    split: str = "val",
    batch_size: int = 64,
    input_size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    num_classes: Optional[int] = None,
    device: str = "auto",
    precision: str = "fp32",
    workers: int = 4,
    label_map: Optional[str] = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the raw and (when present) EMA weights of a checkpoint; works under torchrun too."""
    info = init_distributed(device)
    cfg = {"input_size": input_size, "crop_pct": crop_pct, "interpolation": interpolation, "workers": workers,
           "pin_memory": True}
    dataset = build_dataset(data, split, _transforms(cfg, training=False), image_size=input_size)
    if num_classes is None and checkpoint is not None:
        weights, _ = to_tokenmixers(read_state_dict(checkpoint)[0])
        num_classes = weights["head.fc.weight"].shape[0] if "head.fc.weight" in weights else None
    num_classes = num_classes or len(dataset.classes)
    check_labels(dataset, num_classes)
    loader = _loader(dataset, batch_size, ShardSampler(len(dataset), info.rank, info.world_size), cfg, info, False)
    results = {}
    for entry, label in (("auto", "raw"), ("ema", "ema")):
        model = create_model(model_name, num_classes=num_classes)
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
    return results


# -- training -----------------------------------------------------------------------------------------


def _save(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save``."""
    atomic_write(path, lambda f: torch.save(state, f))


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every process's RNG state, on process 0."""
    state = _rng_state()
    if not info.distributed:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def train(
    recipe: Union[str, Path] = "transformer",
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
) -> dict[str, Any]:
    """Run a training job; return its summary (also written to ``summary.json``).

    Args:
        recipe: a shipped recipe name (``transformer``, ``cnn``, ``digits``) or a YAML path.
        overrides: settings to change, as a mapping or ``key=value`` strings.
    """
    cfg = build_config(recipe, overrides)
    check_model_name(cfg["model"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    info = init_distributed(cfg["device"])
    precision = resolve_precision(cfg["precision"], info.device)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    out = Path(str(cfg["output"]).format(model=cfg["model"]))
    if info.primary:
        out.mkdir(parents=True, exist_ok=True)
    barrier()

    # data, checked before anything expensive happens
    train_set = build_dataset(cfg["data"], "train", _transforms(cfg, True), image_size=cfg["input_size"])
    val_set = build_dataset(cfg["data"], "val", _transforms(cfg, False), image_size=cfg["input_size"])
    num_classes = cfg["num_classes"] or max(len(train_set.classes), len(val_set.classes))
    check_labels(train_set, num_classes)
    check_labels(val_set, num_classes)
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    if len(train_set) < global_batch:
        raise DataError(
            f"{train_set.name} has {len(train_set)} images, fewer than one global batch of {global_batch} "
            f"(batch_size {cfg['batch_size']} x accum_steps {cfg['accum_steps']} x {info.world_size} processes); "
            "lower batch_size"
        )
    if cfg["deterministic"]:
        train_set.seed = cfg["seed"]
    sampler = EpochSampler(len(train_set), info.rank, info.world_size, seed=cfg["seed"])
    train_loader = _loader(train_set, cfg["batch_size"], sampler, cfg, info, drop_last=True)
    val_loader = _loader(val_set, cfg["batch_size"], ShardSampler(len(val_set), info.rank, info.world_size), cfg, info, False)
    batches_per_epoch = len(train_loader) - len(train_loader) % cfg["accum_steps"]
    if cfg["max_steps_per_epoch"]:
        batches_per_epoch = min(batches_per_epoch, cfg["max_steps_per_epoch"] * cfg["accum_steps"])
    steps_per_epoch = batches_per_epoch // cfg["accum_steps"]

    # model, EMA, optimizer, schedule
    _seed_everything(cfg["seed"])
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

    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg["ema_decay"]) if cfg["ema"] else None
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
    forward = torch.compile(ddp, dynamic=False) if cfg["compile"] else ddp

    # resume
    epoch, step, batch_in_epoch, history, best = 0, 0, 0, [], {"top1": -1.0, "epoch": -1}
    resume = cfg["resume"]
    if resume == "auto":
        resume = str(out / "last.pth") if (out / "last.pth").is_file() else None
    if resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume checkpoint {resume} does not exist (resume=auto finds {out / 'last.pth'})")
        state = safe_torch_load(Path(resume))
        model.load_state_dict(state["model"])
        if ema is not None and state.get("model_ema") is not None:
            ema.module.load_state_dict(state["model_ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        history, best = state["metrics"], state["best"]
        if len(state["rng"]) == info.world_size:
            _set_rng_state(state["rng"][info.rank])
        else:
            _log(info, out, f"warning: checkpoint from {len(state['rng'])} processes, now {info.world_size}: RNG re-seeded")
            _seed_everything(cfg["seed"] + 1000 * step + info.rank)
        _log(info, out, f"resumed from {resume}: epoch {epoch}, step {step}, batch {batch_in_epoch} of the epoch")
    else:
        _seed_everything(cfg["seed"] + info.rank)
    scheduler.step_update(step)

    params = sum(p.numel() for p in model.parameters())
    _log(info, out, f"model {cfg['model']} ({params / 1e6:.2f}M params, {num_classes} classes) on {info.device}, "
                    f"{info.world_size} process(es), precision {precision}")
    _log(info, out, f"data {cfg['data']}: {len(train_set)} train / {len(val_set)} val images, "
                    f"{steps_per_epoch} steps per epoch")
    _log(info, out, f"lr {lr:.3g} = {cfg['lr']:g} x global batch {global_batch} / {cfg['lr_batch']}")
    if info.primary:
        import yaml

        atomic_write_text(out / "config.yaml", yaml.safe_dump({**cfg, "resolved": {
            "lr": lr, "global_batch": global_batch, "num_classes": num_classes, "world_size": info.world_size,
            "precision": precision, "steps_per_epoch": steps_per_epoch}}, sort_keys=False))
    writer = None
    if info.primary:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            writer = None

    def save(kind: str) -> None:
        rng = _gather_rng(info)
        if not info.primary:
            return
        state = {
            "model": model.state_dict(), "model_ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng, "config": cfg,
            "metrics": history, "best": best, "version": __version__, "world_size": info.world_size,
        }
        _save(out / "last.pth", state)
        if kind == "epoch":
            _save(out / f"epoch_{epoch:04d}.pth", state)
            kept = sorted(out.glob("epoch_*.pth"))
            for old in kept[: max(len(kept) - cfg["keep_checkpoints"], 0)]:
                old.unlink()
        if kind == "best":
            _save(out / "best.pth", state)

    from tqdm import tqdm

    start_time, skipped_total = time.time(), 0
    while epoch < cfg["epochs"]:
        model.train()
        sampler.set_epoch(epoch, start=batch_in_epoch * cfg["batch_size"])
        train_set.epoch = epoch
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)  # on the device: no sync per step
        seen, skipped, t0 = 0, 0, time.time()
        bar = tqdm(total=batches_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}", disable=not info.primary,
                   leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        for images, labels, n_skipped in train_loader:
            if batch_in_epoch >= batches_per_epoch:
                break
            skipped += n_skipped
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            if cfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None and images.shape[0] % 2:
                images, labels = images[:-1], labels[:-1]  # Mixup needs an even batch
            if mixup is not None and images.shape[0]:
                images, targets = mixup(images, labels)
            else:
                targets = labels
            sync = (batch_in_epoch + 1) % cfg["accum_steps"] == 0
            with (ddp.no_sync() if info.distributed and not sync else nullcontext()):
                with _autocast(info.device, precision):
                    if images.shape[0]:
                        loss = criterion(forward(images), targets)
                    else:  # every image of this batch was unreadable: keep the processes in step
                        loss = sum(p.sum() for p in model.parameters()) * 0.0
                scaled = loss / cfg["accum_steps"]
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            batch_in_epoch += 1
            loss_sum += loss.detach().double() * images.shape[0]
            seen += images.shape[0]
            if sync:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg["clip_grad"]:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(model)
                if cfg["ckpt_every_steps"] and step % cfg["ckpt_every_steps"] == 0 and batch_in_epoch < batches_per_epoch:
                    save("step")
            bar.update(1)
            if batch_in_epoch % cfg["log_every"] == 0 or batch_in_epoch == batches_per_epoch:
                rate = seen * info.world_size / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}")
        bar.close()
        epoch_time = time.time() - t0
        totals = all_reduce_sum(torch.tensor([loss_sum.item(), seen, skipped], dtype=torch.float64))
        skipped_total += int(totals[2])
        row: dict[str, Any] = {
            "epoch": epoch, "step": step, "train_loss": totals[0].item() / max(totals[1].item(), 1),
            "lr": optimizer.param_groups[0]["lr"], "img_per_s": totals[1].item() / max(epoch_time, 1e-9),
            "skipped_images": int(totals[2]), "epoch_time_s": epoch_time,
        }
        epoch += 1
        batch_in_epoch = 0
        if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
            raw = evaluate(model, val_loader, info.device, precision)
            row.update(top1=raw["top1"], top5=raw["top5"], val_loss=raw["loss"], val_images=raw["count"])
            if ema is not None:
                ema_metrics = evaluate(ema.module, val_loader, info.device, precision)
                row.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
        history.append(row)
        improved = row.get("top1", -1.0) > best["top1"]
        if improved:
            best = {"top1": row["top1"], "epoch": row["epoch"]}
        save("epoch")
        if improved:
            save("best")
        if info.primary:
            atomic_write_csv(out / "metrics.csv", history)
            if writer is not None:
                for key, value in row.items():
                    if key not in ("epoch",):
                        writer.add_scalar(key, value, row["epoch"])
                writer.flush()
        message = f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, {row['img_per_s']:.0f} img/s"
        if "top1" in row:
            message += f", top-1 {row['top1']:.2f} / top-5 {row['top5']:.2f}"
            if "ema_top1" in row:
                message += f" (EMA {row['ema_top1']:.2f} / {row['ema_top5']:.2f})"
        if row["skipped_images"]:
            message += f", {row['skipped_images']} unreadable image(s) skipped"
        _log(info, out, message)

    last = history[-1] if history else {}
    summary = {
        "model": cfg["model"], "data": cfg["data"], "epochs": cfg["epochs"], "steps": step,
        "params": sum(p.numel() for p in model.parameters()),
        "top1": last.get("top1"), "top5": last.get("top5"), "ema_top1": last.get("ema_top1"),
        "ema_top5": last.get("ema_top5"), "best_top1": best["top1"], "best_epoch": best["epoch"],
        "train_time_s": sum(r["epoch_time_s"] for r in history), "skipped_images": sum(r["skipped_images"] for r in history),
        "world_size": info.world_size, "lr": lr, "global_batch": global_batch, "output": str(out),
        "history": history, "version": __version__,
    }
    if info.primary:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if writer is not None:
            writer.close()
    _log(info, out, f"done in {time.time() - start_time:.0f}s: {out / 'summary.json'}")
    return summary


def lr_for(global_batch: int, recipe: Union[str, Path] = "transformer") -> float:
    """The learning rate a recipe uses at a global batch size (linear scaling)."""
    cfg = build_config(recipe)
    return cfg["lr"] * global_batch / cfg["lr_batch"]


__all__ = ["train", "evaluate", "evaluate_checkpoint", "lr_for", "resolve_precision"]
