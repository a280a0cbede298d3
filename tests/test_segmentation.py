"""Segmentation: parity with mmsegmentation's own heads, checkpoints, metrics, training on real masks, the CLI."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmixers import CheckpointError, load_checkpoint
from tokenmixers.segmentation import create_segmentor
from tokenmixers.segmentation.evaluate import intersect_and_union, summarize

from .reference import official_state_dict, paper_detection_state_dict, relative_difference

DATA = Path(__file__).parent / "data" / "segmentation"
HEADS = {"upernet": "upernet", "fpn": "semantic_fpn"}
REFERENCES = sorted({re.sub(r"_\d+x\d+$", "", p.stem) for p in DATA.glob("*_*x*.npz")})
# 150x214 (not a multiple of 32) where the backbone pads or reduces in its own way, and once for the FPN head's
# chain of 2x steps; elsewhere it repeats what 160x224 checks (each float64 UperNet pass takes seconds)
# (Halo's and Swin's padded windows at odd sizes are checked by the detection parity tests too; they pass here)
ODD_SIZE = {"unified_pvt_micro_upernet", "dwnet_tiny_upernet", "unified_convnext_micro_fpn"}


@lru_cache(maxsize=1)
def _image() -> torch.Tensor:
    return torch.from_numpy(np.load(Path(__file__).parent / "data" / "stm_eval_det" / "input_160x224.npy"))


def _mmseg_state_dict(reference: dict) -> dict[str, torch.Tensor]:
    """The reference's weights in mmseg's layout: the backbone's by its official keys, the heads' by their own."""
    if "backbone_entries" in reference:  # DWNet / STViT: the related systems' recipe (layer scales drawn as gamma)
        backbone = official_state_dict(reference["backbone_entries"], scale_words=("gamma", "layer_scale"))
        state = {f"backbone.{k}": v for k, v in backbone.items()}
    else:
        state = paper_detection_state_dict(reference["model"])
    state.update(official_state_dict(reference["entries"]))
    for key in reference["constructed"]:  # STViT's fixed identity kernels, the BN step counters
        state[key] = torch.eye(9, dtype=torch.float64).view(9, 1, 3, 3) if key.endswith("fold.weights") else torch.tensor(0)
    return state


def _reference(name: str) -> dict:
    reference = json.loads((DATA / f"{name}.json").read_text())
    for key in ("entries", "constructed", "backbone_entries"):  # stored as Python literals in some files
        if isinstance(reference.get(key), str):
            reference[key] = json.loads(reference[key].replace("'", '"'))
    return reference


@pytest.mark.parametrize("name", REFERENCES)
def test_mmseg_parity(name: str) -> None:
    """UperNet + FCN auxiliary head and Semantic FPN on the official detection backbones give mmseg's float64 outputs."""
    reference = _reference(name)
    head = HEADS[reference["segmentor"]]
    with torch.device("meta"):
        model = create_segmentor(reference["model"], reference["num_classes"], head)
    model = model.to_empty(device="cpu").double().eval()
    report = load_checkpoint(model, {"meta": {"CLASSES": list("abcde")}, "state_dict": _mmseg_state_dict(reference)})
    assert report.source == "mmseg" and not report.missing and not report.unexpected
    frozen = sum(9 * 9 for k in reference["constructed"] if k.endswith("fold.weights"))  # official: frozen parameters
    assert sum(p.numel() for p in model.parameters()) + frozen == reference["parameters"]
    for size in [s for s in reference["inputs"] if s == "160x224" or name in ODD_SIZE]:
        expected = np.load(DATA / f"{name}_{size}.npz")
        h, w = (int(s) for s in size.split("x"))
        image = _image()[..., :h, :w]
        seen: dict[str, torch.Tensor] = {}
        hook = model.decode_head.register_forward_hook(lambda m, i, out, seen=seen: seen.update(decoded=out, maps=i[0]))
        with torch.no_grad():
            logits = model(image)  # one pass; the hook keeps the decode head's input and output
        hook.remove()
        decoded, maps = seen["decoded"], seen["maps"]
        assert tuple(logits.shape) == (1, reference["num_classes"], h, w)
        assert relative_difference(decoded[..., ::2, ::2], expected["decode_out"]) < 1e-10
        assert relative_difference(logits[..., ::4, ::4], expected["logits_sub"]) < 1e-10
        assert relative_difference(logits.mean((2, 3)), expected["logits_mean"]) < 1e-10
        assert np.array_equal(logits.argmax(1).numpy(), expected["argmax"])
        if "aux_out" in expected:
            with torch.no_grad():
                aux = model.auxiliary_head(maps)
            assert relative_difference(aux, expected["aux_out"]) < 1e-10


def test_heads_keep_mmseg_names_and_widths() -> None:
    """The parts and key names of mmseg's released configs; the auxiliary head reads the third map."""
    with torch.device("meta"):
        upernet = create_segmentor("unified_swin_tiny", 150)
        fpn = create_segmentor("unified_pvt_tiny", 150, head="semantic_fpn")
    keys = set(upernet.state_dict())
    assert {"decode_head.psp_modules.3.1.conv.weight", "decode_head.bottleneck.bn.running_var",
            "decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.bn.weight",
            "decode_head.fpn_bottleneck.conv.weight", "decode_head.conv_seg.bias",
            "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"} <= keys
    assert upernet.decode_head.conv_seg.weight.shape == (150, 512, 1, 1)
    assert upernet.auxiliary_head.convs[0].conv.weight.shape == (256, 384, 3, 3)  # Swin-T's third map: 384 wide
    assert fpn.auxiliary_head is None and fpn.neck.lateral_convs[0].conv.bias is not None
    assert fpn.decode_head.conv_seg.weight.shape == (150, 128, 1, 1)
    assert [len(h) for h in fpn.decode_head.scale_heads] == [1, 2, 4, 6]  # conv (+ 2x up) steps to stride 4
    with pytest.raises(ValueError, match="unknown head 'pspnet'; accepted: upernet, semantic_fpn"):
        create_segmentor("unified_swin_tiny", 150, head="pspnet")


@pytest.mark.parametrize("backbone", ["dwnet_tiny", "stvit_small", "resnet18"])
def test_any_backbone_any_size(backbone: str) -> None:
    """Published architectures and timm models under both heads: logits at any input size, losses in training."""
    torch.manual_seed(0)
    model = create_segmentor(backbone, 3, channels=32, aux_channels=16)
    images, labels = torch.randn(2, 3, 100, 132), torch.randint(0, 3, (2, 100, 132))
    labels[:, :10] = 255
    losses = model(images, labels)
    assert set(losses) == {"loss_ce", "aux_loss_ce"} and all(v.isfinite() for v in losses.values())
    sum(losses.values()).backward()
    assert model.decode_head.conv_seg.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(images[:1]).shape == (1, 3, 100, 132)


def test_a_users_mixer_as_segmentation_backbone() -> None:
    """A mixer registered at run time, as a family, is a segmentation backbone like the built-in ones."""
    import tokenmixers
    from tokenmixers import TokenMixer, register_mixer

    @register_mixer("seg_test_shift")
    class Shift(TokenMixer):
        """Half the channels rolled one pixel down, mixed by a linear layer."""

        def __init__(self, dim: int, num_heads: int = 1, block_index: int = 0) -> None:
            super().__init__(dim, num_heads, block_index)
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            half = x.shape[-1] // 2
            return self.proj(torch.cat([x[..., :half].roll(1, dims=1), x[..., half:]], dim=-1))

    tokenmixers.register_family("seg_test_shift", "seg_test_shift")
    model = create_segmentor("unified_seg_test_shift_micro", 4, head="semantic_fpn").eval()
    assert model.backbone.out_channels == [32, 64, 128, 256]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 90, 118)).shape == (1, 4, 90, 118)


@pytest.mark.parametrize("head", ["upernet", "semantic_fpn"])
def test_own_checkpoints_rebuild_the_segmentor(tmp_path: Path, head: str) -> None:
    """A saved segmentor (either head) is rebuilt from its file: head, widths, classes and weights."""
    from tokenmixers.segmentation.segmentor import load_segmentor
    from tokenmixers.segmentation.task import param_groups

    model = create_segmentor("unified_pvt_micro", 3, head, channels=32, aux_channels=16)
    model.config["classes"] = ["sky", "road", "car"]
    torch.save({"model": model.state_dict(), "segmentor": model.config}, tmp_path / "seg.pth")
    rebuilt, report = load_segmentor(tmp_path / "seg.pth")
    assert report.source == "tokenmixers" and rebuilt.config["head"] == head and rebuilt.config["classes"][2] == "car"
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())
    decay, no_decay = param_groups(rebuilt, 0.01, ("norm",))  # the position embeddings: the backbone's own list
    names = {id(p): n for n, p in rebuilt.named_parameters()}
    assert "backbone.stages.0.blocks.0.pos.pos_embed" in {names[id(p)] for p in no_decay["params"]}


def test_backbone_weights_load_with_fresh_heads(tmp_path: Path) -> None:
    """A classification checkpoint fills the backbone (out norms and heads fresh); a wrong one is refused whole."""
    import timm

    from tokenmixers import save_pretrained

    classifier = timm.create_model("unified_convnext_micro", num_classes=10)
    save_pretrained(classifier, tmp_path / "classifier")
    model = create_segmentor("unified_convnext_micro", 4, channels=16, aux_channels=16)
    report = load_checkpoint(model, tmp_path / "classifier")
    assert "heads freshly initialised" in str(report)
    assert torch.equal(model.backbone.stem.conv1.weight, classifier.stem.conv1.weight)
    twins = timm.create_model("twins_svt_small", num_classes=7)
    torch.save(twins.state_dict(), tmp_path / "twins.pth")
    report = load_checkpoint(create_segmentor("twins_svt_small", 4, head="semantic_fpn", channels=16, neck_channels=16),
                             tmp_path / "twins.pth")
    assert "head" in str(report) and "heads freshly initialised" in str(report)
    other = create_segmentor("unified_swin_micro", 4, channels=16, aux_channels=16)
    before = other.backbone.stem.conv1.weight.clone()
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(other, tmp_path / "classifier")
    assert torch.equal(other.backbone.stem.conv1.weight, before)


def test_metrics_as_mmseg() -> None:
    """Areas accumulated over the set, ignored pixels out, classes absent from both left out: mmseg's numbers."""
    ref = np.load(DATA / "metrics.npz")
    num_classes = len(ref["plain_IoU"])
    for tag, label_key in (("plain", "gt"), ("reduce", "gt_reduce")):
        areas = torch.zeros(4, num_classes, dtype=torch.float64)
        for i in range(3):
            label = torch.from_numpy(ref[f"{label_key}_{i}"]).long()
            if tag == "reduce":  # ADE20K's reduce_zero_label, done by the dataset here: 0 -> ignored, k -> k - 1
                label = torch.where(label == 0, 255, label - 1).masked_fill(label == 255, 255)
            areas += intersect_and_union(torch.from_numpy(ref[f"pred_{i}"]).long(), label, num_classes)
        for row, key in enumerate(("intersect", "union", "pred", "label")):
            assert torch.equal(areas[row], torch.from_numpy(ref[f"{tag}_area_{key}"])), (tag, key)
        result = summarize(areas)
        assert np.isnan(ref[f"{tag}_IoU"]).any()  # the set has a class in neither ground truth nor prediction
        assert [v["IoU"] is None for v in result["classes"].values()] == np.isnan(ref[f"{tag}_IoU"]).tolist()
        for key in ("aAcc", "mIoU", "mAcc"):
            assert result[key] == pytest.approx(100 * float(ref[f"{tag}_{key}"]), abs=0.005)


NUCLEI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-nuclei"
QUICK = {"workers": 0}


def test_training_on_real_nuclei_masks_then_eval_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A micro UperNet learns the nuclei from chance; the CLI evaluates its checkpoint and draws a prediction."""
    from tokenmixers.segmentation.data import SegmentationDataset
    from tokenmixers.segmentation.evaluate import evaluate_checkpoint
    from tokenmixers.segmentation.task import train

    from .conftest import cli

    labels = [SegmentationDataset(NUCLEI, "train", train=False)[i][1] for i in range(3)]
    nucleus_share = float(sum((y == 1).sum() for y in labels) / sum(y.numel() for y in labels))
    # the smoke recipe shortened to 60 iterations without warm-up (its 90 reach a nucleus IoU of 80 %)
    summary = train("smoke", {**QUICK, "data": str(NUCLEI), "output": str(tmp_path / "run"), "iters": 60,
                              "eval_interval": 60, "warmup_iters": 0})
    assert summary["classes"]["nucleus"]["IoU"] is not None and summary["mIoU"] > 0
    on_train = evaluate_checkpoint(str(tmp_path / "run" / "last.pth"), str(NUCLEI), split="train", workers=0)
    # predicting "nucleus" everywhere scores the nuclei's share of the pixels; the trained model far more
    assert on_train["classes"]["nucleus"]["IoU"] > max(50.0, 2 * 100 * nucleus_share), (on_train, nucleus_share)
    assert on_train["scale"] == [512, 256] and on_train["images"] == 3

    code, out, err = cli(capsys, "segment", "eval", "--checkpoint", str(tmp_path / "run" / "best.pth"),
                         "--data", str(NUCLEI), "--workers", "0", "--out", str(tmp_path / "eval.json"))
    assert code == 0, err
    assert "nucleus" in out and "mIoU" in out and json.loads((tmp_path / "eval.json").read_text())["images"] == 1
    image = NUCLEI / "images" / "nuclei_256_256.png"
    code, out, err = cli(capsys, "segment", "predict", str(image), "--checkpoint", str(tmp_path / "run" / "last.pth"),
                         "--out", str(tmp_path / "drawn"))
    assert code == 0, err
    from PIL import Image

    drawn = Image.open(tmp_path / "drawn" / "nuclei_256_256_segmentation.png")
    assert drawn.size == (256, 256) and "nucleus" in out
    other = tmp_path / "other"  # the same number of classes under other names is other data
    (other / "annotations" / "val").mkdir(parents=True)
    (other / "classes.txt").write_text("sky\nground\n")
    (other / "images" / "val").mkdir(parents=True)
    Image.open(image).save(other / "images" / "val" / "a.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(other / "annotations" / "val" / "a.png")
    code, _, err = cli(capsys, "segment", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data", str(other))
    assert code != 0 and "background, nucleus" in err and "sky, ground" in err


def test_segmentation_runs_refuse_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Clear errors before training: missing data, a batch UperNet cannot normalise, a schedule that does not divide."""
    from .conftest import cli

    code, _, err = cli(capsys, "segment", "train", "--recipe", "smoke", "--data", str(tmp_path / "nowhere"))
    assert code != 0 and "nowhere" in err and "Traceback" not in err
    code, _, err = cli(capsys, "segment", "train", "--recipe", "smoke", "--data", str(NUCLEI), "batch_size=1",
                       "--output", str(tmp_path / "b"))
    assert code != 0 and "batch_size=2" in err
    code, _, err = cli(capsys, "segment", "train", "--recipe", "smoke", "--data", str(NUCLEI), "iters=50",
                       "--output", str(tmp_path / "c"))
    assert code != 0 and "multiple of eval_interval" in err
    code, _, err = cli(capsys, "segment", "eval", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(NUCLEI))
    assert code != 0 and "none.pth" in err


def test_recipes_schedule_and_weight_decay() -> None:
    """mmseg's recipes: UperNet 160k (Swin setting), Semantic FPN 80k (PVT setting), mmcv's poly schedule."""
    from tokenmixers.runs import StepSchedule
    from tokenmixers.segmentation.task import Segmentation, param_groups

    upernet, fpn = Segmentation.load_settings("upernet_160k"), Segmentation.load_settings("semantic_fpn_80k")
    assert (upernet.lr, upernet.lr_batch, upernet.weight_decay, upernet.iters) == (6e-5, 16, 0.01, 160000)
    assert (upernet.epochs, upernet.max_steps_per_epoch) == (10, 16000)  # one engine epoch per evaluation interval
    assert (fpn.head, fpn.lr, fpn.lr_batch, fpn.weight_decay, fpn.poly_power, fpn.no_decay_keys) == \
        ("semantic_fpn", 1e-4, 32, 1e-4, 0.9, ())
    # linear warm-up from 1e-6 x lr over 1500 steps (on the poly lr), then (1 - step / 160k)^1 down to 0
    schedule = StepSchedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), upernet, steps_per_epoch=16000)
    poly = 1 - 750 / 160000
    assert schedule.lr(0, 1.0) == pytest.approx(1e-6) and schedule.lr(750, 1.0) == pytest.approx(poly * (1 - 0.5 * (1 - 1e-6)))
    assert schedule.lr(80000, 1.0) == pytest.approx(0.5) and schedule.lr(160000, 1.0) == 0.0
    fpn_schedule = StepSchedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), fpn, steps_per_epoch=8000)
    assert fpn_schedule.lr(40000, 1e-4) == pytest.approx((1e-4 - 1e-6) * 0.5**0.9 + 1e-6)
    with torch.device("meta"):
        model = create_segmentor("unified_swin_micro", 150)
    decay, no_decay = param_groups(model, 0.01, upernet.no_decay_keys)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert all("norm" in n or "relative_position_bias_table" in n for n in exempt)
    assert "backbone.stages.0.blocks.0.mixer.relative_position_bias_table" in exempt
    assert "decode_head.bottleneck.bn.weight" in {names[id(p)] for p in decay["params"]}  # "bn" is not "norm"
    with pytest.raises(ValueError, match="multiple of eval_interval"):
        Segmentation.load_settings("upernet_160k", ["iters=1000", "eval_interval=300"])


def test_sliding_window_and_multi_scale_inference() -> None:
    """Sliding windows cover the image and average overlaps; the aug test averages scales and flips."""
    from tokenmixers.segmentation.evaluate import Predictor

    conv = torch.nn.Conv2d(3, 4, 1).double().eval()  # position-independent: windows must equal the whole image
    image = torch.randn(1, 3, 70, 90, dtype=torch.float64)
    whole = Predictor(conv, (90, 70))(image)
    slide = Predictor(conv, (90, 70), mode="slide", crop=(32, 48), stride=(21, 30))(image)
    torch.testing.assert_close(slide, whole)
    calls = []
    probe = Predictor(lambda x: calls.append(tuple(x.shape[2:])) or conv(x), (180, 140), ratios=(0.5, 1.0), flip=True)
    probs = probe(image)
    assert calls == [(70, 90), (70, 90), (140, 180), (140, 180)]
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 70, 90, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
        Predictor(conv, mode="tiles")
