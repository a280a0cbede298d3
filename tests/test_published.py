"""The published architectures (DWNet, STViT): official outputs, official checkpoints, the timm surface."""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenmixers
import tokenmixers_cli
from tokenmixers import CheckpointError, load_checkpoint, load_pretrained
from tokenmixers.checkpoint import safe_torch_load

from .conftest import ROOT, SHARED, cli, randomised
from .reference import official_state_dict, relative_difference

REFERENCE = SHARED / "reference" / "related-systems"
PARITY = ["dwnet_tiny", "dwnet_dynamic_tiny", "dwnet_idynamic_tiny", "dwnet_base", "stvit_small", "stvit_base",
          "stvit_large"]
# learnable parameters of the official models (the reference JSONs; dynamic-B and I-dynamic-B from related-systems.md)
OFFICIAL_PARAMS = {
    "dwnet_tiny": 24_172_744, "dwnet_base": 74_347_112, "dwnet_dynamic_tiny": 51_131_752,
    "dwnet_dynamic_base": 161_597_928, "dwnet_idynamic_tiny": 26_244_280, "dwnet_idynamic_base": 80_253_608,
    "stvit_small": 25_495_624, "stvit_base": 51_691_288, "stvit_large": 94_971_096,
}
# the same architectures at a few percent of the size, for the surface tests (any config field overrides)
MICRO_DWNET = dict(depths=(1, 1, 2, 1), dims=(48, 96, 192, 384))
MICRO = {
    "dwnet_tiny": MICRO_DWNET, "dwnet_dynamic_tiny": MICRO_DWNET, "dwnet_idynamic_tiny": MICRO_DWNET,
    "stvit_base": dict(depths=(1, 2, 2, 1), dims=(32, 64, 128, 256), heads=(1, 2, 2, 4)),  # with layer scale
}


@lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    return json.loads((REFERENCE / "models" / f"{name}.json").read_text())


def official_checkpoint(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A released checkpoint's ``model`` entry: the recipe's weights plus the buffers the official model constructs."""
    ref = _reference(name)
    entries = ((e["key"], e["shape"]) for e in ref["entries"])
    state = official_state_dict(entries, dtype, salt=ref["salt"], scale_words=("gamma", "layer_scale"))
    for key in ref["non_learnable_state_dict_entries"]:  # STViT's frozen identity kernels, num_batches_tracked
        state[key] = torch.eye(9, dtype=dtype).view(9, 1, 3, 3) if key.endswith("fold.weights") else torch.tensor(0)
    return state


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: float64 depth-wise convs run one tiny kernel per channel, and on a shared CPU a second thread
    only adds synchronisation (STViT-S at 224: 2 s on one thread, 40 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the official outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARITY)
def test_official_parity(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    model = model.to_empty(device="cpu").double().eval()
    report = load_checkpoint(model, {"model": official_checkpoint(name)})
    assert report.source == name.split("_")[0] and not report.missing and not report.unexpected
    ref = np.load(REFERENCE / "models" / f"{name}.npz")
    x = torch.from_numpy(np.load(REFERENCE / "input_224.npy"))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.head.fc(pre)
    rel = max(relative_difference(logits, ref["logits"]), relative_difference(pre, ref["pre_logits"]))
    print(f"{name}: max relative difference float64 {rel:.2e}")
    assert rel <= 1e-11  # the reference README's tolerance: catches a wrong mixer in any block of S and B


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_param_count_equals_official(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_published_super_tokens_take_the_zero_padding_in() -> None:
    # the official STViT zero-pads the normalised map to whole cells before pooling: mask_padding=False must equal
    # the mixer on an explicitly zero-padded map, cropped; the default (masked) mixer must not
    published = randomised(tokenmixers.create_mixer("stvit", 32, num_heads=2, cell_size=4, mask_padding=False))
    masked = randomised(tokenmixers.create_mixer("stvit", 32, num_heads=2, cell_size=4))
    masked.load_state_dict(published.state_dict())
    x = torch.randn(1, 10, 7, 32, dtype=torch.float64)
    explicit = published(torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2)))[:, :10, :7]
    torch.testing.assert_close(published(x), explicit, rtol=1e-12, atol=1e-12)
    assert (masked(x) - explicit).abs().max() > 1e-3


def test_readme_model_table_matches_the_models() -> None:
    from tokenmixers.bench import count_macs

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in OFFICIAL_PARAMS and len(cells) == 5:  # the model table: name, params, MACs, paper MACs, top-1
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(OFFICIAL_PARAMS)
    for name, cells in rows.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        macs = count_macs(model)
        counted = [f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}", f"{macs['macs'] / 1e9:.2f}",
                   f"{macs['macs_paper'] / 1e9:.2f}", str(tokenmixers.zoo.reported_top1(name) or "–")]
        assert counted == cells, name


# -- the timm surface at any size -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MICRO))
def test_forward_backward_any_size_and_features(name: str) -> None:
    model = timm.create_model(name, num_classes=10, **MICRO[name])
    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    for size in [(32, 32), (65, 97), (50, 33)]:
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
        assert [f.shape[-2:] for f in feats] == [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **MICRO[name]).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    maps = features(torch.randn(1, 3, 96, 128))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [m.shape[-2:] for m in maps] == [(24, 32), (12, 16), (6, 8), (3, 4)]


@pytest.mark.parametrize("name", ["dwnet_dynamic_tiny", "stvit_base"])
def test_timm_model_surface(name: str) -> None:
    model = timm.create_model(name, **MICRO[name]).eval()
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert cfg["first_conv"] + ".weight" in model.state_dict() and cfg["classifier"] + ".weight" in model.state_dict()
    assert "top-1" in cfg["notes"][0] and cfg["paper_name"].startswith(("DWNet", "STViT"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, feats) and torch.equal(inter[-1], feats)
        assert torch.equal(model(x), model.forward_head(feats))
    model.set_grad_checkpointing(True)
    model.train()(x).sum().backward()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    assert "blocks" in model.group_matcher() and isinstance(model.no_weight_decay(), set)


def test_configs_and_listing(capsys: pytest.CaptureFixture) -> None:
    assert set(OFFICIAL_PARAMS) <= set(tokenmixers.list_models()) and timm.is_model("stvit_large")
    assert tokenmixers.model_cfg("dwnet_idynamic_tiny").mixer == "idyn_dwconv"
    built = timm.create_model("dwnet_tiny", drop_path_rate=0.1)
    assert built.cfg == tokenmixers.model_cfg("dwnet_tiny").replace(drop_path_rate=0.1)
    with pytest.raises(ValueError, match="group_channels"):
        tokenmixers.DWNetCfg(spatial="inhomogeneous")
    tokenmixers_cli.main(["list", "*_small"])
    lines = capsys.readouterr().out.splitlines()
    stvit = next(line for line in lines if line.startswith("stvit_small "))
    assert "family=stvit" in stvit and "mixer=stvit" in stvit and "dims=(64, 128, 320, 512)" in stvit
    tokenmixers_cli.main(["list", "dwnet_dynamic_*"])
    assert "mixer=dyn_dwconv" in capsys.readouterr().out


# -- official checkpoint files ----------------------------------------------------------------------------


def _stand_in_class(module: str, name: str, base: type = object) -> type:
    """A class importable until its modules are removed from ``sys.modules``: pickling finds it, loading cannot."""
    cls = type(name, (base,), {"__module__": module})
    for i, part in enumerate(module.split(".")):
        sys.modules[".".join(module.split(".")[: i + 1])] = types.ModuleType(part)
    setattr(sys.modules[module], name, cls)
    return cls


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Released-style checkpoints: DWNet's with a yacs config, STViT's with model_ema and argparse args."""
    folder = tmp_path_factory.mktemp("published")
    module = "tokenmixers_absent_yacs.config"  # a yacs stand-in that exists only while saving
    config = _stand_in_class(module, "CfgNode", dict)({"MODEL": {"TYPE": "dwnet"}})
    dwnet = official_checkpoint("dwnet_tiny", torch.float32)
    torch.save({"model": dwnet, "optimizer": {"state": {}}, "lr_scheduler": {"base_lr": 1e-3}, "max_accuracy": 81.2,
                "epoch": 299, "config": config}, folder / "dwnet_tiny_224.pth")
    del sys.modules[module], sys.modules[module.split(".")[0]]
    stvit = official_checkpoint("stvit_small", torch.float32)
    ema = {k: v if k.endswith("fold.weights") else v + 1 for k, v in stvit.items()}  # the fixed kernels stay fixed
    torch.save({"model": stvit, "model_ema": ema, "epoch": 299,
                "args": argparse.Namespace(model="stvit_small", drop_path=0.1)}, folder / "stvit-small-224.pth")
    return {"dwnet_tiny": folder / "dwnet_tiny_224.pth", "stvit_small": folder / "stvit-small-224.pth"}


def test_released_checkpoints_load_without_unpickling_objects(official_files: dict[str, Path]) -> None:
    raw = safe_torch_load(official_files["dwnet_tiny"])
    assert "tokenmixers_absent_yacs" not in sys.modules  # the config's class was never imported
    assert type(raw["config"]).__name__ == "CfgNode" and raw["config"].pickled_items == {"MODEL": {"TYPE": "dwnet"}}
    assert raw["max_accuracy"] == 81.2 and raw["lr_scheduler"] == {"base_lr": 1e-3}
    args = safe_torch_load(official_files["stvit_small"])["args"]
    assert not isinstance(args, argparse.Namespace) and args.pickled_state == {"model": "stvit_small", "drop_path": 0.1}

    model = timm.create_model("dwnet_tiny").eval()
    report = load_checkpoint(model, official_files["dwnet_tiny"])
    assert report.source == "dwnet" and report.entry == "model" and not report.missing
    official = official_checkpoint("dwnet_tiny", torch.float32)
    assert torch.equal(model.stages[1].blocks[0].mixer.spatial.dwconv.weight,
                       official["layers.1.blocks.0.attn2conv.conv.weight"])
    assert torch.equal(model.stages[3].norm.weight, official["norm.weight"])  # the final norm closes the last stage
    assert torch.equal(model.stages[2].downsample.reduction.weight, official["layers.1.downsample.reduction.weight"])

    ema = timm.create_model("stvit_small").eval()
    assert load_checkpoint(ema, official_files["stvit_small"], entry="ema").entry == "model_ema"
    stvit = official_checkpoint("stvit_small", torch.float32)
    assert torch.equal(ema.stem[3].norm.running_var, stvit["patch_embed.proj.11.running_var"] + 1)


def test_timm_file_path_and_convert(official_files: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    direct = timm.create_model("stvit_small").eval()
    load_checkpoint(direct, official_files["stvit_small"])
    via_timm = timm.create_model("stvit_small", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(official_files["stvit_small"]))).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(direct(x), via_timm(x))
    out = tmp_path / "converted"
    code, stdout, err = cli(capsys, "convert", str(official_files["stvit_small"]), str(out), "--model", "stvit_small")
    assert code == 0, err
    assert "stvit layout" in stdout
    assert torch.equal(load_pretrained(out).eval()(x), direct(x))


def test_classifier_and_input_channels_adapt(official_files: dict[str, Path], tmp_path: Path) -> None:
    official = official_checkpoint("stvit_small", torch.float32)
    ten = timm.create_model("stvit_small", num_classes=10)
    fresh = ten.head.fc.weight.clone()
    report = load_checkpoint(ten, official_files["stvit_small"])
    assert any("head.fc: checkpoint has 1000 classes, model 10" in a for a in report.adapted)
    assert torch.equal(ten.head.fc.weight, fresh)
    three = timm.create_model("stvit_small", num_classes=3)
    load_checkpoint(three, official_files["stvit_small"], label_map=[5, 3, 999])
    assert torch.equal(three.head.fc.weight, official["head.weight"][[5, 3, 999]])
    grey = timm.create_model("dwnet_tiny", in_chans=1)
    report = load_checkpoint(grey, official_files["dwnet_tiny"])
    assert any("stem.proj.weight: input channels 3 -> 1" in a for a in report.adapted)


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_official_checkpoints_fail_clearly() -> None:
    model = timm.create_model("dwnet_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = official_checkpoint("dwnet_tiny", torch.float32)

    missing = {k: v for k, v in good.items() if ".attn2conv.bn0." not in k}
    with pytest.raises(CheckpointError, match=r"Missing from the checkpoint: 48 entries: stages\.\*\.blocks\.\*\.mixer"
                                              r"\.in_norm\.weight \(x12\)") as err:
        load_checkpoint(model, {"model": missing})
    assert len(str(err.value)) < 1500

    wrong = {**good, "layers.2.blocks.3.attn2conv.conv.weight": torch.zeros(384, 1, 5, 5)}
    with pytest.raises(CheckpointError, match=r"Shape mismatches \(1\): stages\.2\.blocks\.3\.mixer\.spatial\.dwconv"
                                              r"\.weight: checkpoint \(384, 1, 5, 5\) vs model \(384, 1, 7, 7\)"):
        load_checkpoint(model, {"model": wrong})

    inhomogeneous = official_checkpoint("dwnet_idynamic_tiny", torch.float32)
    with pytest.raises(CheckpointError, match="looks like dwnet_idynamic_tiny, not dwnet_tiny") as err:
        load_checkpoint(model, {"model": inhomogeneous})
    assert "Missing from the checkpoint" in str(err.value) and "Not in the model" in str(err.value)
    assert _unchanged(model, before)

    stvit = timm.create_model("stvit_small")
    with pytest.raises(CheckpointError, match="looks like dwnet_tiny, not stvit_small"):
        load_checkpoint(stvit, {"model": good})
    trained = {**official_checkpoint("stvit_small", torch.float32)}
    trained["layers.0.blocks.1.attn.fold.weights"] = trained["layers.0.blocks.1.attn.fold.weights"] * 2
    with pytest.raises(CheckpointError, match=r"attn\.fold\.weights should be the fixed 3x3 identity kernel"):
        load_checkpoint(stvit, {"model": trained})


# -- MACs and top-1 in bench; timm's Twins through every tool ---------------------------------------------


def test_bench_counts_params_macs_and_reported_top1() -> None:
    from tokenmixers.bench import benchmark, resolve_models

    assert resolve_models(["dwnet_dyn*", "twins_svt_s*"]) == ["dwnet_dynamic_tiny", "dwnet_dynamic_base", "twins_svt_small"]
    rows = {r["model"]: r for r in benchmark(["dwnet_tiny", "stvit_small", "twins_svt_small", "twins_pcpvt_small"],
                                             speed=False)}
    # MACs of every conv, linear and matrix product as measured on the official code (related-systems.md),
    # with timm's fused attention counted. The official STViT gathers the 3x3 neighbours of the super tokens with
    # fixed identity convolutions, 81 * 49 * (3C + 1) MACs per super-token block, which we gather by indexing.
    identity_convs = 81 * 49 * ((3 * 64 + 1) * 3 + (3 * 128 + 1) * 5) / 1e9
    expected = {"dwnet_tiny": (24.172744, 3.727, 81.2), "stvit_small": (25.495624, 4.350 - identity_convs, 83.6),
                "twins_svt_small": (24.060776, 2.927, 81.7), "twins_pcpvt_small": (24.106216, 3.809, 81.2)}
    for name, (params_m, macs_g, top1) in expected.items():
        assert rows[name]["params_m"] == pytest.approx(params_m, abs=1e-6)
        assert rows[name]["macs_g"] == pytest.approx(macs_g, abs=6e-4), name
        assert rows[name]["top1_reported"] == top1


def test_twins_features_erf_and_invariance(tmp_path: Path) -> None:
    from tokenmixers.analysis import load_images, load_model
    from tokenmixers.analysis.erf import run_erf
    from tokenmixers.analysis.invariance import Views, invariance

    features = timm.create_model("twins_svt_small", features_only=True).eval()
    maps = features(torch.randn(1, 3, 64, 96))
    assert [m.shape for m in maps] == [(1, c, 64 // s, 96 // s) for c, s in zip((64, 128, 256, 512), (4, 8, 16, 32))]
    erf = run_erf(["twins_svt_small"], "digits", limit=2, input_size=64, batch_size=2, out=tmp_path / "erf")
    assert sorted(erf["twins_svt_small"]["stages"]) == [0, 1, 2, 3]
    model, weights = load_model("twins_pcpvt_small")  # what `tokenmixers invariance twins_pcpvt_small` runs
    records = invariance(model.eval(), load_images("digits", limit=2), "translation", settings=[0, 16],
                         views=Views(input_size=64), progress=False)
    assert weights == "random weights" and [r["strength"] for r in records] == [0, 16]
    assert records[0]["consistency"] == 100.0


def _tiny_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """Class folders of random 32x32 images: ``root/<split>/<class>/*.png``."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


def test_compare_published_twins_and_unified(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _tiny_image_folder(tmp_path / "data", {"train": 8, "val": 2})
    models = ["dwnet_tiny", "twins_svt_small"]  # a published architecture of ours and timm's
    code, _, err = cli(capsys, "compare", *models, "--output", str(tmp_path / "out"), "--bench-size", "64",
                       "--bench-batch", "2", "--set", f"data={data}", "epochs=1", "max_steps_per_epoch=2",
                       "batch_size=8", "ema=false", "opt=sgd", "workers=0", "threads=1")
    assert code == 0, err[-2000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert set(rows) == set(models)
    assert rows["dwnet_tiny"]["mixer"] == "dwconv" and rows["twins_svt_small"]["mixer"] == "Twins"
    assert all(r["top1"] is not None and r["macs_g"] > 0 and r["throughput"] > 0 for r in rows.values())
    assert "| dwnet_tiny | dwconv | 24.17 |" in (tmp_path / "out" / "report.md").read_text()
