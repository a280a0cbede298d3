"""Run folders: locking, reuse rules, full-state checkpoints, resume discovery, stop requests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmixers.runs import (
    Interrupted,
    RunError,
    StopRequest,
    claim_run,
    keep_snapshots,
    read_resumable,
    restore_state,
    resume_candidates,
    rng_state,
    save_state,
    set_rng_state,
)


def _lock_for(path: Path, pid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier"}))


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_for(tmp_path / "run", holder.pid)
        with pytest.raises(RunError, match=rf"in use by another run \(process {holder.pid} on .*wait for it .*delete .*\.lock"):
            claim_run(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    with claim_run(tmp_path / "run") as run:  # the holder is gone: its lock is stale
        assert run.notes == [f"took over the lock of process {holder.pid}, which no longer runs"]
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / ".lock").exists()


def test_started_or_finished_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with claim_run(out):
        for name in ("last.pth", "epoch_0000.pth", "metrics.csv", "log.txt"):
            (out / name).write_text("x")
        (out / "tensorboard").mkdir()
        (out / "notes.md").write_text("mine")
    with pytest.raises(RunError, match="already holds a started run; continue it with --resume auto .*--overwrite"):
        claim_run(out)
    assert not (out / ".lock").exists()  # a refused claim leaves no lock behind
    (out / "summary.json").write_text("{}")
    with pytest.raises(RunError, match="already holds a finished run"):
        claim_run(out)
    with claim_run(out, resume=True) as run:
        assert run.notes == [] and (out / "last.pth").exists()
    with claim_run(out, overwrite=True) as run:
        assert "removed the previous run's last.pth, metrics.csv, summary.json, log.txt, epoch_0000.pth, tensorboard/" \
            in run.notes[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]  # files a run does not write are kept


def test_output_that_is_a_file_is_clear(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="the output .*file is a file, not a folder"):
        claim_run(tmp_path / "file")


def test_resume_candidates(tmp_path: Path) -> None:
    assert resume_candidates(None, tmp_path) == ([], None)
    assert resume_candidates("auto", tmp_path) == ([], f"resume=auto: nothing to resume in {tmp_path} (no last.pth); "
                                                       "starting a new run")
    for i, name in enumerate(("epoch_0001.pth", "best.pth", "epoch_0002.pth", "last.pth")):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    # the last checkpoint first, then the snapshots, newest first
    assert resume_candidates("auto", tmp_path)[0] == [tmp_path / n for n in ("last.pth", "epoch_0002.pth", "best.pth",
                                                                             "epoch_0001.pth")]
    with pytest.raises(FileNotFoundError, match="resume checkpoint .*nope.pth does not exist"):
        resume_candidates(str(tmp_path / "nope.pth"), tmp_path)


def test_a_damaged_checkpoint_leaves_its_snapshots_intact_and_resume_falls_back(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    last = save_state(tmp_path / "last.pth", {"model": model}, epoch=1)
    keep_snapshots(last, 1, ("epoch", "best"), keep=3)
    # a copy truncated in place (a full disk, a crashed copy): snapshots were hard links to it once, and went with it
    with open(last, "r+b") as f:
        f.truncate(100)
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "epoch_0001.pth", weights_only=True)["epoch"] == 1
    path, state, notes = read_resumable(resume_candidates("auto", tmp_path)[0])
    assert path in (tmp_path / "epoch_0001.pth", tmp_path / "best.pth") and state["epoch"] == 1
    assert len(notes) == 1 and notes[0].startswith(f"resume: skipped {last}: ")
    for snapshot in (tmp_path / "best.pth", tmp_path / "epoch_0001.pth"):
        snapshot.write_bytes(b"garbage")
    with pytest.raises(RunError, match="none of the checkpoints in .* can be read .*--overwrite"):
        read_resumable(resume_candidates("auto", tmp_path)[0])


def test_state_round_trip_and_mismatch(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    rng = rng_state()
    save_state(tmp_path / "s.pth", {"model": model, "optimizer": optimizer, "ema": None}, step=7, rng=rng)
    expected = torch.rand(3)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    values = restore_state(tmp_path / "s.pth", {"model": fresh, "optimizer": fresh_opt, "ema": None})
    assert values["step"] == 7 and torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    set_rng_state(values["rng"])
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(RunError, match=r"does not fit this run's model \(2 shape\(s\) differ, e.g. weight: saved "
                                       r"\(2, 3\) vs now \(5, 3\).*start a new run"):
        restore_state(tmp_path / "s.pth", {"model": torch.nn.Linear(3, 5)})


def test_stop_request_turns_signals_into_a_flag() -> None:
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second request stops at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    err = Interrupted(signal.SIGTERM, Path("out/last.pth"), 1, 12)
    assert str(err) == "stopped by SIGTERM at epoch 1, step 12; the run is saved in out/last.pth"
    assert err.exit_code == 143


def test_an_unwritable_output_folder_is_one_clear_error() -> None:
    # /sys refuses new files even to root; the lock file used to fail with a raw "[Errno 13] ... .lock.NNNN"
    with pytest.raises(RunError, match=r"cannot write to the output folder /sys \(Permission denied\); choose a "
                                       r"folder you can write to"):
        claim_run("/sys")


_WORKER_ERROR = """
import sys
import torch
from tokenmixers.runs import loader

class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i == 3:
            raise ValueError("bad sample 3")
        return torch.zeros(1)

try:
    for _ in loader(Broken(), 1, None, 2):
        pass
except ValueError as err:  # as the command line does: report, then exit inside the except block
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_an_error_in_a_loader_worker_ends_the_process_promptly() -> None:
    # workers ignore SIGTERM (the main process saves on it); at exit multiprocessing SIGTERMs them and joined them
    # forever, because after a worker's error the loader is still referenced by the error's traceback
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_ERROR], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: nothing is left behind if it hangs
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the process hung at exit waiting for its loader workers") from None
    assert proc.returncode == 2 and "bad sample 3" in err, err
    assert "Exception ignored" not in err, err  # e.g. torch's SIGCHLD handler reporting the killed workers
    assert subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout == b""  # no worker left
