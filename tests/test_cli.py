"""The command line, in process: every failure a user can reach is one clear paragraph with exit code 2."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import tokenmixers_cli
from tokenmixers.data import DataError

from .conftest import QUICK, SHARED, cli, signal_after_step

TRAIN = ["train", "--recipe", "digits"] + [f"{k}={v}" for k, v in QUICK.items()]


def _one_paragraph(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("tokenmixers ") and ": error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("setting, message", [
    ("epochs=0", "setting 'epochs' must be >= 1, got 0"),
    ("epochs=-1", "setting 'epochs' must be >= 1, got -1"),
    ("ckpt_every_steps=-3", "setting 'ckpt_every_steps' must be >= 0, got -3"),
    ("input_size=8", "setting 'input_size' must be >= 32, got 8"),
])
def test_bad_settings_fail_before_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture, setting: str,
                                                 message: str) -> None:
    code, _, err = cli(capsys, *TRAIN, f"output={tmp_path / 'out'}", setting)
    _one_paragraph(code, err, message)
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, *TRAIN, "--output", str(tmp_path / "file"))
    _one_paragraph(code, err, "is a file, not a folder")
    code, _, err = cli(capsys, "convert", "nowhere.pth", str(tmp_path / "file"), "--model", "unified_halo_micro")
    _one_paragraph(code, err, f"the destination {tmp_path / 'file'} is a file, not a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_asked_for_on_a_machine_without_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, *TRAIN, f"output={tmp_path}", "device=cuda")
    _one_paragraph(code, err, "device 'cuda' was asked for but this machine has no usable CUDA GPU", "device=cpu")
    code, _, err = cli(capsys, "bench", "unified_halo_micro", "--device", "cuda", "--no-speed")
    _one_paragraph(code, err, "no usable CUDA GPU")


def test_malformed_yaml_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: digits\nepochs: [3\nlr: 1e-3\n")
    code, _, err = cli(capsys, "train", "--recipe", str(recipe))
    _one_paragraph(code, err, f"recipe {recipe} is not valid YAML at line 3")


def test_argument_checks(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        tokenmixers_cli.main(["bench", "unified_halo_micro", "--batch-size", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err
    code, _, err = cli(capsys, "erf", "unified_halo_micro", "--stages", "7", "--num-images", "1", "--input-size", "32")
    _one_paragraph(code, err, "stage(s) [7] do not exist: UnifiedNet has stages 0-3")
    code, _, err = cli(capsys, "list", "foo*")
    _one_paragraph(code, err, "no registered model matches 'foo*'")
    code, _, err = cli(capsys, "--import", "no_such_plugin_module", "list")
    _one_paragraph(code, err, "--import no_such_plugin_module: no module of that name")


def test_eval_needs_a_checkpoint(capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "eval", "--model", "unified_halo_micro", "--data", "digits")
    _one_paragraph(code, err, "no --checkpoint given: evaluating would measure random weights", "--checkpoint none")


class _Broken(Dataset):
    """A dataset whose items fail, as a user's damaged data does inside a loader worker."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise DataError(f"image {index} of /data/x is damaged; re-download it")


def test_errors_in_loader_workers_are_unwrapped() -> None:
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(_Broken(), batch_size=2, num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what torch gives: the worker's whole traceback as text
    message = tokenmixers_cli._describe(caught.value)
    assert message.startswith("image 0 of /data/x is damaged; re-download it (DataError in a data-loading worker at "
                              "test_cli.py:")
    assert "workers=0" in message and "Traceback" not in message and "\n" not in message


def test_unexpected_errors_name_type_and_place(capsys: pytest.CaptureFixture) -> None:
    try:
        None.attribute  # noqa: B018
    except AttributeError as err:
        message = tokenmixers_cli._describe(err)
    assert message.startswith("'NoneType' object has no attribute 'attribute' (AttributeError at test_cli.py:")
    assert message.endswith("rerun with --traceback for the full traceback)")
    code, _, err = cli(capsys, "--traceback", "eval", "--model", "unified_halo_micro", "--data", "digits")
    assert code == 2 and "Traceback (most recent call last)" in err and "error: no --checkpoint given" in err


def test_reader_that_goes_away_is_not_an_error() -> None:
    # `tokenmixers list | head -1`: the pipe closes before the listing is written
    proc = subprocess.Popen([sys.executable, "-m", "tokenmixers_cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == "", err


_PAGE_FAULTS = """
import resource, sys, torch, tokenmixers_cli

def faults() -> int:
    # fewest page faults of touching a freshly allocated 64 MiB tensor, over three tries after a first one
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

bench = ["bench", "unified_halo_micro", "--no-speed", "--batch-size", "1"]
counts = [faults()]
tokenmixers_cli.main(["--no-memory-reuse"] + bench)
counts.append(faults())
tokenmixers_cli.main(bench)
counts.append(faults())
print("faults", *counts)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's")
def test_commands_keep_freed_memory_for_the_next_step() -> None:
    # glibc maps a 64 MiB block fresh on every allocation (16,384 pages faulted in); a command that runs
    # models raises the thresholds, so later blocks reuse the pages, unless --no-memory-reuse says otherwise
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, opted_out, reused = map(int, out.stdout.split("faults")[-1].split())
    assert default > 16_000 and opted_out > 16_000, out.stdout
    assert reused < 100, out.stdout


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_memory_reuse_limit_out_of_range(limit: int) -> None:
    from tokenmixers import reuse_cpu_memory

    with pytest.raises(ValueError, match="must be between 1 and 2147483647 bytes"):
        reuse_cpu_memory(limit)


# -- hints are commands that work ------------------------------------------------------------------------


def _hint(err: str) -> list[str]:
    """The command a message tells the user to run (after 'resume with: ' or 'To train a detector from it: ')."""
    line = next(line for line in err.splitlines() if "tokenmixers " in line)
    return shlex.split(line.split("tokenmixers ", 2)[-1])


def test_an_interrupted_comparison_continues_with_the_command_it_names(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "unified_convnext_micro", "--recipe", "digits", "--output", str(out), "--bench-size", "32",
            "--bench-batch", "2", "--set", "epochs=1", "max_steps_per_epoch=3", "batch_size=16", "workers=0", "log_every=1"]
    log = out / "unified_convnext_micro" / "seed0" / "log.txt"
    with pytest.MonkeyPatch.context() as patch:
        signal_after_step(patch, 1, signal.SIGTERM)
        code, _, err = cli(capsys, *argv)
    assert code == 128 + signal.SIGTERM, err
    hint = _hint(err)
    assert hint == argv and "--resume" not in err  # a plain re-run continues: compare has no --resume
    code, stdout, err = cli(capsys, *hint)
    assert code == 0, err
    assert "resumed from" in log.read_text() and "report:" in stdout


def test_a_classification_checkpoint_given_to_detect_eval_names_the_working_command(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tokenmixers import create_model, save_pretrained

    nuclei = SHARED / "data" / "coco-nuclei"
    classifier = save_pretrained(create_model("unified_convnext_micro", num_classes=10), tmp_path / "classifier")
    code, _, err = cli(capsys, "detect", "eval", "--checkpoint", str(classifier), "--data", str(nuclei))
    _one_paragraph(code, err, "is a classification checkpoint", "tokenmixers detect train --model "
                   "unified_convnext_micro --data <coco-folder> backbone_weights=")
    hint = [str(nuclei) if part == "<coco-folder>" else part for part in _hint(err)]
    # the suggested command, made quick: the smoke recipe, one step, a small detector
    quick = ["--recipe", "smoke", "epochs=1", "max_steps_per_epoch=1", "min_size=[128]", "max_size=128",
             "test_size=128", "fpn_channels=16", "rois_per_image=16", "workers=0", "val_split=train", "eval_images=1",
             f"output={tmp_path / 'det'}"]
    code, _, err = cli(capsys, *hint, *quick)
    assert code == 0, err
    assert "loaded" in (tmp_path / "det" / "log.txt").read_text() or (tmp_path / "det" / "summary.json").is_file()


def test_list_mixers_needs_no_torch_and_matches_the_registry() -> None:
    # the built-in names are data the command line reads without importing torch (5 s before)
    script = ("import sys, tokenmixers_cli; tokenmixers_cli.main(['list', '--mixers']); "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from tokenmixers.mixers import get_mixer, list_mixers

    # the mixers the package itself registers (a test may have registered a plug-in's in this process)
    builtin = [m for m in list_mixers() if get_mixer(m).__module__.startswith("tokenmixers.mixers.")]
    assert run.stdout.split() == builtin


def test_detect_help_says_where_the_test_scale_comes_from(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        tokenmixers_cli.main(["detect", "eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the checkpoint's run's, else 800" in text and "default 800" not in text
