"""Shared test fixtures."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch

from .reference import paper_state_dict

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAPER_MODELS = [f"unified_{f}_{s}" for s in ("micro", "tiny", "small", "base") for f in ("halo", "pvt", "swin", "convnext", "dcn_v3")]
MICRO_MODELS = [m for m in PAPER_MODELS if m.endswith("_micro")]


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, one thread per worker (and per process it starts): more threads than cores makes torch spin."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# the longest tests (seconds each, on 2 cores): started first, so that the short ones fill both workers' last minutes
SLOW_FIRST = ("test_micro_detector_learns_the_nuclei", "test_invariance_under_torchrun_counts_each_image_once",
              "test_two_process_torchrun_matches_one_process", "test_compare_reports_intervals_and_noise",
              "test_torchrun_evaluates_every_image_once", "test_the_mixers_published_after_the_paper_are_fitted",
              "test_compare_published_twins_and_unified", "test_sigkill_mid_epoch_then_resume_is_exact",
              "test_the_task_trains_on_two_processes_launched_as_slurm_does",
              "test_training_on_real_nuclei_masks_then_eval_and_predict", "test_mmseg_parity",
              "test_mask_rcnn_gives_mmdets_detections", "test_retinanet_gives_mmdets_detections",
              "test_cascade_gives_mmdets_detections", "test_cascade_learns_the_nuclei",
              "test_stopped_mid_epoch_resumes_exactly")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slowest tests first (a stable sort: the rest keep their order)."""
    items.sort(key=lambda item: not item.name.startswith(SLOW_FIRST))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", params=PAPER_MODELS)
def official_weights(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor]]:
    """``(name, float64 official weights)`` of each paper model, re-created once for every parity test.

    Session-scoped and parametrized, so pytest runs the classification and detection parity tests of
    one model back to back and the weights (seconds of random numbers for a base model) are built once.
    """
    return request.param, paper_state_dict(request.param)


def garbage_pad_to_multiple(t: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Like ``layers.pad_to_multiple`` but fills the padding with large values (must never leak)."""
    _, H, W, _ = t.shape
    wh, ww = window
    padded = torch.full((t.shape[0], math.ceil(H / wh) * wh, math.ceil(W / ww) * ww, t.shape[3]), 1e3, dtype=t.dtype)
    padded[:, :H, :W] = t
    return padded


def randomised(mixer: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter a visible random value (gammas/offsets are not zero); float64, eval mode."""
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
    return mixer.double().eval()


# a fast, fully deterministic run: the micro ConvNeXt (it has the head BatchNorm) on digits
QUICK = {
    "model": "unified_convnext_micro", "epochs": 2, "max_steps_per_epoch": 4, "batch_size": 32,
    "deterministic": True, "threads": 1, "workers": 0, "log_every": 1,
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One short digits run shared by the tests that need a trained checkpoint: (run folder, summary)."""
    from tokenmixers.classification import train

    out = tmp_path_factory.mktemp("train")
    summary = train("digits", {**QUICK, "max_steps_per_epoch": 12, "deterministic": False, "threads": 0,
                               "output": str(out)})
    return out, summary


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: (exit code, stdout, stderr)."""
    import tokenmixers_cli

    try:
        tokenmixers_cli.main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def signal_after_step(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Send this process ``signum`` right after the run's ``step``-th optimizer step (a scheduler stopping the job).

    Sent from inside the run, so it always lands while the run can save (a watcher thread could be late).
    """
    from tokenmixers import runs

    original = runs._Run.optimizer_step

    def step_then_signal(self: runs._Run) -> None:
        original(self)
        if self.progress.step + 1 == step:  # the engine counts the step right after this call
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(runs._Run, "optimizer_step", step_then_signal)


def free_port() -> str:
    """A TCP port nobody listens on now: concurrent torchrun tests (pytest -n 2) must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
