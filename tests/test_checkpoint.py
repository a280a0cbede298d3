"""Official checkpoints load and compute what the official models compute; bad files fail clearly."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tokenmixers import CheckpointError, load_checkpoint, load_pretrained, save_pretrained

from .conftest import cli
from .reference import paper_state_dict, relative_difference

DATA = Path(__file__).parent / "data" / "stm_eval"


def test_official_parity(official_weights: tuple[str, dict[str, torch.Tensor]]) -> None:
    # the weights are built once per model for this and the detection backbone's parity test (conftest)
    name, weights = official_weights
    with torch.device("meta"):
        model = timm.create_model(name)
    model = model.to_empty(device="cpu").double().eval()
    report = load_checkpoint(model, {"model": weights})
    assert report.source == "stm-eval" and not report.missing and not report.unexpected
    ref = np.load(DATA / f"{name}.npz")
    x = torch.from_numpy(np.load(DATA / "input_224.npy"))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.head.fc(pre)
        rel64 = max(relative_difference(logits, ref["logits"]), relative_difference(pre, ref["pre_logits"]))
    print(f"{name}: max relative difference float64 {rel64:.2e}")
    assert rel64 <= 1e-13  # measured <= 2.3e-15 for all 20 models; a real difference is many orders larger
    if name.endswith(("_micro", "_tiny")):  # float32 (the same code in another dtype) on the ten smaller models
        model.float()
        with torch.no_grad():
            pre32 = model.forward_head(model.forward_features(x.float()), pre_logits=True)
            rel32 = max(relative_difference(model.head.fc(pre32), ref["logits"]),
                        relative_difference(pre32, ref["pre_logits"]))
        assert rel32 <= 1e-5  # measured <= 8e-7


# -- file formats, entries and the timm paths --------------------------------------------------------


def _micro(name: str = "unified_halo_micro", **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **kwargs).eval()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "halo_micro_official.pth"
    sd = paper_state_dict("unified_halo_micro", torch.float32)
    torch.save({"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()}, "epoch": 299}, path)
    return path


def test_entries_model_ema_and_bare(official_file: Path, tmp_path: Path) -> None:
    raw = torch.load(official_file, weights_only=True)
    a, b, c = _micro(), _micro(), _micro()
    assert load_checkpoint(a, official_file).entry == "model"
    assert load_checkpoint(b, official_file, entry="ema").entry == "model_ema"
    torch.save(raw["model"], tmp_path / "bare.pth")
    assert load_checkpoint(c, tmp_path / "bare.pth").entry is None
    assert torch.equal(a.stem.conv1.weight, c.stem.conv1.weight)
    assert torch.equal(b.stem.conv1.weight, a.stem.conv1.weight + 1)
    with pytest.raises(CheckpointError, match="has no 'optimizer' entry"):
        load_checkpoint(c, official_file, entry="optimizer")


def test_timm_pretrained_file_path(official_file: Path) -> None:
    direct = _micro()
    load_checkpoint(direct, official_file)
    via_timm = timm.create_model("unified_halo_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(official_file)))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(direct(x), via_timm.eval()(x))
    features = timm.create_model(
        "unified_halo_micro", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(official_file))
    )
    assert torch.equal(features.model.stem.conv1.weight, direct.stem.conv1.weight)


def test_save_pretrained_round_trip(official_file: Path, tmp_path: Path) -> None:
    model = _micro("unified_pvt_micro", num_classes=10, drop_path_rate=0.05)
    save_pretrained(model, tmp_path / "mine")
    assert sorted(os.listdir(tmp_path / "mine")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert config["architecture"] == "unified_pvt_micro" and config["num_classes"] == 10
    assert config["model_args"]["drop_path_rate"] == 0.05 and config["pretrained_cfg"]["crop_pct"] == 0.875
    again = load_pretrained(tmp_path / "mine").eval()
    x = torch.randn(2, 3, 64, 80)
    assert torch.equal(model(x), again(x))
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'mine'}", pretrained=True).eval()
    assert torch.equal(model(x), via_timm(x))


def test_cli_convert(official_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "converted"
    code, _, err = cli(capsys, "convert", str(official_file), str(out), "--model", "unified_halo_micro")
    assert code == 0, err
    model = load_pretrained(out)
    reference = _micro()
    load_checkpoint(reference, official_file)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    code, _, err = cli(capsys, "convert", str(official_file), str(tmp_path / "x"), "--model", "unified_halo_tiny")
    assert code == 2 and "looks like unified_halo_micro" in err


# -- adaptations the official loader also makes ------------------------------------------------------


def test_classifier_reinitialised_or_sliced(official_file: Path, tmp_path: Path) -> None:
    sd = paper_state_dict("unified_halo_micro", torch.float32)
    ten = _micro(num_classes=10)
    fresh = ten.head.fc.weight.clone()
    report = load_checkpoint(ten, official_file)
    assert any("re-initialised" in a for a in report.adapted)
    assert torch.equal(ten.head.fc.weight, fresh) and torch.equal(ten.stem.conv1.weight, sd["downsample_layers.0.stem.0.weight"])
    (tmp_path / "labels.txt").write_text("\n".join(map(str, [5, 3, 999])))
    three = _micro(num_classes=3)
    load_checkpoint(three, official_file, label_map=tmp_path / "labels.txt")
    assert torch.equal(three.head.fc.weight, sd["head.weight"][[5, 3, 999]])
    headless = _micro(num_classes=0)
    assert any("no classifier" in a for a in load_checkpoint(headless, official_file).adapted)


def test_position_tables_resized() -> None:
    swin = _micro("unified_swin_micro", mixer_args={"window_size": 9})
    report = load_checkpoint(swin, {"model": paper_state_dict("unified_swin_micro", torch.float32)})
    assert swin.stages[0].blocks[0].mixer.relative_position_bias_table.shape == (17 * 17, 1)
    assert any("bicubic (169, 1) -> (289, 1)" in a for a in report.adapted)
    halo = _micro("unified_halo_micro", mixer_args={"halo_size": 2})
    report = load_checkpoint(halo, {"model": paper_state_dict("unified_halo_micro", torch.float32)})
    assert any("linear (25, 32) -> (21, 32)" in a for a in report.adapted)
    pvt = _micro("unified_pvt_micro", img_size=320)
    sd = paper_state_dict("unified_pvt_micro", torch.float32)
    load_checkpoint(pvt, {"model": sd})
    pos = pvt.stages[0].blocks[0].pos.pos_embed
    assert pos.shape == (1, 32, 80, 80)
    assert torch.allclose(pos[..., 0, 0], sd["stages.0.0.pos_embed"][..., 0, 0])  # corners kept


# -- failures: clear errors, weights untouched -------------------------------------------------------


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bad_files_fail_clearly_and_leave_weights(official_file: Path, tmp_path: Path) -> None:
    model = _micro()
    before = _snapshot(model)
    good = official_file.read_bytes()
    cases = {}
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    cases["truncated.pth"] = "truncated or corrupt"
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    cases["random.pth"] = "not a readable PyTorch checkpoint"
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    cases["random.safetensors"] = "not a valid safetensors file"
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": torch.ones(1)}, "hook": _Payload(str(marker))}, tmp_path / "evil.pth")
    cases["evil.pth"] = r"refused by the safe loader: unpickling it would import posix\.system"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"hook": _Payload(str(marker))}, f)
    cases["evil.pkl"] = "refused by the safe loader"
    for file, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(model, tmp_path / file)
        assert _unchanged(model, before), file
    assert not marker.exists(), "a pickle payload was executed"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pth")


def test_other_architecture_or_scale_is_named() -> None:
    model = _micro("unified_halo_tiny")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="looks like unified_halo_micro, not unified_halo_tiny") as err:
        load_checkpoint(model, {"model": paper_state_dict("unified_halo_micro", torch.float32)})
    assert "Shape mismatches" in str(err.value)
    assert _unchanged(model, before)
    with pytest.raises(CheckpointError, match="looks like unified_swin_tiny") as err:
        load_checkpoint(model, {"model": paper_state_dict("unified_swin_tiny", torch.float32)})
    message = str(err.value)
    assert "Missing from the checkpoint" in message and "(x" in message  # grouped, not a wall of names
    assert len(message) < 2000
    assert _unchanged(model, before)
