"""The run engine with a task written in one short file (tests/regression_task.py), and the layering of the package."""
from __future__ import annotations

import ast
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmixers import runs
from tokenmixers.recipe import RecipeError

from .conftest import ROOT, free_port
from .regression_task import Regression

# every engine feature at once: accumulation, clipping, warm-up + cosine, EMA, mid-epoch checkpoints, snapshots,
# deterministic per-step RNG (dropout), best metric to minimise; 72 training samples = 4 steps of 2 x 8 per epoch
SETTINGS = {"epochs": 3, "batch_size": 8, "accum_steps": 2, "lr": 5e-2, "lr_batch": 16, "warmup_epochs": 1,
            "min_lr": 1e-4, "clip_grad": 1.0, "ema": True, "ema_decay": 0.9, "ckpt_every_steps": 2,
            "keep_checkpoints": 2, "workers": 0, "log_every": 1, "deterministic": True, "threads": 1}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "model_ema") for k, v in state[part].items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An uninterrupted run that interrupted and resumed ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("straight")
    return out, runs.train(Regression, None, {**SETTINGS, "output": str(out)})


def test_a_task_in_one_file_gets_the_whole_engine(straight: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, summary = straight
    history = summary["history"]
    assert summary["task"] == "regression" and summary["steps"] == 12 and summary["global_batch"] == 16
    assert [row["step"] for row in history] == [4, 8, 12]
    assert history[-1]["mse"] < 0.5 * history[0]["mse"]  # it learns
    assert history[-1]["lr"] == pytest.approx(1e-4, rel=0.2)  # warm-up, then cosine down to min_lr
    best = min(range(3), key=lambda i: history[i]["mse"])
    assert summary["best"] == {"metric": "mse", "value": history[best]["mse"], "epoch": best}
    assert torch.load(out / "best.pth", weights_only=True)["epoch"] == best + 1
    assert sorted(p.name for p in out.glob("epoch_*.pth")) == ["epoch_0002.pth", "epoch_0003.pth"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mse"]) for r in rows] == [r["mse"] for r in history] and "ema_mse" in rows[0]
    config = (out / "config.yaml").read_text()
    assert "task: regression" in config and "features: 8" in config and "global_batch: 16" in config
    log = (out / "log.txt").read_text()
    assert "regression: model" in log and "epoch 2, batch 8/8, step 12: loss" in log
    # off a terminal (pytest captures), one line per logged step and no progress-bar frames
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err


def test_the_tasks_own_settings_are_checked() -> None:
    assert Regression.load_settings(None, ["features=3", "epochs=2"]).features == 3
    with pytest.raises(RecipeError, match="unknown setting 'featurs'; did you mean 'features'?"):
        Regression.load_settings(None, ["featurs=3"])
    with pytest.raises(RecipeError, match="setting 'noise' expects float, got 'loud'"):
        Regression.load_settings(None, {"noise": "loud"})


def stopped_at(batch: int) -> type[Regression]:
    """The task, with SIGTERM sent to this process during its ``batch``-th batch (a scheduler stopping the job)."""

    class Stopped(Regression):
        batches = 0

        def step(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            Stopped.batches += 1
            if Stopped.batches == batch:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().step(model, x, y)

    return Stopped


def test_interrupt_resume_and_a_damaged_last_checkpoint(straight: tuple[Path, dict], tmp_path: Path) -> None:
    reference, summary = straight
    out = tmp_path / "run"
    with pytest.raises(runs.Interrupted) as stopped:
        runs.train(stopped_at(11), None, {**SETTINGS, "output": str(out)})
    # batch 11 is the 3rd of epoch 1, in step 6 (2 batches a step): saved at the end of that step, mid-epoch
    assert (stopped.value.epoch, stopped.value.step) == (1, 6)
    resumed = runs.train(Regression, None, {**SETTINGS, "output": str(out), "resume": "auto"})
    assert "resumed from" in (out / "log.txt").read_text()
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in summary["history"]]
    assert [r["mse"] for r in resumed["history"]] == [r["mse"] for r in summary["history"]]
    a, b = _weights(reference / "last.pth"), _weights(out / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # last.pth truncated in place: its snapshots are intact, and --resume auto continues from the newest of them
    damaged = tmp_path / "damaged"
    with pytest.raises(runs.Interrupted):
        runs.train(stopped_at(19), None, {**SETTINGS, "output": str(damaged)})
    with open(damaged / "last.pth", "r+b") as f:
        f.truncate(1000)
    resumed = runs.train(Regression, None, {**SETTINGS, "output": str(damaged), "resume": "auto"})
    log = (damaged / "log.txt").read_text()
    assert f"resume: skipped {damaged / 'last.pth'}: " in log and "resumed from" in log
    assert [r["mse"] for r in resumed["history"]] == [r["mse"] for r in summary["history"]]
    b = _weights(damaged / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_task_trains_on_two_processes_launched_as_slurm_does(tmp_path: Path) -> None:
    # what srun does: start N copies with SLURM_* set; ranks, world size and rendezvous come from them. Without
    # dropout, 2 processes x 4 samples compute the steps of 1 process x 8 (the same samples in each step).
    common = [f"{k}={v}" for k, v in {**SETTINGS, "dropout": 0.0, "epochs": 1, "ema": False}.items()]
    one = runs.train(Regression, None, common + ["batch_size=8", f"output={tmp_path / 'one'}"])
    procs, port = [], free_port()
    for rank in range(2):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT / "src")}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "regression_task.py"), *common,
                                       "batch_size=4", f"output={tmp_path / 'two'}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == one["global_batch"] == 16
    a = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # the validation set (24 samples) is counted once over both processes
    assert summary["history"][0]["mse"] == pytest.approx(one["history"][0]["mse"], rel=1e-5)


# -- which way imports point ---------------------------------------------------------------------------------

# the house (docs/architecture.md): a module imports only from its own level or below; tasks not from each other
LEVELS = [
    {"layers", "data", "distributed", "files", "recipe", "precision", "allocator", "stats", "augment", "coco",
     "configs", "converters", "drawing"},
    {"mixers"},
    {"backbone"},
    {"models", "costs"},
    {"checkpoint"},
    {"zoo", "hub", "fit"},
    {"bench", "dense"},
    {"runs"},
    {"analysis"},
    {"classification", "detection", "segmentation"},
    {"compare"},
]
TASKS = {"classification", "detection", "segmentation"}


def _imported(path: Path, package: Path) -> set[str]:
    """The tokenmixers modules (top-level names inside the package) a source file imports."""
    module = path.relative_to(package).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(module[: len(module) - node.level]) if path.name != "__init__.py" else \
                list(module[: len(module) - node.level + 1])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:  # "from . import x": x is a module of the package
                found |= {alias.name for alias in node.names if (package / f"{alias.name}.py").exists()
                          or (package / alias.name).is_dir()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenmixers."):
            found.add(node.module.split(".")[1])
    return found


def test_imports_point_downward() -> None:
    package = ROOT / "src" / "tokenmixers"
    level = {name: i for i, names in enumerate(LEVELS) for name in names}
    wrong = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "__init__.py" or path == package / "__main__.py":
            continue
        own = path.relative_to(package).parts[0].removesuffix(".py")
        assert own in level, f"{own} has no place in the house; add it to LEVELS"
        for target in _imported(path, package) - {own}:
            if level[target] > level[own] or (target in TASKS and own in TASKS):
                wrong.append(f"{path.relative_to(package)} imports {target}")
    assert not wrong, wrong
