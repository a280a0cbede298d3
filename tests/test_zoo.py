"""The model zoo: registration, exact parameter counts, the timm surface and clear errors."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

import tokenmixers
from tokenmixers.zoo import model_cfg

from .conftest import PAPER_MODELS, ROOT

# numel of model.parameters() of the official STM-Evaluation models
OFFICIAL_PARAMS = {
    "unified_halo_micro": 4389672,
    "unified_pvt_micro": 4454056,
    "unified_swin_micro": 4381042,
    "unified_convnext_micro": 4439624,
    "unified_dcn_v3_micro": 4302692,
    "unified_halo_tiny": 31523176,
    "unified_pvt_tiny": 31157736,
    "unified_swin_tiny": 31540546,
    "unified_convnext_tiny": 31912360,
    "unified_dcn_v3_tiny": 29933272,
    "unified_halo_small": 52831336,
    "unified_pvt_small": 50887656,
    "unified_swin_small": 52867666,
    "unified_convnext_small": 54393640,
    "unified_dcn_v3_small": 50082280,
    "unified_halo_base": 93327336,
    "unified_pvt_base": 91566312,
    "unified_swin_base": 93388576,
    "unified_convnext_base": 95865576,
    "unified_dcn_v3_base": 97465192,
}


def test_all_paper_models_registered() -> None:
    assert set(PAPER_MODELS) <= set(tokenmixers.list_models())
    assert set(PAPER_MODELS) <= set(timm.list_models("unified_*"))


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_param_count_equals_official(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_create_model_paths_agree() -> None:
    a = tokenmixers.create_model("unified_swin_micro", num_classes=7)
    b = timm.create_model("unified_swin_micro", num_classes=7)
    assert type(a) is type(b) is tokenmixers.UnifiedNet
    assert a.state_dict().keys() == b.state_dict().keys()
    assert a.head.fc.out_features == 7


def test_pretrained_cfg() -> None:
    model = timm.create_model("unified_halo_tiny")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    sd = model.state_dict()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == 0.875


def test_unknown_model_name_is_clear() -> None:
    with pytest.raises(KeyError, match="unknown model 'unified_halo_tinyy'.*unified_halo_tiny"):
        tokenmixers.create_model("unified_halo_tinyy")
    with pytest.raises(KeyError, match="unknown model"):
        tokenmixers.model_cfg("nope")


def test_zoo_is_data() -> None:
    # every model is one typed, frozen config: a mixer name plus architecture arguments
    for name in PAPER_MODELS:
        cfg = model_cfg(name)
        assert cfg.mixer in tokenmixers.list_mixers()
        assert len(cfg.depths) == len(cfg.dims) == 4
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.depths = (1, 1, 1, 1)
    built = timm.create_model("unified_pvt_micro", drop_path_rate=0.05)
    assert built.cfg == model_cfg("unified_pvt_micro").replace(drop_path_rate=0.05)


def test_register_family_for_a_new_mixer() -> None:
    # one registration gives the four budgets, in timm too
    tokenmixers.register_family("test_dw5", "dwconv", mixer_args={"kernel_size": 5}, norm_eps=1e-6)
    for scale in tokenmixers.SCALES:
        assert timm.is_model(f"unified_test_dw5_{scale}")
    model = timm.create_model("unified_test_dw5_micro")
    assert model.stages[0].blocks[0].mixer.dwconv.kernel_size == (5, 5)


def _readme_rows() -> dict[str, list[str]]:
    """The model zoo table of the README: name -> cells."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("unified_") and len(cells) >= 4:
            rows[cells[0]] = cells
    return rows


def test_readme_table_matches_counted_params_and_macs() -> None:
    # micro models (the other scales count with the same code): params, MACs and the paper's convention
    from tokenmixers.bench import count_macs

    rows = {n: c for n, c in _readme_rows().items() if n.endswith("_micro")}
    assert {f"unified_{f}_micro" for f in ("halo", "pvt", "swin", "convnext", "dcn_v3")} <= set(rows)
    for name, cells in rows.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        macs = count_macs(model)
        counted = [f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}", f"{macs['macs'] / 1e9:.2f}",
                   f"{macs['macs_paper'] / 1e9:.2f}"]
        assert counted == cells[1:4], name


def test_device_and_dtype_as_timm_accepts_them() -> None:
    from tokenmixers import create_model

    meta = create_model("unified_halo_micro", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    half = create_model("unified_swin_micro", dtype=torch.bfloat16, num_classes=3)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.num_classes == 3
    assert half(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).shape == (1, 3)
