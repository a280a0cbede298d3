"""The README's Python examples run as written."""
from __future__ import annotations

import re

from .conftest import ROOT


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_tour_runs() -> None:
    tour = next(b for b in _python_blocks() if "features_only" in b)
    exec(compile(tour, "README quick tour", "exec"), {})


def test_add_a_mixer_example_runs() -> None:
    block = next(b for b in _python_blocks() if "register_mixer" in b)
    namespace: dict = {}
    exec(compile(block, "README mixer example", "exec"), namespace)
    model = namespace["model"]
    import torch

    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
