"""Training, evaluation, data checks, exact resume after SIGKILL and 2-process DDP on CPU."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenmixers_cli
from tokenmixers.classification import Classification, lr_for, train
from tokenmixers.data import DataError, build_dataset
from tokenmixers.hub import load_pretrained
from tokenmixers.recipe import RecipeError
from tokenmixers.runs import RunError, resolve_workers

from .conftest import QUICK, SHARED, cli, free_port, signal_after_step


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmixers", *args]


def _overrides(**kwargs) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**QUICK, **kwargs}.items()]


# -- recipes ------------------------------------------------------------------------------------------


def settings(recipe: str, overrides=None):
    return Classification.load_settings(recipe, overrides)


def test_recipes_match_table_iii() -> None:
    shared = dict(epochs=300, warmup_epochs=20, sched="cosine", opt="adamw", weight_decay=0.05, clip_grad=5.0,
                  label_smoothing=0.1, ema=True, ema_decay=0.9999, input_size=224, crop_pct=0.875, mixup=0.8,
                  cutmix=1.0, reprob=0.25, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1")
    transformer, cnn = settings("transformer"), settings("cnn")
    for recipe in (transformer, cnn):
        assert {k: getattr(recipe, k) for k in shared} == shared
    assert (transformer.lr, transformer.lr_batch, transformer.batch_size * 8) == (1e-3, 1024, 1024)
    assert (cnn.lr, cnn.lr_batch, cnn.batch_size * 8) == (4e-3, 4096, 4096)
    # the paper's rule: lr = batch / 1024 x 1e-3 for transformers
    assert lr_for(512, "transformer") == pytest.approx(5e-4)
    assert lr_for(4096, "cnn") == pytest.approx(4e-3)


def test_recipe_is_a_typed_object_checked_at_load(tmp_path: Path) -> None:
    cfg = settings("transformer", ["epochs=30", "opt_betas=[0.9, 0.95]", "auto_augment=null", "lr=2e-3"])
    assert (cfg.epochs, cfg.opt_betas, cfg.auto_augment, cfg.lr) == (30, (0.9, 0.95), None, 2e-3)
    # an unknown or mistyped key names the closest valid one, in an override and in a recipe file
    with pytest.raises(RecipeError, match="override: unknown setting 'epoch'; did you mean 'epochs'?"):
        settings("transformer", ["epoch=3"])
    bad_file = tmp_path / "mine.yaml"
    bad_file.write_text("extends: transformer\nwarmup_epoch: 5\n")
    with pytest.raises(RecipeError, match=f"recipe {re.escape(str(bad_file))}: unknown setting 'warmup_epoch'; did "
                                          "you mean 'warmup_epochs'?"):
        settings(str(bad_file))
    with pytest.raises(RecipeError, match="recipe .*digits.yaml: unknown setting 'milestone'; did you mean "
                                          "'milestones'?"):
        Classification.settings.check_keys(["milestone"], f"recipe {Classification.recipes / 'digits.yaml'}")
    with pytest.raises(RecipeError, match="setting 'epochs' expects int, got 'many'"):
        settings("transformer", {"epochs": "many"})
    with pytest.raises(RecipeError, match="precision' must be one of auto, fp32, bf16, fp16"):
        settings("transformer", ["precision=fp64"])
    with pytest.raises(FileNotFoundError, match="recipe 'nope' not found; shipped recipes: cnn, digits, fashion, "
                                                "transformer"):
        settings("nope")
    for bad, message in [("epochs=0", "'epochs' must be >= 1, got 0"), ("epochs=-1", "'epochs' must be >= 1, got -1"),
                         ("ckpt_every_steps=-2", "'ckpt_every_steps' must be >= 0"),
                         ("input_size=8", "'input_size' must be >= 32, got 8"), ("reprob=1.5", "between 0 and 1"),
                         ("workers=many", "'workers' expects int or null, got 'many'"),
                         ("opt_betas=[0.9]", "'opt_betas' expects a list of 2 float, got [0.9]"),
                         ("opt_betas=[0.9", "the value is not valid YAML")]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            settings("transformer", [bad])


def test_workers_follow_the_machine() -> None:
    # unset, the loader uses at most the CPUs this process may run on (torch warns beyond that)
    assert settings("transformer").workers is None
    assert resolve_workers(None) == min(8, len(os.sched_getaffinity(0)))
    assert resolve_workers(3) == 3


# -- training and evaluation ---------------------------------------------------------------------------


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
    # the paper's decay rule: none on norms, biases and other 1-D parameters (timm's groups), 0.05 on the rest
    model = torch.load(out / "last.pth", weights_only=True)["model"]
    groups = torch.load(out / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    one_d = sum(1 for k, v in model.items() if v.ndim <= 1 and "running_" not in k and "num_batches" not in k)
    assert len(groups[0]["params"]) == one_d and len(groups[1]["params"]) > 0


def test_eval_uses_the_runs_data_settings(trained: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    # the run trained at 32 px with crop_pct 1.0: eval takes that (and the model, data, classes) from the checkpoint
    out, summary = trained
    code, stdout, err = cli(capsys, "eval", "--checkpoint", str(out / "last.pth"), "--workers", "0")
    assert code == 0, err
    assert "unified_convnext_micro on digits:val at input 32, crop_pct 1.0, bicubic, 10 classes (model, data, " \
           "input_size, crop_pct, interpolation, num_classes from the checkpoint)" in stdout
    assert f"raw  top-1 {summary['top1']:.2f}" in stdout and f"ema  top-1 {summary['ema_top1']:.2f}" in stdout
    assert "(364 images)" in stdout


def test_converted_weights_keep_the_runs_settings(trained: tuple[Path, dict], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    # convert needs no --model (the run names it); input size, crop, interpolation, data and class names travel with
    # the weights, so eval of the folder measures what the run measured (it used to run at 224 / 0.875: 12.91 %)
    out, summary = trained
    code, stdout, err = cli(capsys, "convert", str(out / "last.pth"), str(tmp_path / "weights"))
    assert code == 0, err
    assert "re-initialised" not in stdout
    assert "(10 classes; input_size 32, crop_pct 1.0, interpolation bicubic, data digits)" in stdout
    model = load_pretrained(tmp_path / "weights")
    saved = torch.load(out / "last.pth", weights_only=True)["model"]
    assert model.num_classes == 10 and torch.equal(model.head.fc.weight, saved["head.fc.weight"])
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["crop_pct"] == 1.0
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)] and config["training_data"] == "digits"
    code, stdout, err = cli(capsys, "eval", "--checkpoint", str(tmp_path / "weights"), "--workers", "0")
    assert code == 0, err
    assert "unified_convnext_micro on digits:val at input 32, crop_pct 1.0, bicubic, 10 classes (model, data, " \
           "input_size, crop_pct, interpolation, num_classes from the checkpoint)" in stdout
    assert f"raw  top-1 {summary['top1']:.2f}" in stdout


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
        ("empty_list", r"meta/train.txt lists no images; it needs one line per image"),
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
    elif setup == "empty_list":
        (root / "meta").mkdir()
        (root / "meta" / "train.txt").write_text("\n")
        (root / "meta" / "val.txt").write_text("class_0/0.png 0\n")
    with pytest.raises(DataError, match=message):
        train("digits", overrides)
    assert not (tmp_path / "out").exists()  # rejected before the run folder is created


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = _digit_folder(tmp_path / "data")
    (root / "train" / "class_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    run = subprocess.run(_cli("train", "--recipe", "digits", *_overrides(
        data=str(root), batch_size=19, epochs=1, deterministic=False, max_steps_per_epoch=0, workers=1,
        output=str(tmp_path / "out"))), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # raised in a loader worker; one line, without a source line of torch or of the library
    assert re.search(r"tokenmixers: warning: skipping unreadable image .*broken.png: [^\n]*\n", run.stderr)
    # redirected to a file, the log is lines, one per logged step, not progress-bar frames
    assert "\r" not in run.stdout + run.stderr and "epoch 0, batch 1/" in run.stdout
    assert "fetch.py" not in run.stderr and "warnings.warn" not in run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
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


@pytest.fixture(scope="module")
def resume_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two epochs of 8 steps with mid-epoch checkpoints, on 36 images (small: every run evaluates twice)."""
    data = _digit_folder(tmp_path_factory.mktemp("digits") / "data", classes=3, per_class=12)
    return _overrides(data=str(data), epochs=2, max_steps_per_epoch=8, ckpt_every_steps=2, batch_size=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, resume_args: list[str]) -> Path:
    """An uninterrupted deterministic run that the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    tokenmixers_cli.main(["train", "--recipe", "digits", f"output={out}", *resume_args])
    return out


def _start_and_kill(out: Path, resume_args: list[str]) -> subprocess.Popen:
    """Start the run in a process and SIGKILL it after its first mid-epoch checkpoint (nothing is saved after it)."""
    proc = subprocess.Popen(_cli("train", "--recipe", "digits", f"output={out}", *resume_args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "last.pth").is_file() and _state(out / "last.pth")["batch_in_epoch"] > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    return proc


def _resume_and_compare(capsys: pytest.CaptureFixture, out: Path, reference: Path, resume_args: list[str]) -> None:
    code, _, err = cli(capsys, "train", "--recipe", "digits", f"output={out}", "--resume", "auto", *resume_args)
    assert code == 0, err
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = _state(reference / "last.pth"), _state(out / "last.pth")
    assert a["step"] == b["step"] == 16
    for entry in ("model", "model_ema"):
        for key, value in a[entry].items():
            assert torch.equal(value, b[entry][key]), f"{entry}.{key}"
    assert json.loads((out / "summary.json").read_text())["top1"] == json.loads(
        (reference / "summary.json").read_text())["top1"]


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture, reference: Path,
                                                resume_args: list[str]) -> None:
    out = tmp_path / "run"
    proc = _start_and_kill(out, resume_args)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    interrupted_at = _state(out / "last.pth")
    assert interrupted_at["epoch"] == 0 and 0 < interrupted_at["batch_in_epoch"] < 8
    _resume_and_compare(capsys, out, reference, resume_args)


@pytest.mark.parametrize("signum", [signal.SIGINT])  # SIGTERM takes the same path: tests/test_engine.py sends it
def test_interrupt_saves_and_tells_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture, reference: Path,
                                                 resume_args: list[str], signum: int) -> None:
    # Ctrl-C (SIGINT) and a scheduler's SIGTERM, delivered to the process running the command: save at the next step
    # boundary, one line, then resume exactly
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_after_step(patch, 1, signum)
        code, _, err = cli(capsys, "train", "--recipe", "digits", f"output={out}", *resume_args)
    assert code == 128 + signum, err
    name = signal.Signals(signum).name
    message = [line for line in err.splitlines() if line.startswith("tokenmixers train:")]
    assert len(message) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"tokenmixers train: stopped by {name} at epoch 0, step \d+; the run is saved in "
                        rf"{re.escape(str(out / 'last.pth'))}; resume with: tokenmixers train --recipe digits "
                        rf"output={re.escape(str(out))} .* --resume auto", message[0]), message[0]
    saved = _state(out / "last.pth")
    assert saved["epoch"] == 0 and 0 < saved["batch_in_epoch"] < 8 and saved["step"] == saved["batch_in_epoch"]
    assert not (out / ".lock").exists()
    _resume_and_compare(capsys, out, reference, resume_args)
    # the resumed epoch's metrics cover the whole epoch, not just the part after the interruption
    ours, theirs = (out / "metrics.csv").read_text().splitlines(), (reference / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(ours[0].split(","), line.split(","))) for line in ours[1:]]
    ref_rows = [dict(zip(theirs[0].split(","), line.split(","))) for line in theirs[1:]]
    for row, ref_row in zip(rows, ref_rows):
        assert float(row["train_loss"]) == pytest.approx(float(ref_row["train_loss"]), rel=1e-9)
        assert row["top1"] == ref_row["top1"]
    assert float(rows[0]["epoch_time_s"]) > saved["epoch_time"] > 0


# -- distributed ----------------------------------------------------------------------------------------


def test_two_process_torchrun_matches_one_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # SGD: AdamW's first updates are ~lr * sign(grad), which turns summation-order noise in
    # near-zero gradients into lr-sized differences; SGD shows the two runs compute the same steps
    common = _overrides(epochs=1, max_steps_per_epoch=4, ema=False, opt="sgd", lr=0.05)
    code, _, err = cli(capsys, "train", "--recipe", "digits", f"output={tmp_path / 'one'}", *common, "batch_size=32")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "tokenmixers", "train", "--recipe", "digits", f"output={tmp_path / 'two'}", *common, "batch_size=16"],
        capture_output=True, text=True, env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("summary in") == 1  # the final line comes from process 0 only
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
    # weights within 1e-5 give the same evaluation: the loss to 1e-4 and at most one of 364 images classified otherwise
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["history"][-1]["val_loss"] == pytest.approx(one["history"][-1]["val_loss"], rel=1e-4)
    assert abs(summary["top1"] - one["top1"]) <= 100 / 364 + 1e-9


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_and_gradient_accumulation_on_cpu(tmp_path: Path, precision: str) -> None:
    # a small batch and validation set: fp16 convolutions on a CPU without native half support are slow
    data = _digit_folder(tmp_path / "data", classes=3, per_class=8)
    summary = train("digits", {**QUICK, "data": str(data), "precision": precision, "accum_steps": 2, "batch_size": 4,
                               "epochs": 1, "max_steps_per_epoch": 2, "channels_last": True, "grad_checkpointing": True,
                               "output": str(tmp_path / "run")})
    assert summary["steps"] == 2 and summary["global_batch"] == 8
    assert f"precision {precision}" in (tmp_path / "run" / "log.txt").read_text()
    assert np.isfinite(summary["history"][0]["train_loss"])
    state = _state(tmp_path / "run" / "last.pth")
    assert (state["scaler"] is not None) == (precision == "fp16")  # fp16 trains with a grad scaler


def test_compiled_training_step(tmp_path: Path) -> None:
    # compile=true: torch.compile of the training forward (a one-block-per-stage model keeps the compilation short).
    # Dynamo's graph of the model, AOT autograd's backward and the compiled forward in the loop are the same for every
    # backend; inductor would add the C++ build of ~55 kernels (50 s on 2 cores with a cold cache), torch's own code.
    from tokenmixers import ModelCfg, register_model_cfg

    register_model_cfg("unified_dwconv_test_compile", ModelCfg("dwconv", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))
    quick = {**QUICK, "model": "unified_dwconv_test_compile", "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8,
             "ema": False}
    compiled = train("digits", {**quick, "compile": True, "compile_backend": "aot_eager", "output": str(tmp_path / "c")})
    eager = train("digits", {**quick, "output": str(tmp_path / "e")})
    assert compiled["steps"] == 2 and np.isfinite(compiled["history"][0]["train_loss"])
    assert compiled["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="'compile_backend' must be one of inductor, aot_eager"):
        settings("digits", {"compile_backend": "tensorrt"})


# -- run folders -----------------------------------------------------------------------------------------


def test_run_folder_is_never_silently_reused(tmp_path: Path) -> None:
    quick = {**QUICK, "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 8, "output": str(tmp_path)}
    train("digits", quick)
    first = (tmp_path / "log.txt").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(RunError, match="already holds a finished run; continue it with --resume auto"):
        train("digits", quick)
    # another live run holds the folder: refused, nothing touched
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        with pytest.raises(RunError, match=rf"in use by another run \(process {holder.pid} "):
            train("digits", {**quick, "resume": "auto"})
    finally:
        holder.kill()
        holder.wait()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != ".lock"} == before
    # overwrite starts over (the stale lock of the dead holder is taken over with a note)
    train("digits", {**quick, "overwrite": True, "seed": 1})
    log = (tmp_path / "log.txt").read_text()
    assert first not in log and "took over the lock of process" in log and "overwrite: removed the previous run's" in log
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pth")) == ["epoch_0001.pth"]
    with pytest.raises(RunError, match="resume and overwrite were both set"):
        train("digits", {**quick, "overwrite": True, "resume": "auto"})


def test_resume_auto_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    # list files whose largest label is 5000 make a 5001-class model: the log says why
    root = tmp_path / "data"
    _digit_folder(root, classes=2)
    (root / "meta").mkdir()
    for split in ("train", "val"):
        (root / "meta" / f"{split}.txt").write_text("".join(f"class_{c}/{i}.png {5000 * c}\n" for c in (0, 1) for i in range(4)))
    train("digits", {**QUICK, "data": str(root), "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4,
                     "resume": "auto", "output": str(tmp_path / "out")})
    log = (tmp_path / "out" / "log.txt").read_text()
    assert f"resume=auto: nothing to resume in {tmp_path / 'out'} (no last.pth); starting a new run" in log
    assert "5001 classes, inferred from the data (the largest label is 5000 but only 2 distinct labels occur" in log


def test_resume_with_another_models_checkpoint_is_clear(trained: tuple[Path, dict], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "train", "--recipe", "digits", "--model", "unified_halo_micro", "--resume",
                       str(trained[0] / "last.pth"), "--output", str(tmp_path), "workers=0")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"error: {trained[0] / 'last.pth'} is a checkpoint of unified_convnext_micro, but this run trains " \
           "unified_halo_micro; resume with --model unified_convnext_micro" in err


# -- the paper's recipes on real images ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["transformer", "cnn"])
def test_recipe_augmentation_survives_thousands_of_real_images(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # RandAugment m9-mstd0.5 reaches the top magnitude, where posterize keeps 0 bits (Pillow 13 raises there)
    from tokenmixers import augment

    zero_bits, posterize = [], augment.posterize

    def counting_posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
        zero_bits.append(bits_to_keep <= 0)
        return posterize(img, bits_to_keep, **kwargs)

    monkeypatch.setattr(augment, "posterize", counting_posterize)
    cfg = settings(recipe, ["input_size=32"])  # the recipe's augmentation, at a size that keeps this fast
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25
    transform = augment.build_transform(cfg, training=True)
    images = [Image.open(p).convert("RGB") for p in sorted((SHARED / "data" / "imagenet-mini").glob("*/*.JPEG"))]
    for image in images:
        image.thumbnail((128, 128))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for i in range(5000):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 32, 32)
    assert sum(zero_bits) >= 1, "the top magnitude was never drawn: the test would not have caught the crash"


def test_posterize_at_zero_bits_is_black_as_the_official_pipeline() -> None:
    # Pillow < 13 kept 0 bits as the mask ~(2**8 - 1): every value becomes 0
    from timm.data.auto_augment import LEVEL_TO_ARG

    from tokenmixers.augment import posterize

    assert LEVEL_TO_ARG["PosterizeIncreasing"](10.0, {}) == (0,)  # magnitude 10 (clipped) keeps 0 bits
    image = Image.open(SHARED / "data" / "imagenet-mini" / "val" / "ILSVRC2012_val_00000098.JPEG").convert("RGB")
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(image, 2)), np.asarray(image) & 0b11000000)
    assert posterize(image, 8) is image


@pytest.mark.parametrize("recipe, model", [("transformer", "unified_halo_micro"), ("cnn", "unified_convnext_micro")])
def test_paper_recipe_trains_on_real_images(tmp_path: Path, recipe: str, model: str) -> None:
    # the whole recipe (RandAugment, mixup, cutmix, erasing, label smoothing, EMA) in a loader worker
    summary = train(recipe, {"model": model, "data": str(SHARED / "data" / "imagenet-mini"), "epochs": 1,
                             "batch_size": 2, "workers": 1, "output": str(tmp_path)})
    assert summary["steps"] == 1 and np.isfinite(summary["history"][0]["train_loss"])
    assert summary["history"][0]["val_images"] == 8
