"""Run folders: the pieces every training job is built from (classification, detection).

* :func:`claim_run` takes an output folder for one run: a lock file (pid and host) keeps a second
  live run out, a stale lock of a dead process is taken over with a note, and a folder that
  already holds a started or finished run is refused unless the run resumes or overwrites it.
* :func:`save_state` / :func:`restore_state`: one atomic checkpoint of the full training state
  (every part's ``state_dict()`` plus plain values such as counters and RNG states).
* :func:`resume_path`: what ``resume=auto`` or ``resume=<file>`` means for a folder.
* :func:`rng_state` / :func:`set_rng_state`: the RNG states of this process.
* :class:`StopRequest`: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before killing a job)
  become a request to save at the next step boundary; the loop then raises :class:`Interrupted`.

Errors a user can cause are ``ValueError`` (or ``KeyError`` / ``OSError``) subclasses whose message
is one paragraph: what is wrong, where, and how to fix it. :class:`RunError` is this module's; the
command line prints the message alone, without a traceback.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import group_keys, safe_torch_load
from .files import atomic_copy, atomic_write

LOCK_NAME = ".lock"
CHECKPOINT_NAME = "last.pth"
# what a run writes into its folder; overwrite removes exactly these (other files are left alone)
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "summary.json", "config.yaml", "log.txt")
RUN_GLOBS = ("epoch_*.pth",)
RUN_DIRS = ("tensorboard",)


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
    tmp.write_text(json.dumps(me))
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


def resume_path(resume: Optional[str], path: Path) -> tuple[Optional[Path], Optional[str]]:
    """The checkpoint a run continues from (None: start fresh) and a note for the log."""
    if not resume:
        return None, None
    if resume == "auto":
        last = path / CHECKPOINT_NAME
        if last.is_file():
            return last, None
        return None, f"resume=auto: nothing to resume in {path} (no {CHECKPOINT_NAME}); starting a new run"
    checkpoint = Path(resume)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"resume checkpoint {checkpoint} does not exist; give an existing file, or resume=auto to continue "
            f"from {path / CHECKPOINT_NAME}"
        )
    return checkpoint, None


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


__all__ = [
    "RunError", "Interrupted", "RunFolder", "claim_run", "run_status", "resume_path", "save_state",
    "restore_state", "rng_state", "set_rng_state", "StopRequest", "ignore_stop_signals",
]
