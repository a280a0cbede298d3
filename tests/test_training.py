"""Training, evaluation, data checks, exact resume after SIGKILL and 2-process DDP on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmixers.config import apply_overrides, build_config, load_recipe
from tokenmixers.data import DataError, build_dataset
from tokenmixers.training import evaluate_checkpoint, lr_for, train

from .conftest import SHARED

# a fast, fully deterministic run: the micro ConvNeXt (it has the head BatchNorm) on digits
QUICK = {
    "model": "unified_convnext_micro", "epochs": 2, "max_steps_per_epoch": 4, "batch_size": 32,
    "deterministic": True, "threads": 1, "workers": 0, "log_every": 1,
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmixers", *args]


def _overrides(**kwargs) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**QUICK, **kwargs}.items()]


# -- recipes ------------------------------------------------------------------------------------------


def test_recipes_match_table_iii() -> None:
    shared = dict(epochs=300, warmup_epochs=20, sched="cosine", opt="adamw", weight_decay=0.05, clip_grad=5.0,
                  label_smoothing=0.1, ema=True, ema_decay=0.9999, input_size=224, crop_pct=0.875, mixup=0.8,
                  cutmix=1.0, reprob=0.25, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1")
    transformer, cnn = load_recipe("transformer"), load_recipe("cnn")
    for recipe in (transformer, cnn):
        assert {k: recipe[k] for k in shared} == shared
    assert (transformer["lr"], transformer["lr_batch"], transformer["batch_size"] * 8) == (1e-3, 1024, 1024)
    assert (cnn["lr"], cnn["lr_batch"], cnn["batch_size"] * 8) == (4e-3, 4096, 4096)
    # the paper's rule: lr = batch / 1024 x 1e-3 for transformers
    assert lr_for(512, "transformer") == pytest.approx(5e-4)
    assert lr_for(4096, "cnn") == pytest.approx(4e-3)


def test_overrides_are_checked() -> None:
    cfg = build_config("transformer", ["epochs=30", "opt_betas=[0.9, 0.95]", "auto_augment=null", "lr=2e-3"])
    assert (cfg["epochs"], cfg["opt_betas"], cfg["auto_augment"], cfg["lr"]) == (30, [0.9, 0.95], None, 2e-3)
    with pytest.raises(ValueError, match="unknown setting 'epoch'; known settings: .*epochs"):
        build_config("transformer", ["epoch=3"])
    with pytest.raises(ValueError, match="setting 'epochs' expects int"):
        apply_overrides(load_recipe("transformer"), {"epochs": "many"})
    with pytest.raises(ValueError, match="precision' must be one of auto, fp32, bf16, fp16"):
        build_config("transformer", ["precision=fp64"])
    with pytest.raises(FileNotFoundError, match="recipe 'nope' not found; shipped recipes: cnn, defaults, digits"):
        load_recipe("nope")


# -- training and evaluation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("train")
    summary = train("digits", {**QUICK, "max_steps_per_epoch": 12, "deterministic": False, "threads": 0,
                               "output": str(out)})
    return out, summary


def test_training_learns_digits(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    assert summary["top1"] > 60.0  # chance is 10%
    assert summary["steps"] == 24 and len(summary["history"]) == 2
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]
    for name in ("last.pth", "best.pth", "epoch_0001.pth", "metrics.csv", "config.yaml", "summary.json", "log.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    config = (out / "config.yaml").read_text()
    assert "lr: 0.001" in config and "global_batch: 32" in config  # 2e-3 x 32 / 64, saved with the run
    assert "lr 0.001 = 0.002 x global batch 32 / 64" in (out / "log.txt").read_text()


def test_eval_reproduces_training_numbers(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    results = evaluate_checkpoint("unified_convnext_micro", str(out / "last.pth"), "digits", input_size=32,
                                  crop_pct=1.0, workers=0)
    assert results["raw"]["top1"] == pytest.approx(summary["top1"])
    assert results["ema"]["top1"] == pytest.approx(summary["ema_top1"])
    assert results["raw"]["count"] == 364
    cli = subprocess.run(_cli("eval", "--model", "unified_convnext_micro", "--checkpoint", str(out / "last.pth"),
                              "--data", "digits", "--input-size", "32", "--crop-pct", "1.0", "--workers", "0"),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert f"raw  top-1 {summary['top1']:.2f}" in cli.stdout and f"ema  top-1 {summary['ema_top1']:.2f}" in cli.stdout


def test_list_file_layout_trains(tmp_path: Path) -> None:
    # the official layout: meta/{train,val}.txt "relative/path label", images under train/ and val/
    mini = SHARED / "data" / "imagenet-mini"
    summary = train("digits", {**QUICK, "data": str(mini), "input_size": 48, "batch_size": 2, "epochs": 1,
                               "max_steps_per_epoch": 1, "output": str(tmp_path)})
    assert summary["steps"] == 1 and summary["top1"] is not None
    assert "810 classes" in (tmp_path / "log.txt").read_text()  # labels up to 809


# -- bad data -------------------------------------------------------------------------------------------


def _digit_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """A small ImageNet-layout dataset of real PNG files."""
    from tokenmixers.data import digits_samples

    samples, _ = digits_samples("train", 32)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, s in enumerate([s for s in samples if s.label == c][:per_class]):
                s.source.save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "data folder .*nowhere does not exist"),
        ("empty_class", r"class folder .*train/class_1 contains no images"),
        ("list_missing", r"meta/train.txt names 1 image\(s\) that do not exist"),
        ("labels", r"label\(s\) outside \[0, 3\)"),
        ("small", "fewer than one global batch of 32"),
        ("layout", "has neither .*meta/train.txt .*nor a .*train folder"),
    ],
)
def test_bad_data_fails_before_training(tmp_path: Path, setup: str, message: str) -> None:
    root = _digit_folder(tmp_path / "data")
    overrides = {**QUICK, "data": str(root), "output": str(tmp_path / "out"), "batch_size": 4}
    if setup == "missing":
        overrides["data"] = str(tmp_path / "nowhere")
    elif setup == "empty_class":
        for f in (root / "train" / "class_1").iterdir():
            f.unlink()
    elif setup == "list_missing":
        (root / "meta").mkdir()
        (root / "meta" / "train.txt").write_text("class_0/0.png 0\nclass_0/404.png 0\n")
        (root / "meta" / "val.txt").write_text("class_0/0.png 0\n")
    elif setup == "labels":
        overrides["num_classes"] = 3
        (root / "meta").mkdir()
        (root / "meta" / "train.txt").write_text("class_0/0.png 0\nclass_1/0.png 7\n")
        (root / "meta" / "val.txt").write_text("class_0/0.png 0\n")
    elif setup == "small":
        overrides["batch_size"] = 32
    elif setup == "layout":
        (root / "train").rename(root / "training")
    with pytest.raises(DataError, match=message):
        train("digits", overrides)
    assert not (tmp_path / "out" / "last.pth").exists()


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = _digit_folder(tmp_path / "data")
    (root / "train" / "class_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        summary = train("digits", {**QUICK, "data": str(root), "batch_size": 19, "epochs": 1, "deterministic": False,
                                   "max_steps_per_epoch": 0, "output": str(tmp_path / "out")})
    assert summary["skipped_images"] == 1
    assert "1 unreadable image(s) skipped" in (tmp_path / "out" / "log.txt").read_text()


def test_dataset_sizes() -> None:
    train_set, val_set = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert (len(train_set), len(val_set)) == (1433, 364)
    image, label = train_set[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and label == 0


# -- exact resume after SIGKILL -------------------------------------------------------------------------


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path: Path) -> None:
    args = _overrides(epochs=2, max_steps_per_epoch=8, ckpt_every_steps=2)
    reference = subprocess.run(_cli("train", "--recipe", "digits", f"output={tmp_path / 'ref'}", *args),
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", "--recipe", "digits", f"output={out}", *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "last.pth").is_file() and _state(out / "last.pth")["batch_in_epoch"] > 0:
            break  # a mid-epoch checkpoint exists: kill the run while it is inside the epoch
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    interrupted_at = _state(out / "last.pth")
    assert interrupted_at["epoch"] == 0 and 0 < interrupted_at["batch_in_epoch"] < 8

    resumed = subprocess.run(_cli("train", "--recipe", "digits", f"output={out}", "--resume", "auto", *args),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = _state(tmp_path / "ref" / "last.pth"), _state(out / "last.pth")
    assert a["step"] == b["step"] == 16
    for entry in ("model", "model_ema"):
        for key, value in a[entry].items():
            assert torch.equal(value, b[entry][key]), f"{entry}.{key}"
    assert json.loads((out / "summary.json").read_text())["top1"] == json.loads(
        (tmp_path / "ref" / "summary.json").read_text())["top1"]


# -- distributed ----------------------------------------------------------------------------------------


def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    # SGD: AdamW's first updates are ~lr * sign(grad), which turns summation-order noise in
    # near-zero gradients into lr-sized differences; SGD shows the two runs compute the same steps
    common = _overrides(epochs=1, max_steps_per_epoch=4, ema=False, opt="sgd", lr=0.05)
    one = subprocess.run(_cli("train", "--recipe", "digits", f"output={tmp_path / 'one'}", *common, "batch_size=32"),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "tokenmixers", "train", "--recipe", "digits", f"output={tmp_path / 'two'}", *common, "batch_size=16"],
        capture_output=True, text=True, env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 process(es)" in log and "global batch 32" in log
    a, b = _state(tmp_path / "one" / "last.pth"), _state(tmp_path / "two" / "last.pth")
    assert a["step"] == b["step"] == 4
    worst = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]
                if a["model"][k].is_floating_point())
    # same global batch, same samples per step, global-batch BatchNorm (running stats included):
    # only the float summation order differs
    assert worst < 1e-5, worst
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # distributed evaluation counts every validation image exactly once (364 is not a multiple of 2 x batch)
    assert summary["history"][-1]["val_images"] == 364
    assert np.isclose(summary["top1"], json.loads((tmp_path / "one" / "summary.json").read_text())["top1"], atol=1.0)


def test_slurm_launch_without_torchrun(tmp_path: Path) -> None:
    # what srun does: start N copies with SLURM_* set; ranks, world size and rendezvous come from them
    procs = []
    for rank in range(2):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen(_cli("train", "--recipe", "digits", f"output={tmp_path}",
                                           *_overrides(epochs=1, max_steps_per_epoch=2, batch_size=16, ema=False)),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert "2 process(es)" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


def test_bf16_and_gradient_accumulation_on_cpu(tmp_path: Path) -> None:
    summary = train("digits", {**QUICK, "precision": "bf16", "accum_steps": 2, "batch_size": 16, "epochs": 1,
                               "max_steps_per_epoch": 3, "channels_last": True, "grad_checkpointing": True,
                               "output": str(tmp_path)})
    assert summary["steps"] == 3 and summary["global_batch"] == 32
    assert "precision bf16" in (tmp_path / "log.txt").read_text()
    assert np.isfinite(summary["history"][0]["train_loss"])
