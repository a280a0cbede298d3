"""The README's Python examples run as written and give what their comments promise."""
from __future__ import annotations

import ast
import re

import torch

from .conftest import MICRO_MODELS, ROOT


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_tour_runs() -> None:
    tour = next(b for b in _python_blocks() if "features_only" in b)
    ns: dict = {}
    exec(compile(tour, "README quick tour", "exec"), ns)
    code = {line.split("#")[0].strip() for line in tour.splitlines()}

    def readme(line: str) -> None:
        """Each promise below is stated next to the README line it checks: that line must still read so."""
        assert line in code, f"the README quick tour no longer has the line {line!r}; update this test"

    readme('model = timm.create_model("unified_halo_tiny", num_classes=10)')
    readme("logits = model(torch.randn(2, 3, 200, 312))")
    assert ns["logits"].shape == (2, 10)  # (batch, num_classes) at an odd, non-square size
    assert torch.isfinite(ns["logits"]).all()

    # "stage maps at strides 4/8/16/32 (NCHW)" of 256x320; DCNv3-T (InternImage-T) widths 64/128/256/512
    readme('backbone = timm.create_model("unified_dcn_v3_tiny", features_only=True, out_indices=(0, 1, 2, 3))')
    readme("c2, c3, c4, c5 = backbone(torch.randn(1, 3, 256, 320))")
    assert [tuple(ns[c].shape) for c in ("c2", "c3", "c4", "c5")] == [
        (1, 64, 64, 80), (1, 128, 32, 40), (1, 256, 16, 20), (1, 512, 8, 10)]

    # Halo-T (widths 96/192/384/768) on 224x224: the four stage maps at strides 4..32, final = the last stage's
    readme("final, stages = model.forward_intermediates(torch.randn(1, 3, 224, 224))")
    assert [tuple(s.shape) for s in ns["stages"]] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    assert ns["final"].shape == (1, 768, 7, 7)

    tokenmixers = ns["tokenmixers"]
    readme('tokenmixers.list_models("unified_*_micro")')  # the zoo: at least the paper's five micro models
    assert set(tokenmixers.list_models("unified_*_micro")) >= set(MICRO_MODELS)
    shown = re.search(r"list_mixers\(\)\s+# (\[.*), \.\.\.\]", tour)  # the README's list, cut short by "..."
    assert shown is not None
    start = ast.literal_eval(shown.group(1) + "]")
    assert tokenmixers.list_mixers()[: len(start)] == start


def test_add_a_mixer_example_runs() -> None:
    # the README's mixer lands inside the paper's budget at every scale, as the line it prints says
    block = next(b for b in _python_blocks() if "register_mixer" in b)
    namespace: dict = {}
    exec(compile(block, "README mixer example", "exec"), namespace)
    model, fits = namespace["model"], namespace["fits"]
    assert all(f.inside for f in fits.values()) and list(fits) == ["micro", "tiny", "small", "base"]
    printed = re.search(r"print\(fits\[\"micro\"\]\)\s+# (.*)", block).group(1)
    head, *rest = [part.strip() for part in printed.split("...")]
    assert str(fits["micro"]).startswith(head) and all(part.removesuffix(", inside") in str(fits["micro"]) for part in rest)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
