"""Write the segmentation references in ``tests/data/segmentation/`` by running mmsegmentation 0.30.0 itself.

What it runs: mmseg's own ``EncoderDecoder`` with its own heads -- UPerNet (``UPerHead`` + ``FCNHead`` auxiliary,
as ``configs/_base_/models/upernet_swin.py`` / ``upernet_convnext.py`` set them) and Semantic FPN (``FPN`` neck +
``FPNHead``, as ``configs/_base_/models/fpn_r50.py``) -- on the official STM-Evaluation *detection* backbones
(``detection/mmdet_custom``) of the five micro paper models, on the official DWNet-T *segmentation* backbone
(Atten4Vis/DemystifyLocalViT) and on an STViT-S backbone (hhb072/STViT; inferred, STViT has no official
segmentation code), in float64 on the CPU, in eval mode. The head settings are read from the config files
shipped inside the mmseg wheel; only ``in_channels``, ``num_classes`` (5) and the norm (plain ``BN``, which computes
what ``SyncBN`` computes in eval) are overridden. Every tensor comes from the key-seeded recipe of
``tests/reference.py``; see ``tests/data/segmentation/README.md`` for what is stored and how to check against it.
It also writes ``metrics.npz``: mmseg's ``eval_metrics`` (mIoU, mDice) on a small fixed fixture.

Nothing here is imported by the package or the tests; mmcv/mmseg live in a scratch folder, never in the venv:

    .venv/bin/python tools/make_segmentation_reference.py \\
        [--mmlab ../scratch/mmlab] [--official ../scratch/official] \\
        [--mirror ../.mirror/OpenGVLab+STM-Evaluation/repo]

``--mmlab`` is installed (pip ``--target``) when missing; ``--official`` is made from the git mirror of
OpenGVLab/STM-Evaluation with ``../shared/tools/official_setup.py`` when missing; ``--dwnet-mirror`` and
``--stvit-mirror`` are git mirrors (the ``fetch`` tool brings them; DWNet-T / STViT-S are skipped without them).
All files take about 3 minutes on 2 CPU threads.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DET_REF = SHARED / "reference" / "official-stm-eval-det"
RELATED_REF = SHARED / "reference" / "related-systems"
OUT = REPO / "tests" / "data" / "segmentation"
SCRATCH = REPO.parent / "scratch"    # installs and extracted upstream code, outside the repository
MIRRORS = REPO.parent / ".mirror"    # git mirrors as the fetch step leaves them: <owner>+<name>/repo


def common_arguments(parser: argparse.ArgumentParser, installs: str) -> None:
    """The scratch folders and the STM-Evaluation mirror both reference makers take."""
    parser.add_argument("--mmlab", type=Path, default=SCRATCH / "mmlab", help=f"pip --target folder of {installs}")
    parser.add_argument("--official", type=Path, default=SCRATCH / "official", help="official_setup.py output")
    parser.add_argument("--mirror", type=Path, default=MIRRORS / "OpenGVLab+STM-Evaluation" / "repo")
sys.path.insert(0, str(REPO))
from tests.reference import official_state_dict  # noqa: E402  (the project's recipe, run, not copied)

NUM_CLASSES = 5
BN = {"type": "BN", "requires_grad": True}
MMSEG, MMCV = "0.30.0", "1.7.2"
# the pure-Python imports of mmcv/mmseg, at the versions these references were made with
HELPERS = ["addict==2.4.0", "yapf==0.43.0", "terminaltables==3.1.10", "six==1.17.0",
           "opencv-python-headless==5.1.0.95", "platformdirs==4.14.9", "tomli==2.5.0"]
# paper model -> the official detection backbone class (its `type` in the official Mask R-CNN config)
PAPER_MODELS = {
    "unified_halo_micro": "UnifiedHalonet",
    "unified_pvt_micro": "UnifiedPVT",
    "unified_swin_micro": "UnifiedSwinTransformer",
    "unified_convnext_micro": "UnifiedConvNeXt",
    "unified_dcn_v3_micro": "UnifiedDCNv3",
}
# the second input, not a multiple of 32; the official DCNv3 backbone cannot run it (see README)
CROP = (150, 214)
NO_CROP = {"unified_dcn_v3_micro"}
# DWNet-T as its official UPerNet config builds it (DemystifyLocalViT, downstreams/segmentation/configs/dwnet/
# upernet_dwnet_tiny_patch4_window7_512x512_160k_ade20k.py over _base_/models/upernet_dwnet.py)
DWNET_TINY = dict(type="DWNet", embed_dim=96, depths=[2, 2, 6, 2], window_size=7, mlp_ratio=4.0, drop_rate=0.0,
                  drop_path_rate=0.3, ape=False, patch_norm=True, out_indices=[0, 1, 2, 3], use_checkpoint=False,
                  dynamic=False)
DWNET_FILES = {"mmseg": "downstreams/segmentation/mmseg/models/backbones/dwnet.py",
               "mmdet": "downstreams/detection/mmdet/models/backbones/dwnet.py"}
DWNET_FILE = DWNET_FILES["mmseg"]
# STViT-S: the kwargs the official factory `models.stvit.stvit_small(args)` passes (main.py defaults); STViT has no
# official segmentation code, so its backbone here is the *inferred* one of `register_stvit`
STVIT_SMALL = dict(type="STViTSegmentationBackbone", embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3],
                   num_heads=[1, 2, 5, 8], n_iter=[1, 1, 1, 1], stoken_size=[8, 4, 1, 1], projection=1024, mlp_ratio=4,
                   qkv_bias=True, qk_scale=None, drop_rate=0.0, drop_path_rate=0.1, use_checkpoint=False,
                   checkpoint_num=[0, 0, 0, 0], layerscale=[False, False, False, False], init_values=1e-5)
STVIT_FILE = "models/stvit.py"


@dataclass
class Spec:
    """One backbone: its mmseg ``backbone`` config, output widths, inputs and where its code comes from."""
    name: str
    backbone: dict
    widths: list[int]
    source: dict
    crop: bool = True
    det_json: Optional[str] = None  # the paper models' backbone entries are those of the detection reference
    checks: dict = field(default_factory=dict)


# ---------------------------------------------------------------- setting up the scratch copies

def install_mmlab(target: Path) -> None:
    """pip-install mmcv 1.7.2 (no compiled ops) and mmseg 0.30.0 into ``target`` (build tools beside it)."""
    pip = [sys.executable, "-m", "pip", "install"]
    build = target.with_name(target.name + "-build")
    steps = [
        (pip + ["--target", str(build), "setuptools<81", "wheel"], {}),  # mmcv's setup.py needs pkg_resources
        (pip + ["--target", str(target), "--no-deps", f"mmsegmentation=={MMSEG}"] + HELPERS, {}),
        (pip + ["--target", str(target), "--no-deps", "--no-build-isolation", f"mmcv=={MMCV}"],
         {"PYTHONPATH": str(build), "MMCV_WITH_OPS": "0"}),
    ]
    for cmd, env in steps:
        print("+", " ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, **env})


def ensure_official(official: Path, mirror: Path) -> None:
    """Make the CPU-runnable scratch copy of the official code from the git mirror when it is missing."""
    if (official / "detection" / "mmdet_custom").is_dir():
        return
    if not mirror.is_dir():
        sys.exit(f"{official} is missing and so is the mirror {mirror}: fetch github:OpenGVLab/STM-Evaluation first")
    official.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(SHARED / "tools" / "official_setup.py"), str(mirror), str(official)], check=True)


class _NoExt(types.ModuleType):
    """Stand-in for mmcv's compiled ``mmcv._ext``: every op raises (mmseg's heads use none of them)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"mmcv._ext.{name} is not built")
        return missing


def import_mmseg(mmlab: Path) -> types.ModuleType:
    sys.path.insert(0, str(mmlab))
    sys.modules["mmcv._ext"] = _NoExt("mmcv._ext")
    mmseg = importlib.import_module("mmseg")
    import mmcv
    assert (mmseg.__version__, mmcv.__version__) == (MMSEG, MMCV), (mmseg.__version__, mmcv.__version__)
    return mmseg


def register_official_backbones(official: Path) -> None:
    """Import the official detection backbones and register their classes in mmseg's BACKBONES."""
    sys.path[:0] = [str(official / "detection" / "stubs"), str(official / "detection"), str(official / "classification")]
    from mmdet_custom.models.backbones import blocks
    from mmseg.models.builder import BACKBONES
    for module in (blocks.halonet, blocks.pvt, blocks.swin, blocks.convnext, blocks.dcn_v3):
        for cls_name in PAPER_MODELS.values():
            if hasattr(module, cls_name):
                BACKBONES.register_module(module=getattr(module, cls_name), force=True)


def register_dwnet(mirror: Path, scratch: Path, library: str = "mmseg") -> str:
    """Import DWNet's official dense backbone for ``library`` (``DWNET_FILES``: mmseg's segmentation copy, or mmdet's
    detection copy, at the mirror's HEAD) and register it in that library's BACKBONES.

    The file is written to ``scratch`` with two import lines changed: its package-relative ``..builder`` becomes
    ``<library>.models.builder`` and ``mmcv_custom.load_checkpoint`` (used only to load ImageNet weights) is not
    imported. Returns the commit.
    """
    text = git_head(mirror, DWNET_FILES[library])
    for old, new in (("from mmcv_custom import load_checkpoint", "load_checkpoint = None  # not needed here"),
                     ("from ..builder import BACKBONES", f"from {library}.models.builder import BACKBONES")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"dwnet_{library}_official.py").write_text(text)
    sys.path.insert(0, str(scratch))
    importlib.import_module(f"dwnet_{library}_official")  # registers DWNet in the library's BACKBONES
    return git_head(mirror).strip()


def git_head(mirror: Path, path: Optional[str] = None) -> str:
    """A file at the mirror's HEAD, or (no path) the HEAD commit."""
    cmd = ["show", f"HEAD:{path}"] if path else ["rev-parse", "HEAD"]
    return subprocess.run(["git", "-C", str(mirror)] + cmd, check=True, capture_output=True, text=True).stdout


def register_stvit(mirror: Path, scratch: Path) -> str:
    """Register an STViT segmentation backbone (inferred: STViT has no official dense-prediction code).

    The official classification ``STViT`` (``STVIT_FILE`` at the mirror's HEAD, unmodified; its unused fvcore import
    gets a stand-in) without ``proj``/``norm``/``swish``/``avgpool``/``head``, returning each stage's block output
    *before* that stage's downsampling (strides 4/8/16/32, no output norm). Returns the commit.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "stvit_official.py").write_text(git_head(mirror, STVIT_FILE))
    fvcore, fvcore_nn = types.ModuleType("fvcore"), types.ModuleType("fvcore.nn")
    fvcore_nn.FlopCountAnalysis = fvcore_nn.flop_count_table = None  # used only by the file's test() helper
    fvcore.nn = fvcore_nn
    sys.modules.setdefault("fvcore", fvcore)
    sys.modules.setdefault("fvcore.nn", fvcore_nn)
    sys.path.insert(0, str(scratch))
    official = importlib.import_module("stvit_official")
    from mmseg.models.builder import BACKBONES

    class STViTSegmentationBackbone(official.STViT):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            del self.proj, self.norm, self.swish, self.avgpool, self.head

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = self.pos_drop(self.patch_embed(x))
            outs = []
            for layer in self.layers:
                for block in layer.blocks:
                    x = block(x)
                outs.append(x)
                if layer.downsample is not None:
                    x = layer.downsample(x)
            return tuple(outs)

    BACKBONES.register_module(module=STViTSegmentationBackbone, force=True)
    return git_head(mirror).strip()


# ---------------------------------------------------------------- the segmentors

def base_model_config(mmseg: types.ModuleType, name: str) -> dict:
    """``model`` of a config file shipped in the mmseg wheel (``configs/_base_/models/<name>.py``)."""
    import mmcv
    path = Path(mmseg.__file__).parent / ".mim" / "configs" / "_base_" / "models" / f"{name}.py"
    # upernet_convnext.py asks to import mmcls for its backbone, which is not used here
    return mmcv.Config.fromfile(str(path), import_custom_modules=False).model.to_dict()


def head_configs(mmseg: types.ModuleType) -> dict[str, dict]:
    """The released head/neck settings: UPerNet + FCN auxiliary (Swin = ConvNeXt configs) and Semantic FPN."""
    swin, convnext = base_model_config(mmseg, "upernet_swin"), base_model_config(mmseg, "upernet_convnext")
    for part in ("decode_head", "auxiliary_head"):  # the two released UPerNet configs agree but for the widths
        assert {**swin[part], "in_channels": None} == {**convnext[part], "in_channels": None}, part
    fpn = base_model_config(mmseg, "fpn_r50")
    return {
        "upernet": {k: swin[k] for k in ("decode_head", "auxiliary_head", "test_cfg")},
        "fpn": {k: fpn[k] for k in ("neck", "decode_head", "test_cfg")},
    }


def segmentor_config(released: dict, backbone: dict, widths: list[int]) -> dict:
    """The released heads with this backbone: in_channels from its widths, 5 classes, plain BN."""
    cfg = copy.deepcopy(released)
    if "neck" in cfg:
        cfg["neck"]["in_channels"] = list(widths)
    else:
        cfg["decode_head"]["in_channels"] = list(widths)
        cfg["auxiliary_head"]["in_channels"] = widths[cfg["auxiliary_head"]["in_index"]]
    for part in ("decode_head", "auxiliary_head"):
        if part in cfg:
            cfg[part].update(num_classes=NUM_CLASSES, norm_cfg=dict(BN))
    return {"type": "EncoderDecoder", "pretrained": None, "backbone": backbone, "train_cfg": {}, **cfg}


def det_reference(name: str) -> dict:
    return json.loads((DET_REF / "models" / f"{name}.json").read_text())


def recipe_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list, list, list]:
    """The whole segmentor's weights in mmseg's layout.

    ``backbone.<official key>``: seeded by the official key (no prefix), exactly as the detection reference and
    ``paper_detection_state_dict``; every other entry: seeded by its full mmseg key. ``num_batches_tracked``
    and frozen parameters keep their constructed values. Returns (state, backbone entries, head entries, constructed).
    """
    own = model.state_dict()
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}  # STViT's identity (un)fold kernels
    constructed = [k for k in own if k.endswith("num_batches_tracked") or k in frozen]
    drawn = [(k, list(v.shape)) for k, v in own.items() if k not in constructed]
    backbone = [(k[len("backbone."):], shape) for k, shape in drawn if k.startswith("backbone.")]
    heads = [(k, shape) for k, shape in drawn if not k.startswith("backbone.")]
    state = {f"backbone.{k}": v for k, v in official_state_dict(backbone).items()}
    state.update(official_state_dict(heads))
    state.update({k: own[k] for k in constructed})
    return state, backbone, heads, constructed


def build_segmentor(cfg: dict) -> tuple[torch.nn.Module, list, list, list]:
    from mmseg.models import build_segmentor as mmseg_build
    model = mmseg_build(copy.deepcopy(cfg)).double()  # float64 before loading: the recipe's values are float64
    state, backbone, heads, constructed = recipe_state(model)
    model.load_state_dict(state, strict=True)
    return model.eval(), backbone, heads, constructed


def check_backbone_entries(spec: Spec, backbone: list) -> None:
    """The backbone's entries are those of the shared references (paper models: detection; DWNet/STViT:
    classification without ``norm``/``head``/``proj``, plus DWNet's output norms ``norm0..3``)."""
    if spec.det_json:
        det = [(e["key"], e["shape"]) for e in det_reference(spec.name)["entries"]]
        assert sorted(det) == sorted(backbone), spec.name
        return
    cls = json.loads((RELATED_REF / "models" / f"{spec.name}.json").read_text())["entries"]
    dropped = ("norm.", "head.", "proj.")
    expected = {e["key"] for e in cls if not e["key"].startswith(dropped)}
    new = {k for k, _ in backbone} - expected
    assert expected <= {k for k, _ in backbone} and all(k.split(".")[0] in {f"norm{i}" for i in range(4)} for k in new)
    spec.checks["backbone_entries"] = (f"classification entries of ../shared/reference/related-systems/models/"
                                       f"{spec.name}.json without {', '.join(d + '*' for d in dropped)}"
                                       + (f" plus {sorted(new)}" if new else ""))


# ---------------------------------------------------------------- running and summarising

def backbone_check(feats: list[torch.Tensor], name: str) -> float:
    """Largest relative difference of the backbone outputs from the detection reference (160x224 only)."""
    ref, worst = np.load(DET_REF / "models" / f"{name}.npz"), 0.0
    for i, out in enumerate(feats):
        g = torch.Generator().manual_seed(zlib.crc32(f"proj{i}".encode()))
        proj = torch.einsum("kc,chw->khw", torch.randn(4, out.shape[1], generator=g, dtype=torch.float64), out[0])
        for ours, theirs in ((proj, ref[f"proj{i}"]), (out[0].mean((1, 2)), ref[f"mean{i}"])):
            worst = max(worst, float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max()))
    return worst


def run_segmentor(model: torch.nn.Module, img: torch.Tensor) -> dict[str, np.ndarray]:
    """mmseg's own calls: ``encode_decode`` (input-size logits), ``decode_head.forward`` and the auxiliary head."""
    h, w = img.shape[2:]
    metas = [dict(ori_shape=(h, w, 3), img_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False)]
    with torch.no_grad():
        logits = model.encode_decode(img, metas)
        backbone_feats = model.backbone(img)
        feats = model.extract_feat(img)  # = the backbone's outputs, or the FPN neck's
        decode = model.decode_head.forward(feats)
        aux = model.auxiliary_head.forward(feats) if model.with_auxiliary_head else None
    assert logits.dtype == torch.float64 and logits.shape == (1, NUM_CLASSES, h, w)
    top2 = logits.topk(2, dim=1).values
    out = {
        "decode_out": decode.numpy()[..., ::2, ::2],
        "decode_shape": np.array(decode.shape),
        "logits_mean": logits.mean((2, 3)).numpy(),
        "logits_sub": logits.numpy()[..., ::4, ::4],
        "argmax": logits.argmax(1).numpy().astype(np.uint8),
        "argmax_margin": (top2[:, 0] - top2[:, 1]).min().numpy(),  # how safe comparing the argmax is
        "input_shape": np.array(img.shape),
    }
    if aux is not None:
        out["aux_out"], out["aux_shape"] = aux.numpy(), np.array(aux.shape)
    if model.with_neck:
        out.update({f"neck_mean{i}": f[0].mean((1, 2)).numpy() for i, f in enumerate(feats)})
    out["_backbone"] = backbone_feats
    return out


def write_model(spec: Spec, kind: str, cfg: dict, inputs: dict[str, torch.Tensor], meta: dict) -> None:
    model, backbone, heads, constructed = build_segmentor(cfg)
    check_backbone_entries(spec, backbone)
    checks = dict(spec.checks)
    for tag, img in inputs.items():
        arrays = run_segmentor(model, img)
        feats = arrays.pop("_backbone")
        if spec.det_json and tag == "160x224":
            checks["backbone_vs_det_reference_160x224"] = backbone_check(feats, spec.name)
        np.savez_compressed(OUT / f"{spec.name}_{kind}_{tag}.npz", **arrays)
    record = {
        "model": spec.name, "segmentor": kind, "inputs": sorted(inputs), **meta, "backbone_source": spec.source,
        "checks": checks,
        "config": {k: v for k, v in cfg.items() if k != "backbone"},
        "backbone": {"type": cfg["backbone"]["type"], "kwargs": {k: v for k, v in cfg["backbone"].items() if k != "type"},
                     "entries": spec.det_json or "backbone_entries below",
                     "seed": "each backbone entry is 'backbone.' + key, seeded by the key without the prefix"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "entries": heads,
        "constructed": constructed,
    }
    if not spec.det_json:
        record["backbone_entries"] = backbone
    (OUT / f"{spec.name}_{kind}.json").write_text(dump_json(record))
    print(f"{spec.name} {kind}: {len(heads)} head entries, {record['parameters']:,} parameters, checks {checks}", flush=True)


def dump_json(record: dict) -> str:
    """Indented JSON with each ``[key, shape]`` entry on one line."""
    lists = {k: record[k] for k in ("entries", "constructed", "backbone_entries") if k in record}
    text = json.dumps({**record, **{k: f"@{k}@" for k in lists}}, indent=1)
    for k, items in lists.items():
        text = text.replace(f'"@{k}@"', "[\n  " + ",\n  ".join(json.dumps(e) for e in items) + "\n ]")
    return text + "\n"


# ---------------------------------------------------------------- metrics

def metric_fixture() -> dict[str, np.ndarray]:
    """3 small prediction / label pairs, 6 classes; class 3 is in no prediction and no label (IoU NaN), class 5
    is predicted but never labelled in 'gt' (Acc NaN, IoU 0); labels hold 255 (ignored); 'gt_reduce' are the
    same maps for ``reduce_zero_label=True`` (0 = ignored, k -> k-1)."""
    rng = np.random.default_rng(20240530)
    arrays = {}
    for i, (h, w) in enumerate([(7, 9), (6, 11), (8, 8)]):
        pred = rng.choice([0, 1, 2, 4, 5], size=(h, w)).astype(np.uint8)
        gt = rng.choice([0, 1, 2, 4], size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = 255
        agree = rng.random((h, w)) < 0.5  # make half the labelled pixels right
        gt[agree & (gt != 255) & (pred != 5)] = pred[agree & (gt != 255) & (pred != 5)]
        arrays[f"pred_{i}"], arrays[f"gt_{i}"] = pred, gt
        arrays[f"gt_reduce_{i}"] = np.where(gt == 255, 255, gt + 1).astype(np.uint8)
        arrays[f"gt_reduce_{i}"][rng.random((h, w)) < 0.1] = 0
    return arrays


def metric_reference() -> dict[str, np.ndarray]:
    from mmseg.core.evaluation import eval_metrics
    from mmseg.core.evaluation.metrics import total_intersect_and_union
    arrays = metric_fixture()
    preds = [arrays[f"pred_{i}"] for i in range(3)]
    for mode, reduce in (("plain", False), ("reduce", True)):
        gts = [arrays[f"gt_reduce_{i}" if reduce else f"gt_{i}"] for i in range(3)]
        # copies: with reduce_zero_label mmseg writes 255 into the caller's label arrays (torch.from_numpy shares them)
        got = eval_metrics(preds, [g.copy() for g in gts], 6, ignore_index=255, metrics=["mIoU", "mDice"],
                           reduce_zero_label=reduce)
        areas = total_intersect_and_union(preds, [g.copy() for g in gts], 6, 255, reduce_zero_label=reduce)
        for key, name in zip(areas, ("area_intersect", "area_union", "area_pred", "area_label")):
            arrays[f"{mode}_{name}"] = key.numpy()
        for key in ("aAcc", "IoU", "Acc", "Dice"):
            arrays[f"{mode}_{key}"] = np.asarray(got[key], dtype=np.float64)
        for key in ("IoU", "Acc", "Dice"):
            arrays[f"{mode}_m{key}"] = np.float64(np.nanmean(got[key]))
        # the summary mmseg's CustomDataset.evaluate prints: round(nanmean * 100, 2)
        arrays[f"{mode}_summary_percent"] = np.array([np.round(np.nanmean(got[k]) * 100, 2) for k in ("aAcc", "IoU", "Acc")])
    assert np.isnan(arrays["plain_IoU"][3]) and np.isnan(arrays["plain_Acc"][5]) and arrays["plain_IoU"][5] == 0
    return arrays


# ---------------------------------------------------------------- main

def paper_specs(names: list[str], official_commit: str) -> list[Spec]:
    specs = []
    for name in names:
        det = det_reference(name)
        source = {"repo": "OpenGVLab/STM-Evaluation", "commit": official_commit,
                  "code": f"detection/mmdet_custom/models/backbones (class {PAPER_MODELS[name]})"}
        specs.append(Spec(name, {"type": PAPER_MODELS[name], **det["config"]}, det["config"]["dims"], source,
                          crop=name not in NO_CROP,
                          det_json=f"../shared/reference/official-stm-eval-det/models/{name}.json"))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser, "mmcv/mmseg")
    parser.add_argument("--dwnet-mirror", type=Path, default=MIRRORS / "Atten4Vis+DemystifyLocalViT" / "repo",
                        help="git mirror of Atten4Vis/DemystifyLocalViT (DWNet-T is skipped when it is missing)")
    parser.add_argument("--stvit-mirror", type=Path, default=MIRRORS / "hhb072+STViT" / "repo",
                        help="git mirror of hhb072/STViT (STViT-S is skipped when it is missing)")
    parser.add_argument("--models", nargs="*", default=list(PAPER_MODELS) + ["dwnet_tiny", "stvit_small"])
    args = parser.parse_args()

    if not (args.mmlab / "mmseg").is_dir() or not (args.mmlab / "mmcv").is_dir():
        install_mmlab(args.mmlab)
    ensure_official(args.official, args.mirror)
    mmseg = import_mmseg(args.mmlab)
    register_official_backbones(args.official)
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)

    commit = git_head(args.mirror).strip()
    specs = paper_specs([m for m in args.models if m in PAPER_MODELS], commit)
    if "dwnet_tiny" in args.models:
        if args.dwnet_mirror.is_dir():
            dwnet_commit = register_dwnet(args.dwnet_mirror, args.mmlab.with_name(args.mmlab.name + "-dwnet"))
            source = {"repo": "Atten4Vis/DemystifyLocalViT", "commit": dwnet_commit, "code": DWNET_FILE}
            specs.append(Spec("dwnet_tiny", DWNET_TINY, [96, 192, 384, 768], source))
        else:
            print(f"skipping dwnet_tiny: no mirror at {args.dwnet_mirror} (fetch github:Atten4Vis/DemystifyLocalViT)")
    if "stvit_small" in args.models:
        if args.stvit_mirror.is_dir():
            stvit_commit = register_stvit(args.stvit_mirror, args.mmlab.with_name(args.mmlab.name + "-stvit"))
            source = {"repo": "hhb072/STViT", "commit": stvit_commit, "code": STVIT_FILE + " (classification STViT)",
                      "inferred": "no official segmentation backbone: the classification network without proj/norm/"
                                  "swish/avgpool/head, outputs = each stage's blocks before its downsampling"}
            specs.append(Spec("stvit_small", STVIT_SMALL, [64, 128, 320, 512], source))
        else:
            print(f"skipping stvit_small: no mirror at {args.stvit_mirror} (fetch github:hhb072/STViT)")

    meta = {"mmsegmentation": MMSEG, "mmcv": MMCV, "torch": torch.__version__, "num_classes": NUM_CLASSES}
    released = head_configs(mmseg)
    x = torch.from_numpy(np.load(DET_REF / "input.npy"))
    for spec in specs:
        inputs = {"160x224": x}
        if spec.crop:
            inputs["x".join(map(str, CROP))] = x[..., : CROP[0], : CROP[1]].contiguous()
        for kind in ("upernet", "fpn"):
            write_model(spec, kind, segmentor_config(released[kind], spec.backbone, spec.widths), inputs, meta)
    np.savez_compressed(OUT / "metrics.npz", **metric_reference())
    print("wrote", OUT)


if __name__ == "__main__":
    main()
