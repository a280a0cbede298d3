"""Shared test fixtures."""
from __future__ import annotations

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
