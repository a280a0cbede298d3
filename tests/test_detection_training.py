"""detect train on real data: a micro detector learns the nuclei; resume continues exactly; recipes and errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenmixers_cli
from tokenmixers.data import DataError
from tokenmixers.detection.task import Detection, param_groups
from tokenmixers.detection.task import train as train_detector
from tokenmixers.runs import Interrupted, StepSchedule

from .conftest import SHARED, cli, free_port, signal_after_step

NUCLEI = SHARED / "data" / "coco-nuclei"
# the smoke recipe (a micro detector at the tiles' own 256 px, one image per step), evaluated on the training tiles
MICRO = {"data": str(NUCLEI), "val_split": "train", "workers": 0, "threads": 1, "deterministic": True, "log_every": 1}


def test_micro_detector_learns_the_nuclei(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the smoke recipe, 9 of its 20 epochs of 3 steps, a checkpoint every 2
    trained = train_detector("smoke", {**MICRO, "output": str(tmp_path / "trained"), "epochs": 9,
                                       "ckpt_every_epochs": 2})
    losses = [row["train_loss"] for row in trained["history"]]
    print(f"losses {losses}; trained bbox {trained['bbox']} segm {trained['segm']}")
    assert losses[-1] < 0.75 * losses[0]  # measured: 3.68 -> 2.56
    # measured: bbox AP 6.1 (AP50 21.6), segm AP 4.9; the same detector before training: bbox AP 0.05 (AP50 0.2),
    # segm AP 0.02
    assert trained["bbox"]["AP"] > 3 and trained["bbox"]["AP50"] > 12
    assert trained["segm"]["AP"] > 2.5
    run = tmp_path / "trained"
    assert {"last.pth", "best.pth", "metrics.csv", "summary.json", "config.yaml", "log.txt"} <= {p.name for p in run.iterdir()}
    # a checkpoint every 2 epochs and after the last, the last 3 (keep_checkpoints) kept
    assert sorted(p.name for p in run.glob("epoch_*.pth")) == ["epoch_0006.pth", "epoch_0008.pth", "epoch_0009.pth"]
    # detect eval reads the training checkpoint (backbone, classes, categories come from it)
    code, out, err = cli(capsys, "detect", "eval", "--checkpoint", str(run / "last.pth"), "--data", str(NUCLEI),
                         "--split", "train", "--min-size", "256", "--max-size", "256", "--workers", "0", "--batch-size", "1")
    assert code == 0, err
    assert f"bbox AP {trained['bbox']['AP']:.1f}" in out and "segm AP" in out and "(3 images)" in out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_stopped_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    quick = {**MICRO, "min_size": [128], "max_size": 128, "test_size": 128, "fpn_channels": 32,
             "rois_per_image": 32, "eval_every": 1, "epochs": 2}  # 3 steps per epoch
    straight = train_detector("smoke", {**quick, "output": str(tmp_path / "straight")})
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted) as stopped:
        signal_after_step(patch, 4, signal.SIGTERM)
        train_detector("smoke", {**quick, "output": str(tmp_path / "stopped")})
    # saved right after step 4: inside epoch 1 (3 steps an epoch)
    assert (stopped.value.epoch, stopped.value.step, stopped.value.exit_code) == (1, 4, 128 + signal.SIGTERM)
    with pytest.raises(ValueError, match="already holds a"):
        train_detector("smoke", {**quick, "output": str(tmp_path / "stopped")})
    resumed = train_detector("smoke", {**quick, "resume": "auto", "output": str(tmp_path / "stopped")})
    assert resumed["steps"] == straight["steps"] == 6
    a, b = _weights(tmp_path / "straight" / "last.pth"), _weights(tmp_path / "stopped" / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in straight["history"]]
    assert resumed["bbox"] == straight["bbox"]


def test_recipes_schedule_and_weight_decay() -> None:
    one, three = Detection.load_settings("mask_rcnn_1x"), Detection.load_settings("mask_rcnn_3x")
    assert (one.lr, one.batch_size, one.lr_batch, one.epochs, one.milestones) == (1e-4, 2, 16, 12, (8, 11))
    assert (one.weight_decay, one.opt_betas, one.min_size, one.max_size) == (0.05, (0.9, 0.999), (800,), 1333)
    assert three.epochs == 36 and three.milestones == (27, 33) and three.min_size[0] == 480 and three.min_size[-1] == 800
    # the detection recipe adds its own keys to the engine's; a classification key is not one of them
    assert "mixup" not in Detection.settings.keys() and "min_size" in Detection.settings.keys()
    # mmdet: linear warm-up from 0.001 over 1000 steps, x0.1 after epochs 8 and 11
    schedule = StepSchedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), one, steps_per_epoch=1000)
    factor = schedule.factor
    assert factor(0) == pytest.approx(0.001) and factor(500) == pytest.approx(0.5005)
    assert factor(1000) == 1.0 and factor(7999) == 1.0
    assert factor(8000) == pytest.approx(0.1) and factor(11000) == pytest.approx(0.01)
    from tokenmixers.detection import create_detector

    detector = create_detector("unified_swin_micro", 2, fpn_channels=32)
    decay, no_decay = param_groups(detector, 0.05, "all_norms")  # the official rule: tests/test_detection_mmdet.py
    names = {id(p): n for n, p in detector.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert any("relative_position_bias_table" in n for n in skipped) and "backbone.body.out_norms.0.weight" in skipped
    assert not any("norm" in names[id(p)] for p in decay["params"])
    assert "backbone.fpn.inner_blocks.0.0.weight" in {names[id(p)] for p in decay["params"]}


def test_bad_runs_fail_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DataError, match="no data"):
        train_detector("smoke", {"output": str(tmp_path / "a")})
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_detector("smoke", {**MICRO, "batch_size": 4, "output": str(tmp_path / "b")})
    assert not (tmp_path / "b").exists()  # checked before the folder is touched
    code, _, err = cli(capsys, "detect", "train", "--recipe", "smoke", "--data", str(tmp_path / "nowhere"),
                       "--output", str(tmp_path / "c"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    code, _, err = cli(capsys, "detect", "train", "--recipe", "smoke", "mask_scale=2")
    assert code == 2 and "unknown setting 'mask_scale'" in err


def test_torchrun_evaluates_every_image_once(tmp_path: Path) -> None:
    from tokenmixers.detection import create_detector, save_detector

    save_detector(create_detector("unified_convnext_micro", 1, min_size=128, max_size=128, fpn_channels=32),
                  tmp_path / "det", categories=["nucleus"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "tokenmixers", "detect", "eval", "--checkpoint", str(tmp_path / "det"), "--data", str(NUCLEI),
         "--split", "train", "--workers", "0", "--batch-size", "1", "--out", str(tmp_path / "ap.json")],
        capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # 3 images over 2 processes: one process runs two, the other one, each counted once
    assert json.loads((tmp_path / "ap.json").read_text())["images"] == 3
    assert run.stdout.count("bbox AP") == 1


def test_detect_help_lists_the_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        tokenmixers_cli.main(["detect", "--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "eval", "predict", "invariance"))
