"""Shared test fixtures."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PAPER_MODELS = [f"unified_{f}_{s}" for s in ("micro", "tiny", "small", "base") for f in ("halo", "pvt", "swin", "convnext", "dcn_v3")]
MICRO_MODELS = [m for m in PAPER_MODELS if m.endswith("_micro")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
