"""The official detection backbones: float64 parity for the 20 paper models, ImageNet initialisation, variants."""
from __future__ import annotations

import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from tokenmixers import CheckpointError, load_checkpoint
from tokenmixers.detection import create_backbone, load_imagenet

from .reference import paper_detection_state_dict, paper_state_dict

DATA = Path(__file__).parent / "data" / "stm_eval_det"


@lru_cache(maxsize=1)
def _input() -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / "input_160x224.npy"))


@lru_cache(maxsize=2)
def _cached_detection_state_dict(name: str) -> dict[str, torch.Tensor]:
    return paper_detection_state_dict(name)


def _official_backbone(name: str, variant: str = "official", weights: Optional[dict] = None) -> torch.nn.Module:
    """The detection backbone (float64, eval) with the official weights, loaded the way mmdet holds them."""
    with torch.device("meta"):
        backbone = create_backbone(name, variant=variant)
    backbone = backbone.to_empty(device="cpu").double().eval()
    state = paper_detection_state_dict(name, weights) if weights is not None else _cached_detection_state_dict(name)
    report = load_checkpoint(backbone, {"state_dict": state})
    assert report.source == "mmdet" and not report.missing and not report.unexpected
    return backbone


def _largest_difference(name: str, outputs: list[torch.Tensor]) -> float:
    """Largest difference of the reference summaries, relative to the largest reference value of each."""
    ref = np.load(DATA / f"{name}.npz")
    worst = 0.0
    for i, out in enumerate(outputs):
        g = torch.Generator().manual_seed(zlib.crc32(f"proj{i}".encode()))
        proj = torch.einsum("kc,chw->khw", torch.randn(4, out.shape[1], generator=g, dtype=torch.float64), out[0])
        for ours, theirs in ((proj, ref[f"proj{i}"]), (out[0].mean((1, 2)), ref[f"mean{i}"])):
            worst = max(worst, float((ours - torch.from_numpy(theirs)).abs().max() / np.abs(theirs).max()))
    return worst


def test_official_detection_backbone_parity(official_weights: tuple[str, dict[str, torch.Tensor]]) -> None:
    name, weights = official_weights
    backbone = _official_backbone(name, weights=weights)
    with torch.no_grad():
        outputs = backbone(_input())
    assert [tuple(o.shape[2:]) for o in outputs] == [(40, 56), (20, 28), (10, 14), (5, 7)]
    assert [o.shape[1] for o in outputs] == backbone.out_channels
    rel = _largest_difference(name, outputs)
    print(f"{name}: largest relative difference {rel:.2e}")
    assert rel <= 1e-10


@pytest.mark.parametrize("family", ["halo", "swin", "pvt"])
def test_masked_variant_is_ours_not_the_official(family: str) -> None:
    # at 160x224 the official blocks let padding act as tokens (Halo, Swin), shift one-window maps (Swin)
    # and keep the position embedding off the residual path (PVT); the masked variant does none of that
    name = f"unified_{family}_micro"
    masked = _official_backbone(name, variant="masked")
    with torch.no_grad():
        rel = _largest_difference(name, masked(_input()))
    assert rel > 1e-3
    # at sizes made of whole windows, Halo's padding never exists: both variants agree
    if family == "halo":
        x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
        with torch.no_grad():
            a, b = _official_backbone(name)(x), masked(x)
        assert all(torch.allclose(u, v, rtol=0, atol=1e-12) for u, v in zip(a, b))


def test_detection_backbone_contract() -> None:
    backbone = create_backbone("unified_swin_micro").eval()
    assert backbone.out_channels == [32, 64, 128, 256] and backbone.strides == [4, 8, 16, 32]
    assert not any(k.startswith("head.") or re.match(r"stages\.\d\.norm\.", k) for k in backbone.state_dict())
    assert backbone.cfg.drop_path_rate == 0.1  # the official Mask R-CNN rate of a micro model
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 97, 131))  # any size, odd and non-square
    assert [tuple(m.shape) for m in maps] == [(2, 32, 25, 33), (2, 64, 13, 17), (2, 128, 7, 9), (2, 256, 4, 5)]
    with pytest.raises(ValueError, match="unknown variant"):
        create_backbone("unified_swin_micro", variant="padded")


def test_timm_model_as_detection_backbone() -> None:
    backbone = create_backbone("twins_svt_small").eval()
    assert backbone.out_channels == [64, 128, 256, 512] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


# -- ImageNet initialisation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imagenet") / "unified_pvt_micro.pth"
    torch.save({"model": paper_state_dict("unified_pvt_micro", torch.float32), "epoch": 299}, path)
    return path


def test_imagenet_initialisation_as_the_official_code(imagenet_checkpoint: Path) -> None:
    backbone = create_backbone("unified_pvt_micro", weights=imagenet_checkpoint)
    classification = paper_state_dict("unified_pvt_micro", torch.float32)
    assert torch.equal(backbone.stem.conv1.weight, classification["downsample_layers.0.stem.0.weight"])
    assert torch.equal(backbone.stages[2].blocks[1].mixer.q.weight, classification["stages.2.1.attn.q.weight"])
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) and not n.bias.any() for n in backbone.out_norms.values())
    report = load_imagenet(create_backbone("unified_pvt_micro"), imagenet_checkpoint)
    text = str(report)
    assert report.source == "stm-eval" and report.entry == "model"
    assert "head." in text and "stages.*.norm" in text and "out norms freshly initialised" in text


def test_imagenet_checkpoint_of_another_size_is_refused(imagenet_checkpoint: Path, tmp_path: Path) -> None:
    backbone = create_backbone("unified_pvt_tiny")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError, match="looks like unified_pvt_micro") as err:
        load_imagenet(backbone, imagenet_checkpoint)
    assert str(imagenet_checkpoint) in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(imagenet_checkpoint.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_imagenet(backbone, damaged)
