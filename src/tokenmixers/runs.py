"""The one run engine: everything a training run does besides its task, written once for every task.

A task (:class:`Task`: classification, detection, your own) says how to build its data and model,
what one step's losses are and how to evaluate; :func:`train` does the rest:

* the run folder (:func:`claim_run`): a lock file (pid and host) keeps a second live run out, a
  stale lock of a dead process is taken over with a note, and a folder that holds a started or
  finished run is refused unless the run resumes or overwrites it;
* the recipe (:class:`RunSettings`, extended by the task's settings), seeding, precision
  (:mod:`tokenmixers.precision`), DDP under torchrun / SLURM, the optimizer (timm), the learning-rate
  schedule, gradient accumulation and clipping, EMA weights;
* progress (a bar on a terminal, a line every ``log_every`` steps otherwise), ``log.txt``,
  ``metrics.csv``, TensorBoard and ``summary.json``;
* full-state checkpoints (:func:`save_state`) at step or epoch intervals, written atomically:
  ``last.pth``, ``best.pth`` (the task's best metric) and ``epoch_NNNN.pth``, independent copies;
* exact resume (``resume=auto`` or a file), also mid-epoch, falling back to the newest readable
  snapshot when the last one is damaged;
* interrupts (:class:`StopRequest`): SIGINT (Ctrl-C) and SIGTERM (what schedulers send before
  killing a job) save at the next step boundary and raise :class:`Interrupted`.

Errors a user can cause are ``ValueError`` (or ``KeyError`` / ``OSError``) subclasses whose message
is one paragraph: what is wrong, where, and how to fix it. :class:`RunError` is this module's; the
command line prints the message alone, without a traceback.
"""
from __future__ import annotations

import atexit
import json
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours, so ours runs first
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .checkpoint import CheckpointError, group_keys, safe_torch_load
from .data import EpochSampler, ShardSampler
from .distributed import DistInfo, all_reduce_sum, barrier, convert_batchnorm, init_distributed, on_primary
from .files import atomic_copy, atomic_write, atomic_write_csv, atomic_write_text
from .precision import autocast, resolve_precision
from .recipe import Overrides, Settings, load_settings

LOCK_NAME = ".lock"
CHECKPOINT_NAME = "last.pth"
# what a run writes into its folder; overwrite removes exactly these (other files are left alone)
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "summary.json", "config.yaml", "log.txt")
RUN_GLOBS = ("epoch_*.pth",)
RUN_DIRS = ("tensorboard",)
FUSED_OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov")  # timm names of torch optimizers with fused=True


class RunError(ValueError):
    """A run that cannot start or continue; the message says why and how to fix it."""


class Interrupted(Exception):
    """A run stopped by a signal after saving its state at a step boundary."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, Path(checkpoint), epoch, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {step}; "
                         f"the run is saved in {self.checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


# -- the run folder ----------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """An output folder claimed by this process; :meth:`release` (or leaving the ``with``) frees it."""

    path: Path
    notes: list[str] = field(default_factory=list)
    lock: Optional[Path] = None

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.lock is not None and _read_lock(self.lock).get("pid") == os.getpid():
            self.lock.unlink(missing_ok=True)
        self.lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_lock(path: Path) -> tuple[Path, Optional[str]]:
    """Create ``path/.lock`` atomically (written, then hard-linked into place); return it and a note."""
    lock = path / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = path / f".lock.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(me))
    except OSError as err:
        raise RunError(f"cannot write to the output folder {path} ({err.strerror}); choose a folder you can write to "
                       "(--output / output=...)") from None
    note = None
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)  # fails if the lock exists: no window where two runs both hold it
                return lock, note
            except FileExistsError:
                owner = _read_lock(lock)
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    lock.unlink(missing_ok=True)
                    note = f"took over the lock of process {pid}, which no longer runs"
                    continue
                raise RunError(
                    f"{path} is in use by another run (process {pid} on {host}, since {owner.get('since')}); "
                    f"wait for it to finish or choose another output folder. If that run is no longer alive, "
                    f"delete {lock}."
                ) from None
        raise RunError(f"could not lock {path}: {lock} keeps reappearing; choose another output folder")
    finally:
        tmp.unlink(missing_ok=True)


def run_status(path: Path) -> Optional[str]:
    """``"finished"`` (a summary exists), ``"started"`` (checkpoints or metrics: work that would be lost) or None.

    A run that stopped before its first checkpoint left only its config and log: starting again there is fine.
    """
    if (path / "summary.json").is_file():
        return "finished"
    started = [n for n in ("last.pth", "metrics.csv") if (path / n).is_file()]
    return "started" if started or any(path.glob(RUN_GLOBS[0])) else None


def _clear_run(path: Path) -> list[str]:
    """Delete the files a previous run wrote into ``path``; return their names."""
    removed = []
    for name in RUN_FILES:
        if (path / name).is_file():
            (path / name).unlink()
            removed.append(name)
    for pattern in RUN_GLOBS:
        for f in sorted(path.glob(pattern)):
            f.unlink()
            removed.append(f.name)
    for name in RUN_DIRS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)
            removed.append(name + "/")
    return removed


def claim_run(path: os.PathLike, *, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Create and lock the output folder of a run; refuse to reuse one that holds another run.

    Args:
        path: the output folder (created if missing).
        resume: the run continues the one in the folder (``resume=auto`` or a checkpoint).
        overwrite: delete what a previous run wrote there and start again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"the output {path} is a file, not a folder; choose a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create the output folder {path}: {err.strerror}; choose another path") from None
    lock, note = _take_lock(path)
    run = RunFolder(path, [note] if note else [], lock)
    status = run_status(path)
    if status and not resume and not overwrite:
        run.release()
        raise RunError(
            f"{path} already holds a {status} run; continue it with --resume auto (resume=auto), start it over "
            "with --overwrite (overwrite=true), or choose another output folder"
        )
    if status and overwrite and not resume:
        run.notes.append(f"overwrite: removed the previous run's {', '.join(_clear_run(path))}")
    return run


# -- full-state checkpoints ---------------------------------------------------------------------------


def save_state(path: os.PathLike, parts: Mapping[str, Any], **values: Any) -> Path:
    """Atomically write every part's ``state_dict()`` (None for an absent part) and the plain ``values``."""
    state = {name: part.state_dict() if part is not None else None for name, part in parts.items()}
    overlap = set(state) & set(values)
    if overlap:
        raise ValueError(f"save_state: {sorted(overlap)} given both as parts and as values")
    return atomic_write(path, lambda f: torch.save({**state, **values}, f))


def keep_snapshots(last: Path, epoch: int, snapshots: Sequence[str], keep: int) -> None:
    """Copy ``last`` to ``epoch_NNNN.pth`` (keeping the newest ``keep``) and/or ``best.pth``, as ``snapshots`` ask."""
    if "epoch" in snapshots:
        atomic_copy(last, last.parent / f"epoch_{epoch:04d}.pth")
        kept = sorted(last.parent.glob("epoch_*.pth"))
        for old in kept[: max(len(kept) - keep, 0)]:
            old.unlink()
    if "best" in snapshots:
        atomic_copy(last, last.parent / "best.pth")


def check_same_model(path: Path, saved_model: Any, model: str) -> None:
    """A run resumes only the model it trained: a clear error naming both otherwise."""
    if saved_model != model:
        raise RunError(f"{path} is a checkpoint of {saved_model}, but this run trains {model}; "
                       f"resume with --model {saved_model}, or start a new run (another output folder, "
                       "or --overwrite)")


def _check_fits(path: Path, name: str, module: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Every key and shape of a module's saved state must match exactly (resuming adapts nothing)."""
    target = module.state_dict()
    missing = [k for k in target if k not in saved]
    unexpected = [k for k in saved if k not in target]
    shapes = [f"{k}: saved {tuple(saved[k].shape)} vs now {tuple(v.shape)}"
              for k, v in target.items() if k in saved and saved[k].shape != v.shape]
    if missing or unexpected or shapes:
        details = []
        if shapes:
            details.append(f"{len(shapes)} shape(s) differ, e.g. {'; '.join(shapes[:3])}")
        if missing:
            details.append(f"missing: {group_keys(missing, 3)}")
        if unexpected:
            details.append(f"extra: {group_keys(unexpected, 3)}")
        raise RunError(f"{path} does not fit this run's {name} ({'; '.join(details)}); it was saved by a different "
                       "model or setup: resume with the settings it was trained with, or start a new run")


def restore_state(source: Union[os.PathLike, Mapping[str, Any]], parts: Mapping[str, Any],
                  where: Optional[os.PathLike] = None) -> dict[str, Any]:
    """Load what :func:`save_state` wrote (a file, or its already loaded contents) into ``parts``; return the values.

    Absent parts (None) and entries saved as None are skipped; ``where`` names the file in errors.
    """
    if isinstance(source, Mapping):
        state, path = source, Path(where or "the checkpoint")
    else:
        path = Path(source)
        state = safe_torch_load(path)
    if not isinstance(state, Mapping):
        raise RunError(f"{path} is not a training checkpoint (it holds a {type(state).__name__})")
    for name, part in parts.items():
        saved = state.get(name)
        if part is None or saved is None:
            continue
        if isinstance(part, torch.nn.Module):
            _check_fits(path, name, part, saved)
        try:
            part.load_state_dict(saved)
        except (KeyError, ValueError, RuntimeError) as err:
            raise RunError(f"{path} does not fit this run's {name} ({str(err).splitlines()[0][:200]}); resume with "
                           "the settings it was trained with, or start a new run") from None
    return {k: v for k, v in state.items() if k not in parts}


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- interrupts ---------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM request a stop at the next step boundary; a second SIGINT stops at once.

    Use as a context manager around the training loop and ask :meth:`requested` at each step
    boundary: under DDP the answer is agreed by all processes (one tiny all-reduce on a CPU group),
    so every process saves at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # agreeing through NCCL would sync the GPU every step; a gloo group keeps it on the host
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signum = signum

    def requested(self) -> bool:
        """Whether any process was asked to stop."""
        if self._group is None:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())  # another process received it
        return bool(flag.item())


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the main process, which saves and stops.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group; a worker that died
    of them would make the main process fail before it could save.
    """
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@atexit.register
def _kill_loader_workers() -> None:
    """At exit, kill the loader workers still alive: they ignore the SIGTERM that would end them.

    multiprocessing's exit hook (run after this one) ends daemonic children with SIGTERM, then joins
    them without a timeout. A loader's iterator normally stops its workers first, but after an error
    raised in a worker the iterator is still referenced by the error's traceback at exit, and that
    join would wait forever.
    """
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for the killed workers
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)


# -- settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings(Settings):
    """The engine's settings, shared by every task; a task's settings extend them with its own.

    The defaults are the paper's shared recipe (Table III); a task's settings change what differs.
    """

    model: str = "unified_halo_tiny"
    data: Optional[str] = None            # the task's data: a folder, or a built-in set's name
    output: str = "runs"                  # the run folder; "{model}" is replaced by the model's name
    epochs: int = 300
    batch_size: int = 128                 # per process
    accum_steps: int = 1                  # batches per optimizer step
    lr: float = 1.0e-3                    # at a global batch of lr_batch; scales linearly with the actual one
    lr_batch: int = 1024
    opt: str = "adamw"                    # any timm optimizer
    opt_eps: float = 1.0e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    fused_optimizer: bool = True          # one fused kernel over all parameters (torch's AdamW, Adam, SGD; ~3x on a CPU)
    weight_decay: float = 0.05            # the task decides which parameters are exempt
    clip_grad: float = 5.0                # gradient norm clipping (0: none)
    sched: str = "cosine"                 # per step: a timm schedule (cosine, ...), or mmcv's "step" / "poly"
    warmup_epochs: float = 20.0           # timm schedules: linear warm-up from warmup_lr over these epochs
    warmup_lr: float = 1.0e-6
    min_lr: float = 1.0e-5
    warmup_iters: int = 0                 # "step"/"poly": linear warm-up from warmup_ratio x lr over these steps
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = ()      # "step": epochs after which the lr is multiplied by gamma
    gamma: float = 0.1
    poly_power: float = 1.0               # "poly": the exponent (min_lr is the floor)
    ema: bool = True                      # keep an exponential moving average of the weights, evaluated too
    ema_decay: float = 0.9999
    drop_path: Optional[float] = None     # null: the model's own rate
    init_weights: Optional[str] = None    # a checkpoint to start from (the task loads it)
    device: str = "auto"                  # auto: cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 + grad scaler on CUDA, fp32 on CPU
    compile: bool = False                 # torch.compile the training forward
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    sync_bn: bool = True                  # BatchNorm statistics over the global batch under DDP
    workers: Optional[int] = None         # loader processes per training process (null: min(8, CPUs per process))
    pin_memory: bool = True
    threads: int = 0                      # CPU threads per process (0: torch's default)
    seed: int = 0
    deterministic: bool = False           # deterministic kernels and per-sample augmentation seeds
    eval_every: int = 1                   # epochs (and always after the last)
    log_every: int = 50                   # steps
    ckpt_every_steps: int = 0             # extra mid-epoch checkpoints (0: none)
    ckpt_every_epochs: int = 1            # and always after the last epoch, a new best or a stop
    keep_checkpoints: int = 3             # epoch_NNNN.pth snapshots kept
    resume: Optional[str] = None          # null, "auto" (the run in the output folder) or a checkpoint file
    overwrite: bool = False               # start over in a folder that holds a previous run (deletes its files)
    max_steps_per_epoch: int = 0          # 0: whole epochs; > 0 caps an epoch (smoke runs)

    BOUNDS: ClassVar[dict[str, tuple[Optional[float], Optional[float]]]] = {
        "epochs": (1, None), "batch_size": (1, None), "accum_steps": (1, None), "lr": (0, None), "lr_batch": (1, None),
        "warmup_epochs": (0, None), "warmup_lr": (0, None), "min_lr": (0, None), "warmup_iters": (0, None),
        "warmup_ratio": (0, 1), "gamma": (0, None), "poly_power": (0, None), "weight_decay": (0, None), "clip_grad": (0, None),
        "drop_path": (0, 0.999), "ema_decay": (0, 1), "workers": (0, None), "threads": (0, None),
        "eval_every": (1, None), "log_every": (1, None), "ckpt_every_steps": (0, None), "ckpt_every_epochs": (1, None),
        "keep_checkpoints": (1, None), "max_steps_per_epoch": (0, None),
    }


# -- the task interface ---------------------------------------------------------------------------------


class Task:
    """A training task: its settings, data, model, one step's losses and its evaluation.

    Subclass it, set the class attributes, implement :meth:`datasets`, :meth:`build_model`,
    :meth:`step` and :meth:`evaluate`, and run it with :func:`train`. Everything else a run does is
    the engine's. A batch from the task's datasets is ``(inputs, targets)`` or ``(inputs, targets,
    skipped)`` (images that could not be read); inputs and targets are moved to the device before
    :meth:`step` sees them.
    """

    name: ClassVar[str] = "task"
    settings: ClassVar[type[RunSettings]] = RunSettings
    recipes: ClassVar[Optional[Path]] = None     # folder of the task's shipped recipes
    loss_names: ClassVar[tuple[str, ...]] = ("loss",)  # what step() returns; metrics.csv has a column each
    best_metric: ClassVar[str] = "loss"          # the evaluation metric that decides best.pth
    best_mode: ClassVar[Literal["max", "min"]] = "max"

    def __init__(self, cfg: RunSettings, info: DistInfo, precision: str) -> None:
        self.cfg, self.info, self.precision = cfg, info, precision

    @classmethod
    def load_settings(cls, recipe: Union[str, Path, None] = None, overrides: Overrides = None) -> RunSettings:
        """The task's settings: its defaults, a recipe (shipped name or YAML path) and overrides."""
        return load_settings(cls.settings, recipe, overrides, cls.recipes or Path("."))

    def datasets(self) -> tuple[Dataset, Dataset]:
        """The training and validation data, checked (called before the run folder is touched)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (the engine moves it; seeded alike on every process)."""
        raise NotImplementedError

    def step(self, model: Any, inputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """One training batch's losses (``loss_names``); ``model`` is the (DDP / compiled) forward to call."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Metrics of ``model`` on the validation loader (every image once over all processes)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: by default timm's (no decay for 1-D parameters and ``no_weight_decay()`` names)."""
        no_decay = getattr(model, "no_weight_decay", lambda: set())()
        return param_groups_weight_decay(model, weight_decay=self.cfg.weight_decay, no_weight_decay_list=no_decay)

    def describe(self, model: nn.Module, train_set: Dataset, val_set: Dataset, steps_per_epoch: int) -> list[str]:
        """Lines for the log's header: the data, the classes, anything the task decided."""
        return [f"data {self.cfg.data}: {len(train_set)} train / {len(val_set)} val samples, {steps_per_epoch} steps "
                "per epoch"]

    def report(self, row: Mapping[str, Any]) -> str:
        """The task's part of an epoch's log line, e.g. ``, top-1 80.12``."""
        return "".join(f", {k} {v:.4g}" for k, v in row.items() if k == self.best_metric)

    def checkpoint_values(self) -> dict[str, Any]:
        """Plain values saved with every checkpoint besides the engine's (e.g. how to rebuild the model)."""
        return {}

    def check_resume(self, state: Mapping[str, Any], path: Path) -> None:
        """Refuse, with a clear :class:`RunError`, a checkpoint this run cannot continue (another setup)."""

    def resolved(self) -> dict[str, Any]:
        """Values the task decided (e.g. the number of classes), saved in ``config.yaml``."""
        return {}

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The task's part of ``summary.json`` (e.g. the last evaluation's metrics)."""
        return {k: v for k, v in (history[-1] if history else {}).items() if k == self.best_metric}


# -- small helpers ----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (timm's helper)."""
    random_seed(seed % 2**32)


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


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors, and lists / tuples / dicts of them, moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def unpack(batch: Sequence[Any]) -> tuple[Any, Any, int, int]:
    """A batch as (inputs, targets, images in it, images skipped as unreadable)."""
    inputs, targets, *rest = batch
    return inputs, targets, len(inputs), int(rest[0]) if rest else 0


def loader(dataset: Dataset, batch_size: int, sampler: Any, workers: int, *, drop_last: bool = False,
           pin_memory: bool = False, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A DataLoader over a dataset with its own ``collate`` (when it has one); workers leave signals to us."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=getattr(dataset, "collate", None), drop_last=drop_last, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals, generator=generator)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, info: DistInfo) -> DataLoader:
    """Evaluation batches of this process's share of ``dataset``: every sample once over all processes."""
    return loader(dataset, batch_size, ShardSampler(len(dataset), info.rank, info.world_size), workers,
                  pin_memory=info.device.type == "cuda")


def show_progress() -> bool:
    """Progress bars only on a terminal: redirected to a file they would write thousands of frames."""
    return sys.stderr.isatty()


@torch.no_grad()
def predictions(model: nn.Module, loader: DataLoader, info: DistInfo, precision: str = "fp32",
                desc: str = "evaluating") -> Iterator[tuple[Any, Any, int]]:
    """The one evaluation loop: ``(outputs, targets, skipped)`` for each batch of a loader, in eval mode.

    ``outputs`` is None for a batch whose every image was unreadable. The model's training mode is
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (info.primary and
                                                                                          show_progress())):
            inputs, targets, n, skipped = unpack(batch)
            if not n:
                yield None, targets, skipped
                continue
            with autocast(info.device, precision):
                outputs = model(to_device(inputs, info.device))
            yield outputs, targets, skipped
    finally:
        model.train(was_training)


class StepSchedule:
    """mmcv's per-iteration schedules: ``sched="step"`` (mmdetection: x ``gamma`` after each milestone epoch) or
    ``sched="poly"`` (mmsegmentation: ``(lr - min_lr) (1 - step / steps)^poly_power + min_lr``), both with
    mmcv's linear warm-up: the scheduled lr x ``1 - (1 - step / warmup_iters)(1 - warmup_ratio)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: RunSettings, steps_per_epoch: int) -> None:
        self.optimizer, self.cfg, self.steps_per_epoch = optimizer, cfg, steps_per_epoch
        self.base = [group["lr"] for group in optimizer.param_groups]

    def lr(self, step: int, base: float) -> float:
        """The lr of an optimizer step for a group whose scheduled lr is ``base``."""
        cfg = self.cfg
        if cfg.sched == "poly":
            left = max(0.0, 1 - step / (cfg.epochs * self.steps_per_epoch))
            lr = (base - cfg.min_lr) * left**cfg.poly_power + cfg.min_lr
        else:
            lr = base * cfg.gamma ** sum(step >= m * self.steps_per_epoch for m in cfg.milestones)
        if step < cfg.warmup_iters:
            lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return lr

    def factor(self, step: int) -> float:
        """The lr multiplier of the ``step`` schedule at an optimizer step."""
        return self.lr(step, 1.0)

    def step_update(self, num_updates: int) -> None:
        """Set the lr of the next optimizer step."""
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr(num_updates, base)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the lr is a function of the step."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


def make_schedule(optimizer: torch.optim.Optimizer, cfg: RunSettings, steps_per_epoch: int) -> Any:
    """The per-step lr schedule of a recipe: mmcv's ``step`` or ``poly``, or any timm schedule with warm-up."""
    if cfg.sched in ("step", "poly"):
        return StepSchedule(optimizer, cfg, steps_per_epoch)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


# -- resuming -------------------------------------------------------------------------------------------


def resume_candidates(resume: Optional[str], path: Path) -> tuple[list[Path], Optional[str]]:
    """The checkpoints a run may continue from, best first (``auto``: the last, then snapshots, newest first)."""
    if not resume:
        return [], None
    if resume == "auto":
        snapshots = sorted(list(path.glob("epoch_*.pth")) + [path / "best.pth"], key=_mtime, reverse=True)
        found = [p for p in [path / CHECKPOINT_NAME, *snapshots] if p.is_file()]
        if found:
            return found, None
        return [], f"resume=auto: nothing to resume in {path} (no {CHECKPOINT_NAME}); starting a new run"
    checkpoint = Path(resume)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"resume checkpoint {checkpoint} does not exist; give an existing file, or "
                                f"resume=auto to continue from {path / CHECKPOINT_NAME}")
    return [checkpoint], None


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.is_file() else 0.0


def read_resumable(candidates: Sequence[Path]) -> tuple[Optional[Path], Optional[Mapping[str, Any]], list[str]]:
    """The first candidate that reads (path, contents) and a note for each one skipped as unreadable."""
    notes = []
    for path in candidates:
        try:
            return path, safe_torch_load(path), notes
        except CheckpointError as err:
            notes.append(f"resume: skipped {path}: {str(err).split(':', 1)[-1].strip()}")
    if candidates:
        raise RunError(f"none of the checkpoints in {candidates[0].parent} can be read ({'; '.join(notes)}); start "
                       "the run over with --overwrite (overwrite=true), or give a readable file as --resume FILE")
    return None, None, notes


# -- the engine -------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint and restored on resume."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "epoch": -1})
    # the current epoch's sums before an interruption (loss x images per loss, images, skipped images; all
    # processes together) and its training time so far: a resumed epoch reports the whole epoch
    carried: dict[str, float] = field(default_factory=dict)
    epoch_time: float = 0.0


def train(task_type: type[Task], recipe: Union[str, Path, None] = None, overrides: Overrides = None) -> dict[str, Any]:
    """Run a training job of a task; return its summary (also written to ``summary.json``).

    Args:
        task_type: the :class:`Task` subclass.
        recipe: one of the task's shipped recipes, a YAML path, or None for the task's defaults.
        overrides: settings to change, as a mapping or ``key=value`` strings.

    Raises:
        Interrupted: after SIGINT/SIGTERM, once the state is saved (continue with ``resume=auto``).
    """
    cfg = task_type.load_settings(recipe, overrides)
    if cfg.resume and cfg.overwrite:
        raise RunError("resume and overwrite were both set: resume continues the run in the output folder, overwrite "
                       "deletes it; choose one")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, info.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    task = task_type(cfg, info, precision)
    train_set, val_set = task.datasets()  # checked before the run folder is touched
    out = Path(cfg.output.format(model=cfg.model))
    folder = on_primary(lambda: claim_run(out, resume=bool(cfg.resume), overwrite=cfg.overwrite))
    barrier()
    try:
        with StopRequest() as stop:
            return _Run(task, out, train_set, val_set, folder.notes if folder else [], stop).run()
    finally:
        if folder is not None:
            folder.release()


class _Run:
    """One training run of a task inside its claimed folder: built once, then :meth:`run`."""

    def __init__(self, task: Task, out: Path, train_set: Dataset, val_set: Dataset, notes: list[str],
                 stop: StopRequest) -> None:
        cfg, info = task.cfg, task.info
        self.task, self.cfg, self.info, self.out, self.stop, self.notes = task, cfg, info, out, stop, list(notes)
        self.train_set, self.val_set = train_set, val_set
        if cfg.deterministic and hasattr(train_set, "seed"):
            train_set.seed = cfg.seed  # augmentation seeded per sample: the same whichever process draws it
        self.workers = resolve_workers(cfg.workers)
        pin = cfg.pin_memory and info.device.type == "cuda"
        # a task's dataset may group its samples (detection: by aspect); then every global batch is one group's
        self.sampler = EpochSampler(train_set, info.rank, info.world_size, seed=cfg.seed,
                                    groups=getattr(train_set, "group_flags", None), block=cfg.batch_size * info.world_size)
        self.train_loader = loader(train_set, cfg.batch_size, self.sampler, self.workers, drop_last=True, pin_memory=pin)
        self.val_loader = loader(val_set, cfg.batch_size, ShardSampler(len(val_set), info.rank, info.world_size),
                                 self.workers, pin_memory=pin)
        self.batches_per_epoch = len(self.train_loader) - len(self.train_loader) % cfg.accum_steps
        if cfg.max_steps_per_epoch:
            self.batches_per_epoch = min(self.batches_per_epoch, cfg.max_steps_per_epoch * cfg.accum_steps)
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps

        seed_everything(cfg.seed)  # the same initial weights on every process
        model = task.build_model().to(info.device)
        if info.distributed and cfg.sync_bn:
            model = convert_batchnorm(model, info.device)
        self.model = model
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        self.global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        self.lr = cfg.lr * self.global_batch / cfg.lr_batch
        self.optimizer = create_optimizer_v2(task.param_groups(model), opt=cfg.opt, lr=self.lr,
                                             weight_decay=cfg.weight_decay, eps=cfg.opt_eps, betas=cfg.opt_betas,
                                             **({"fused": True} if cfg.fused_optimizer and cfg.opt in FUSED_OPTIMIZERS else {}))
        self.scheduler = make_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(info.device.type) if task.precision == "fp16" else None
        self.ddp: nn.Module = model
        if info.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if cfg.compile:
            # dynamo caches graphs per code object, shared by every model of a process (compare trains several one
            # after another): past its recompile limit it would run later models eagerly without a word
            torch._dynamo.reset()
        self.forward = torch.compile(self.ddp, dynamic=False, backend=cfg.compile_backend) if cfg.compile else self.ddp
        self.progress = Progress()
        self.pending_rng: Optional[dict[str, Any]] = None  # a mid-epoch resume's RNG state (see _train_epoch)

    @property
    def parts(self) -> dict[str, Any]:
        """The stateful parts a checkpoint saves and a resume restores."""
        return {"model": self.model, "model_ema": self.ema.module if self.ema is not None else None,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}

    def log(self, message: str, echo: bool = True) -> None:
        """Print on process 0 (unless ``echo`` is off) and append to ``log.txt``."""
        if not self.info.primary:
            return
        if echo:
            print(message, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(message + "\n")

    # -- checkpoints --

    def save(self, progress: Progress, snapshots: Sequence[str] = ()) -> Path:
        """Write ``last.pth`` (every process takes part); ``snapshots``: also ``"epoch"`` and/or ``"best"``."""
        rng: list[Any] = [rng_state()]
        if self.info.distributed:
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, rng_state())
        last = self.out / CHECKPOINT_NAME
        if self.info.primary:
            save_state(last, self.parts, **asdict(progress), rng=rng, config=self.cfg.to_dict(), task=self.task.name,
                       version=__version__, world_size=self.info.world_size, **self.task.checkpoint_values())
            keep_snapshots(last, progress.epoch, snapshots, self.cfg.keep_checkpoints)
        return last

    def resume(self) -> None:
        """Continue from the newest readable checkpoint ``resume`` names, exactly where it stopped."""
        candidates, note = resume_candidates(self.cfg.resume, self.out)
        self.notes += [note] if note else []
        path, state, skipped = read_resumable(candidates)
        self.notes += skipped
        if path is None:
            seed_everything(self.cfg.seed + self.info.rank)
            return
        if not isinstance(state, Mapping) or state.get("task", "classification") != self.task.name \
                or not isinstance(state.get("config"), Mapping):
            raise RunError(f"{path} is not a tokenmixers {self.task.name} training checkpoint; to start from its "
                           f"weights, use init_weights={path} instead of resume")
        check_same_model(path, state["config"].get("model"), self.cfg.model)
        self.task.check_resume(state, path)
        values = restore_state(state, self.parts, where=path)
        progress = Progress(**{f.name: values[f.name] for f in fields(Progress) if f.name in values})
        if not self.info.primary:
            progress.carried = {}  # process 0 carries the whole job's partial sums
        if len(values["rng"]) == self.info.world_size:
            self.pending_rng = values["rng"][self.info.rank]
        else:
            self.notes.append(f"warning: checkpoint from {len(values['rng'])} processes, now {self.info.world_size}: "
                              "RNG re-seeded")
            seed_everything(self.cfg.seed + 1000 * progress.step + self.info.rank)
        if progress.batch_in_epoch == 0 and self.pending_rng is not None:
            set_rng_state(self.pending_rng)  # saved between epochs: before the next epoch's loader draws its seed
            self.pending_rng = None
        self.notes.append(f"resumed from {path}: epoch {progress.epoch}, step {progress.step}, batch "
                          f"{progress.batch_in_epoch} of the epoch")
        self.progress = progress

    # -- training --

    def header(self) -> None:
        """Log what the run uses and write ``config.yaml``."""
        cfg, info = self.cfg, self.info
        for note in self.notes:
            self.log(note)
        params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{self.task.name}: model {cfg.model} ({params / 1e6:.2f}M params) on {info.device}, "
                 f"{info.world_size} process(es), precision {self.task.precision}")
        for line in self.task.describe(self.model, self.train_set, self.val_set, self.steps_per_epoch):
            self.log(line)
        self.log(f"{self.workers} loader worker(s) per process; lr {self.lr:.3g} = {cfg.lr:g} x global batch "
                 f"{self.global_batch} / {cfg.lr_batch}")
        if info.primary:
            resolved = {"lr": self.lr, "global_batch": self.global_batch, "world_size": info.world_size,
                        "precision": self.task.precision, "steps_per_epoch": self.steps_per_epoch,
                        "workers": self.workers, **self.task.resolved()}
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(
                {"task": self.task.name, **cfg.to_dict(), "resolved": resolved}, sort_keys=False))

    def train_epoch(self) -> dict[str, Any]:
        """Train to the end of the epoch from where the progress stands; return the epoch's row of metrics.

        Saves at a step boundary when asked (``ckpt_every_steps``) and, after a stop request, saves and
        raises :class:`Interrupted`.
        """
        cfg, info, task, progress = self.cfg, self.info, self.task, self.progress
        self.model.train()
        self.sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * cfg.batch_size)
        if hasattr(self.train_set, "epoch"):
            self.train_set.epoch = progress.epoch
        names = task.loss_names
        sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=info.device)  # on the device: no sync a step
        carried = torch.tensor([progress.carried.get(k, 0.0) for k in (*names, "loss", "images", "skipped")],
                               dtype=torch.float64, device=info.device)
        t0 = time.time()

        def totals() -> list[float]:
            """The epoch's sums so far, over all processes and any interruption."""
            return all_reduce_sum(sums + carried).tolist()

        def save_here() -> Path:
            keys = (*names, "loss", "images", "skipped")
            return self.save(Progress(**{**asdict(progress), "carried": dict(zip(keys, totals())),
                                         "epoch_time": progress.epoch_time + time.time() - t0}))

        bar = tqdm(total=self.batches_per_epoch, initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
                   disable=not (info.primary and show_progress()), leave=False, dynamic_ncols=True, mininterval=1.0,
                   file=sys.stderr)
        batches = iter(self.train_loader)
        if self.pending_rng is not None:  # mid-epoch: restored once the loader has drawn its seed, as it had
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        with bar:
            for batch in batches:
                if progress.batch_in_epoch >= self.batches_per_epoch:
                    break
                inputs, targets, n, skipped = unpack(batch)
                inputs, targets = to_device(inputs, info.device), to_device(targets, info.device)
                sync = (progress.batch_in_epoch + 1) % cfg.accum_steps == 0
                with (self.ddp.no_sync() if info.distributed and not sync else nullcontext()):
                    with autocast(info.device, task.precision):
                        if n:
                            losses = task.step(self.forward, inputs, targets)
                            loss = sum(losses.values())
                        else:  # every image of this batch was unreadable: keep the processes in step
                            losses, loss = {}, sum(p.sum() for p in self.model.parameters()) * 0.0
                    scaled = loss / cfg.accum_steps
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                progress.batch_in_epoch += 1
                zero = loss.new_zeros(())
                step_sums = torch.stack([losses.get(k, zero).detach() for k in names] + [loss.detach()]).double() * n
                sums[: len(names) + 1] += step_sums
                sums[len(names) + 1:] += torch.tensor([n, skipped], dtype=torch.float64, device=info.device)
                if sync:
                    self.optimizer_step()
                    progress.step += 1
                    self.scheduler.step_update(progress.step)
                    if self.ema is not None:
                        self.ema.update(self.model)
                    if self.stop.requested():
                        raise Interrupted(self.stop.signum, save_here(), progress.epoch, progress.step)
                    inside = progress.batch_in_epoch < self.batches_per_epoch
                    if cfg.ckpt_every_steps and progress.step % cfg.ckpt_every_steps == 0 and inside:
                        save_here()
                bar.update(1)
                if progress.batch_in_epoch % cfg.log_every == 0 or progress.batch_in_epoch == self.batches_per_epoch:
                    rate = sums[len(names) + 1].item() * info.world_size / max(time.time() - t0, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    parts = ", ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                    self.log(f"epoch {progress.epoch}, batch {progress.batch_in_epoch}/{self.batches_per_epoch}, "
                             f"step {progress.step}: loss {loss.item():.4f}{f' ({parts})' if len(losses) > 1 else ''}, "
                             f"lr {lr:.2e}, {rate:.0f} img/s", echo=bar.disable)  # a terminal has the bar
        epoch_time = progress.epoch_time + time.time() - t0
        *loss_sums, total, seen, skipped_total = totals()
        row: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step, "train_loss": total / max(seen, 1)}
        if len(names) > 1:
            row.update({k: s / max(seen, 1) for k, s in zip(names, loss_sums) if s})
        row.update(lr=self.optimizer.param_groups[0]["lr"], img_per_s=seen / max(epoch_time, 1e-9),
                   skipped_images=int(skipped_total), epoch_time_s=epoch_time)
        return row

    def optimizer_step(self) -> None:
        """Unscale (fp16), clip, step and zero the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self) -> dict[str, Any]:
        """The task's metrics of the raw weights and, with EMA, of the averaged ones (prefixed ``ema_``)."""
        row = dict(self.task.evaluate(self.model, self.val_loader))
        if self.ema is not None:
            ema = self.task.evaluate(self.ema.module, self.val_loader)
            row.update({f"ema_{k}": v for k, v in ema.items() if k != "val_images"})
        return row

    def improved(self, row: Mapping[str, Any]) -> bool:
        """Whether the epoch's best metric beats the best so far (a missing metric never does)."""
        value, best = row.get(self.task.best_metric), self.progress.best["value"]
        if value is None:
            return False
        return best is None or (value > best if self.task.best_mode == "max" else value < best)

    def run(self) -> dict[str, Any]:
        """Resume if asked, train to the last epoch with evaluation and checkpoints; return the summary."""
        cfg, info, progress_writer = self.cfg, self.info, None
        self.resume()
        progress = self.progress
        self.scheduler.step_update(progress.step)
        self.header()
        if info.primary:
            from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard takes a second to import

            progress_writer = SummaryWriter(str(self.out / "tensorboard"))
        start = time.time()
        while progress.epoch < cfg.epochs:
            row = self.train_epoch()
            progress.epoch += 1
            progress.batch_in_epoch, progress.carried, progress.epoch_time = 0, {}, 0.0
            if progress.epoch % cfg.eval_every == 0 or progress.epoch == cfg.epochs:
                row.update(self.evaluate())
            progress.history.append(row)
            improved = self.improved(row)
            if improved:
                progress.best = {"value": row[self.task.best_metric], "epoch": row["epoch"]}
            stopping = progress.epoch < cfg.epochs and self.stop.requested()
            if improved or stopping or progress.epoch == cfg.epochs or progress.epoch % cfg.ckpt_every_epochs == 0:
                last = self.save(progress, ("epoch", "best") if improved else ("epoch",))
            if progress_writer is not None:
                atomic_write_csv(self.out / "metrics.csv", progress.history)
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        progress_writer.add_scalar(key, value, row["epoch"])
                progress_writer.flush()
            self.log(epoch_report(row) + self.task.report(row))
            if stopping:  # asked during evaluation: the epoch is saved
                raise Interrupted(self.stop.signum, last, progress.epoch, progress.step)
        summary = {
            "task": self.task.name, "model": cfg.model, "data": cfg.data, "epochs": cfg.epochs, "steps": progress.step,
            "params": sum(p.numel() for p in self.model.parameters()),
            **self.task.summary(progress.history),
            "best": {"metric": self.task.best_metric, **progress.best},
            "train_time_s": sum(r["epoch_time_s"] for r in progress.history),
            "skipped_images": sum(r["skipped_images"] for r in progress.history),
            "world_size": info.world_size, "lr": self.lr, "global_batch": self.global_batch, "output": str(self.out),
            "history": progress.history, "version": __version__,
        }
        if info.primary:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            progress_writer.close()
        self.log(f"done in {time.time() - start:.0f}s: {self.out / 'summary.json'}")
        return summary


def epoch_report(row: Mapping[str, Any]) -> str:
    """The engine's part of an epoch's log line (the task adds its metrics)."""
    message = f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, {row['img_per_s']:.0f} img/s"
    if row["skipped_images"]:
        message += f", {row['skipped_images']} unreadable image(s) skipped"
    return message


__all__ = [
    "RunError", "Interrupted", "RunFolder", "claim_run", "run_status", "resume_candidates", "save_state",
    "restore_state", "rng_state", "set_rng_state", "StopRequest", "ignore_stop_signals", "RunSettings", "Task",
    "Progress", "train", "predictions", "eval_loader", "loader", "to_device", "resolve_workers", "seed_everything",
    "make_schedule", "StepSchedule", "show_progress",
]
