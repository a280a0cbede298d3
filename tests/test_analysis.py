"""Effective receptive fields and invariance: metrics, exact supports, protocol lists, outputs, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from tokenmixers.analysis import load_images
from tokenmixers.analysis.erf import erf_at, erf_maps, erf_metrics, run_erf
from tokenmixers.analysis.invariance import (
    DIRECTIONS,
    KINDS,
    Views,
    draw_directions,
    invariance,
    run_invariance,
    strengths,
)
from tokenmixers.data import DataError

from .conftest import SHARED, cli, free_port


class ConvStack(nn.Module):
    """n stacked 3x3 convolutions; stage i is the output of conv i."""

    def __init__(self, n: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1, padding_mode=padding_mode) for i in range(n))
        self.feature_info = [dict(num_chs=4, reduction=1, module=f"convs.{i}") for i in range(n)]

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], intermediates_only: bool = True) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return [out[i] for i in indices]


class GlobalAttention(nn.Module):
    """A 1x1 conv embedding and one global self-attention layer over all pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.feature_info = [dict(num_chs=8, reduction=1, module="attn")]

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], intermediates_only: bool = True) -> list[torch.Tensor]:
        f = self.embed(x)
        B, C, H, W = f.shape
        tokens = f.flatten(2).transpose(1, 2)
        out = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return [out.transpose(1, 2).reshape(B, C, H, W)]


def _support(erf: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.nonzero(erf)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


# -- ERF ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, side", [(1, 3), (2, 5)])
def test_erf_support_of_stacked_convs(depth: int, side: int) -> None:
    maps = erf_maps(ConvStack(depth), [torch.randn(4, 3, 31, 31)], stages=[depth - 1], reduce="sum")
    erf = maps[depth - 1]
    rows, cols = _support(erf)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (side, side)
    assert rows.start == 15 - side // 2 and cols.start == 15 - side // 2  # centred on the centre pixel
    assert (erf[rows, cols] > 0).all()


def test_erf_of_all_ones_convs_is_known_exactly() -> None:
    # two 3x3 all-ones convolutions (3 -> 4 -> 4 channels, no bias) are linear: d(centre sum)/dx is, for every
    # image and colour, 4 x 4 paths times the full convolution of two 3x3 boxes, the 5x5 tent (1 2 3 2 1)^T (1 2 3 2 1)
    model = ConvStack(2)
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    erf = erf_maps(model, [torch.randn(2, 3, 31, 31), torch.randn(1, 3, 31, 31)], reduce="sum")[1]
    tent = np.array([1.0, 2, 3, 2, 1])
    expected = np.zeros((31, 31))
    expected[13:18, 13:18] = 3 * 16 * np.outer(tent, tent)  # summed over the 3 colours
    np.testing.assert_allclose(erf, expected, rtol=1e-6, atol=0)
    # mass within Chebyshev radius 0, 1, 2 of the centre: 9 / 81, 49 / 81, 81 / 81 -> sides 1, 3, 5 of 31
    for t, side in ((0.05, 1), (1 / 9, 1), (0.12, 3), (0.5, 3), (49 / 81, 3), (0.61, 5), (0.99, 5), (1.0, 5)):
        assert erf_at(erf, t) == side / 31, t
    assert erf_metrics(erf)["erf@0.5"] == 3 / 31 and erf_metrics(erf)["com_offset"] == pytest.approx(0, abs=1e-12)


def test_global_attention_reaches_every_pixel() -> None:
    erf = erf_maps(GlobalAttention(), [torch.randn(2, 3, 17, 23)], reduce="sum")[0]
    assert (erf > 0).all()
    assert erf_at(erf, 0.99) > 0.9


def test_erf_at_properties() -> None:
    rng = np.random.default_rng(0)
    erf = rng.random((33, 33)) * np.exp(-((np.arange(33) - 16)[:, None] ** 2 + (np.arange(33) - 16)[None] ** 2) / 40)
    values = [erf_at(erf, t) for t in (0.1, 0.2, 0.3, 0.5, 0.8, 0.99, 1.0)]
    assert values == sorted(values)  # monotone in t
    assert erf_at(erf * 1234.5, 0.5) == erf_at(erf, 0.5)  # invariant to scaling the map
    point = np.zeros((40, 40))
    point[20, 20] = 3.0
    assert all(erf_at(point, t) == 1 / 40 for t in (0.2, 0.5, 0.99))
    assert erf_metrics(point)["com_offset"] == 0.0
    shifted = np.zeros((40, 40))
    shifted[20, 26] = 1.0  # mass right of the centre: the centre of mass says so
    metrics = erf_metrics(shifted)
    assert (metrics["com_dy_px"], metrics["com_dx_px"]) == (0.0, 6.0)
    assert metrics["erf@0.5"] == 13 / 40


def test_erf_of_unified_model_and_outputs(tmp_path: Path) -> None:
    results = run_erf(["unified_swin_micro", "unified_convnext_micro"], "digits", limit=4, input_size=64,
                      batch_size=4, out=tmp_path, layer_scale=1.0)
    for name in ("unified_swin_micro", "unified_convnext_micro"):
        assert results[name]["weights"] == "random weights, layer scale 1"
        assert sorted(results[name]["stages"]) == [0, 1, 2, 3]
    maps = np.load(tmp_path / "erf_maps.npz")
    assert maps["unified_swin_micro/stage4"].shape == (64, 64)
    metrics = json.loads((tmp_path / "erf_metrics.json").read_text())
    for name in ("unified_swin_micro", "unified_convnext_micro"):
        saved = [metrics[name]["stages"][str(s)] for s in range(4)]
        for s, stage in enumerate(saved):  # the written metrics are those of the written maps
            assert stage == pytest.approx(erf_metrics(maps[f"{name}/stage{s + 1}"])), (name, s)
            erfs = [stage[f"erf@{t:g}"] for t in (0.2, 0.3, 0.5, 0.99)]
            assert erfs == sorted(erfs), (name, s)  # ERF@t grows with t
        # with layer scale 1 every block adds to the field: each stage sees more than the one before
        # (measured ERF@0.5: swin 0.08/0.17/0.33/0.61, convnext 0.08/0.17/0.33/0.58)
        by_stage = [stage["erf@0.5"] for stage in saved]
        assert all(a < b for a, b in zip(by_stage, by_stage[1:])), (name, by_stage)
    for png in ("erf_unified_swin_micro.png", "erf_unified_convnext_micro.png", "erf_stage1.png", "erf_stage4.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert "stage,erf@0.2" in (tmp_path / "erf_metrics.csv").read_text().splitlines()[0].replace("model,weights,", "")


def test_erf_replknet_variant() -> None:
    # RepLKNet: relu(grad) instead of |grad|; ERF@t on log10(map + 1), squares of side >= 3, share > t
    model = ConvStack(2)
    x = torch.randn(3, 3, 21, 21)
    absolute, positive = erf_maps(model, [x])[1], erf_maps(model, [x], method="replknet")[1]
    assert (positive <= absolute + 1e-12).all() and positive.sum() < absolute.sum()
    rng = np.random.default_rng(1)
    erf = 50 * rng.random((33, 33)) * np.exp(-((np.arange(33) - 16)[:, None] ** 2 + (np.arange(33) - 16)[None] ** 2) / 30)
    data = np.log10(erf + 1)
    for t in (0.2, 0.3, 0.5, 0.99):
        side = next(2 * i + 1 for i in range(1, 16) if data[16 - i : 17 + i, 16 - i : 17 + i].sum() / data.sum() > t)
        assert erf_at(erf, t, method="replknet") == side / 33
    assert erf_at(erf, 0.5, method="replknet") > erf_at(erf, 0.5)  # the logarithm widens the field
    assert erf_metrics(erf, method="replknet")["erf@0.5"] == erf_at(erf, 0.5, method="replknet")


def test_erf_needs_intermediates() -> None:
    with pytest.raises(ValueError, match="has no forward_intermediates and no feature_info"):
        erf_maps(nn.Conv2d(3, 3, 3), [torch.randn(1, 3, 8, 8)])


# -- invariance -------------------------------------------------------------------------------------------


def test_official_settings_and_directions() -> None:
    assert strengths("translation") == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64]
    assert strengths("pre_rotation") == strengths("post_rotation") == list(range(0, 91, 5))
    assert strengths("scale") == [0.2, 0.325, 0.45, 0.575, 0.7, 0.825, 0.95, 1.075, 1.2, 1.325, 1.45, 1.575, 1.7,
                                  1.825, 1.95]
    assert len(set(DIRECTIONS)) == 8 and DIRECTIONS[7] == (1, -1)  # "+y-x", never drawn by the official code
    drawn = draw_directions(17, 500, seed=0)
    assert set(np.unique(drawn)) == set(range(8))
    assert np.array_equal(drawn, draw_directions(17, 500, seed=0))  # deterministic given the seed
    with pytest.raises(ValueError, match="unknown invariance kind 'shear'"):
        strengths("shear")


def _images(n: int = 6) -> list[tuple[Image.Image, int]]:
    """Black 256x256 images with a random pattern in the middle 80x80: shifts up to 64 px stay black-bordered."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        pixels = np.zeros((256, 256, 3), dtype=np.uint8)
        pixels[88:168, 88:168] = rng.integers(0, 256, size=(80, 80, 3))
        out.append((Image.fromarray(pixels), i % 3))
    return out


def test_views_at_zero_strength_are_the_standard_view() -> None:
    views = Views()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 411, 3), dtype=np.uint8))
    standard = views.standard(image)
    for direction in range(8):
        assert torch.equal(views.translation(image, 0, direction), standard)
    assert torch.equal(views.rotation(image, 0, pre=True), standard)
    assert torch.equal(views.rotation(image, 0, pre=False), standard)
    shifted = views.translation(image, 8, 1)  # window 8 px to the right: the content moves left by exactly 8 px
    assert torch.equal(shifted[:, :, : 224 - 8], standard[:, :, 8:])
    far = views.translation(image, 64, 2)  # 64 px up: the resized image has 16 px above the centre crop,
    black = views._finish(torch.zeros(3, 224, 224))  # so 48 rows are black (normalised) fill
    assert torch.equal(far[:, :48], black[:, :48]) and not torch.equal(far[:, 48], black[:, 48])
    assert torch.equal(far[:, 64:], standard[:, : 224 - 64])


def test_center_alignment_is_the_official_window() -> None:
    # the official crop spans L // 2 - 112 .. L // 2 + 112 of the resized side L; for L = 331 (3 mod 4) that is
    # one row above torchvision's rounded centre crop, and clipped crops are re-centred with zero padding
    image = Image.open(SHARED / "data" / "imagenet-mini" / "val" / "ILSVRC2012_val_00000098.JPEG")
    views = Views(align="center")
    resized = TF.to_tensor(TF.resize(image.convert("RGB"), 256, interpolation=TF.InterpolationMode.BICUBIC))
    assert resized.shape[1:] == (331, 256)
    official = resized[:, 165 - 112 : 165 + 112, 128 - 112 : 128 + 112]
    assert torch.equal(views.translation(image, 0, 1), views._finish(official))
    clipped = resized[:, 165 + 64 - 112 :, 128 - 112 : 128 + 112]  # 64 px down: 214 rows left, 5 black above
    padded = torch.nn.functional.pad(clipped, (0, 0, 5, 5))
    assert torch.equal(views.translation(image, 64, 0), views._finish(padded))


def test_zero_strength_gives_full_consistency() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5))
    data = _images()
    for kind in ("translation", "pre_rotation", "post_rotation"):
        record = invariance(model, data, kind, settings=[0], progress=False)[0]
        assert record["consistency"] == 100.0 and record["images"] == 6


def test_circular_equivariant_model_is_translation_invariant() -> None:
    # circular convolutions + global average pooling: invariant to integer shifts of a black-bordered image
    torch.manual_seed(0)
    model = torch.nn.Sequential(ConvStack(2, padding_mode="circular").convs[0], torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    data = _images()
    records = invariance(lambda_model(model), data, "translation", progress=False)
    assert [r["consistency"] for r in records] == [100.0] * 17


def lambda_model(model: nn.Module) -> nn.Module:
    """Run a float64 model on float32 views (exact shifts stay exact)."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.double())

    return Wrapped()


def test_constant_model_is_perfectly_consistent() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.arange(7.0).expand(x.shape[0], 7) + 0 * x.mean()

    data = _images(3)
    for kind in KINDS:
        assert all(r["consistency"] == 100.0 for r in invariance(Constant(), data, kind, progress=False))


def test_run_invariance_outputs(tmp_path: Path) -> None:
    results = run_invariance(["unified_pvt_micro", "unified_halo_micro"], "digits", kinds=["translation", "scale"],
                             limit=8, batch_size=8, input_size=64, device="cpu", out=tmp_path)
    rows = results["unified_pvt_micro"]
    assert len(rows) == 17 + 15 and rows[0]["consistency"] == 100.0 and rows[0]["weights"] == "random weights"
    assert rows[0]["top1"] is not None
    saved = json.loads((tmp_path / "invariance.json").read_text())
    assert len(saved) == 2 * (17 + 15)
    assert (tmp_path / "invariance.csv").read_text().startswith("model,weights,kind,strength")
    png = (tmp_path / "invariance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


# -- CLI errors -------------------------------------------------------------------------------------------


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "erf", "unified_halo_micro", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert code == 2 and "image folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "invariance", "unified_halo_micro", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "contains no images" in err
    plugin = tmp_path / "plain_models.py"
    plugin.write_text(
        "import torch\nfrom timm.models import register_model\n\n"
        "class Plain(torch.nn.Module):\n"
        "    def __init__(self, **kwargs):\n        super().__init__()\n        self.fc = torch.nn.Linear(3, 2)\n"
        "    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n\n"
        "@register_model\ndef plain_net(pretrained=False, **kwargs):\n    return Plain()\n"
    )
    code, _, err = cli(capsys, "--import", str(plugin), "erf", "plain_net", "--num-images", "2", "--out", str(tmp_path / "o"))
    assert code == 2 and "has no forward_intermediates" in err


def test_load_images_sources(tmp_path: Path) -> None:
    assert len(load_images("digits", limit=5)) == 5
    for i in range(3):
        Image.new("RGB", (20, 30), (i, i, i)).save(tmp_path / f"{i}.jpg")
    unlabelled = load_images(str(tmp_path))
    assert len(unlabelled) == 3 and unlabelled.samples[0].label == -1
    with pytest.raises(DataError, match="does not exist"):
        load_images(str(tmp_path / "missing"))


def test_invariance_under_torchrun_counts_each_image_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["invariance", "unified_pvt_micro", "--data", "digits", "--num-images", "9", "--kinds", "translation",
            "--input-size", "48"]
    code, _, err = cli(capsys, *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "tokenmixers", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[:1500] + "\n...\n" + two.stderr[-1500:]  # the cause is often first
    one_rows = json.loads((tmp_path / "one" / "invariance.json").read_text())
    two_rows = json.loads((tmp_path / "two" / "invariance.json").read_text())
    assert all(r["images"] == 9 for r in two_rows)  # 9 images over 2 processes: 5 + 4, no padding
    assert one_rows == two_rows
