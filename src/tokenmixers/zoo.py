"""The model zoo as data: one family of configs per mixer at four scales, registered in timm.

A model is ``unified_<family>_<scale>``; its constructor arguments are the family's common
arguments updated with the scale's. ``register_family`` and ``register_variant`` add models at
run time, so a new mixer gets the whole zoo from one call.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .backbone import UnifiedNet

SCALES = ("micro", "tiny", "small", "base")

# The HaloNet / Swin skeleton of the paper (Table IV budgets); the default for new mixers.
DEFAULT_SCALES: dict[str, dict[str, Any]] = {
    "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "tiny": dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


@dataclass(frozen=True)
class Family:
    """A mixer's models at the four scales."""

    name: str
    mixer: str
    scales: dict[str, dict[str, Any]]
    common: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    paper_top1: dict[str, float] = field(default_factory=dict)
    recipe: str = "transformer"  # the training recipe of the paper for this family


FAMILIES: dict[str, Family] = {}
MODEL_ARGS: dict[str, dict[str, Any]] = {}  # model name -> UnifiedNet kwargs
MODEL_FAMILY: dict[str, str] = {}  # model name -> family name
default_cfgs: dict[str, Any] = {}  # read by timm's register_model


def _pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained config of a unified model (ImageNet-1k, 224, crop 0.875, bicubic)."""
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        min_input_size=(3, 32, 32),
        fixed_input_size=False,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.conv1",
        classifier="head.fc",
        license="apache-2.0",
        custom_load=True,  # weights files go through tokenmixers.load_checkpoint (conversion, checks)
        **kwargs,
    )


def _build(name: str, pretrained: bool = False, **kwargs: Any) -> UnifiedNet:
    """Build a registered model through timm (pretrained loading, ``features_only``)."""
    args = {**copy.deepcopy(MODEL_ARGS[name]), **kwargs}
    overlay = args.get("pretrained_cfg_overlay") or {}
    if overlay.get("file"):
        # route weight files through tokenmixers.load_checkpoint: conversion, the 'model' entry, clear errors
        args["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    return build_model_with_cfg(
        UnifiedNet,
        name,
        pretrained,
        pretrained_filter_fn=_filter_pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **args,
    )


def _filter_pretrained(state_dict: dict[str, torch.Tensor], model: UnifiedNet) -> dict[str, torch.Tensor]:
    """timm's local-dir / hub path: convert and adapt the weights like ``load_checkpoint`` does."""
    from .checkpoint import CheckpointError, adapt_state_dict
    from .converters import to_tokenmixers

    state_dict, _ = to_tokenmixers(state_dict)
    state_dict, _, mismatched = adapt_state_dict(state_dict, model)
    if mismatched:
        raise CheckpointError("pretrained weights do not fit the model: " + "; ".join(mismatched[:5]))
    return state_dict


def register_model_args(name: str, args: dict[str, Any], family: str = "", **cfg: Any) -> None:
    """Register ``name`` in timm (and ``tokenmixers.create_model``) with the given UnifiedNet args."""
    MODEL_ARGS[name] = args
    MODEL_FAMILY[name] = family
    default_cfgs.update(generate_default_cfgs({name: _pretrained_cfg(**cfg)}))

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> UnifiedNet:
        return _build(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: unified backbone with the {args['mixer']!r} mixer."
    register_model(entrypoint)


def register_family(
    name: str,
    mixer: str,
    scales: Optional[dict[str, dict[str, Any]]] = None,
    source: str = "",
    paper_top1: Optional[dict[str, float]] = None,
    recipe: str = "transformer",
    **common: Any,
) -> Family:
    """Register ``unified_<name>_<scale>`` for every scale (default: the Halo/Swin skeleton)."""
    scales = DEFAULT_SCALES if scales is None else scales
    family = Family(name, mixer, scales, common, source, paper_top1 or {}, recipe)
    FAMILIES[name] = family
    for scale, scale_args in scales.items():
        register_model_args(f"unified_{name}_{scale}", {"mixer": mixer, **common, **scale_args}, family=name)
    return family


def register_variant(name: str, base: str, **overrides: Any) -> None:
    """Register ``name`` as a copy of model ``base`` with some arguments changed (ablations)."""
    register_model_args(name, {**MODEL_ARGS[base], **overrides}, family=MODEL_FAMILY[base])


def default_recipe(model: str) -> str:
    """The paper's recipe for a model: ``cnn`` for DWConv/DCNv3 (batch 4096), else ``transformer``."""
    family = FAMILIES.get(MODEL_FAMILY.get(model, ""))
    return family.recipe if family else "transformer"


def list_models(pattern: str = "*") -> list[str]:
    """Registered unified model names matching a glob pattern, in zoo order."""
    return [n for n in MODEL_ARGS if fnmatch.fnmatch(n, pattern)]


def model_args(name: str) -> dict[str, Any]:
    """The UnifiedNet constructor arguments of a registered model."""
    try:
        return copy.deepcopy(MODEL_ARGS[name])
    except KeyError:
        raise KeyError(f"unknown model {name!r}; try tokenmixers.list_models() (e.g. {list_models()[:3]})") from None


def check_model_name(name: str) -> None:
    """``KeyError`` with close matches unless ``name`` is a tokenmixers or timm model."""
    import timm

    if name not in MODEL_ARGS and not timm.is_model(name):
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `tokenmixers list`"
        raise KeyError(f"unknown model {name!r}{hint}")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Create a registered model (same as ``timm.create_model``); clear ``KeyError`` for unknown names."""
    import timm

    check_model_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


# -- the 20 models of the paper (official depths, widths, heads and drop-path rates) -----------

_PAPER = "Hu et al., Demystify Transformers & Convolutions in Modern Image Deep Networks (TPAMI 2025)"

register_family(
    "halo",
    "halo",
    DEFAULT_SCALES,
    source="HaloNet (Vaswani et al., CVPR 2021), unified in " + _PAPER,
    paper_top1=dict(micro=75.8, tiny=83.0, small=84.0, base=84.6),
    norm_eps=1e-5,
)
register_family(
    "pvt",
    "sra",
    {
        "micro": dict(depths=(2, 2, 3, 2), dims=(32, 64, 160, 256), drop_path_rate=0.0),
        "tiny": dict(depths=(3, 4, 9, 3), dims=(64, 128, 320, 512), drop_path_rate=0.1),
        "small": dict(depths=(3, 4, 21, 3), dims=(64, 128, 320, 512), drop_path_rate=0.3),
        "base": dict(depths=(3, 8, 45, 3), dims=(64, 128, 320, 512), drop_path_rate=0.5, mlp_ratios=(4, 4, 4, 4)),
    },
    source="PVT (Wang et al., ICCV 2021), unified in " + _PAPER,
    paper_top1=dict(micro=72.8, tiny=82.1, small=83.2, base=83.4),
    heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    stage_mixer_args=({"sr_ratio": 8}, {"sr_ratio": 4}, {"sr_ratio": 2}, {"sr_ratio": 1}),
    pos_embed="absolute",
    norm_eps=1e-5,
)
register_family(
    "swin",
    "swin",
    DEFAULT_SCALES,
    source="Swin Transformer (Liu et al., ICCV 2021), unified in " + _PAPER,
    paper_top1=dict(micro=74.4, tiny=82.3, small=83.3, base=83.7),
    norm_eps=1e-6,
)
register_family(
    "convnext",
    "dwconv",
    {
        "micro": dict(depths=(3, 3, 8, 3), dims=(32, 64, 128, 256), drop_path_rate=0.0),
        "tiny": dict(depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), drop_path_rate=0.1),
        "small": dict(depths=(2, 2, 24, 2), dims=(96, 192, 384, 768), drop_path_rate=0.4),
        "base": dict(depths=(2, 2, 24, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
    },
    source="ConvNeXt (Liu et al., CVPR 2022) / DWNet 7x7 depth-wise conv, unified in " + _PAPER,
    paper_top1=dict(micro=75.1, tiny=82.2, small=83.1, base=83.7),
    recipe="cnn",
    norm_eps=1e-6,
)
register_family(
    "dcn_v3",
    "dcnv3",
    {
        "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), heads=(2, 4, 8, 16), drop_path_rate=0.0),
        "tiny": dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512), heads=(4, 8, 16, 32), drop_path_rate=0.1),
        "small": dict(depths=(4, 4, 21, 4), dims=(80, 160, 320, 640), heads=(5, 10, 20, 40), drop_path_rate=0.3),
        "base": dict(depths=(4, 4, 21, 4), dims=(112, 224, 448, 896), heads=(7, 14, 28, 56), drop_path_rate=0.5),
    },
    source="DCNv3 / InternImage (Wang et al., CVPR 2023), unified in " + _PAPER,
    paper_top1=dict(micro=75.3, tiny=83.3, small=84.1, base=84.5),
    recipe="cnn",
    norm_eps=1e-5,
)

# -- the related systems' mixers at the paper's budgets ----------------------------------------------
# Depths and widths were chosen so that every model lands within +-3% of the DWConv model's
# parameters (4.44M / 31.9M / 54.4M / 95.9M) and +-10% of its MACs at 224 (0.65 / 5.00 / 9.39 /
# 16.62 G, all products counted); `tokenmixers bench 'unified_*'` prints both, the tests assert them.

# DWNet's dynamic depth-wise conv. The kernel generator predicts C*49 values from C/r features; with
# DWNet's r = 4 it alone holds 12.5*C^2 parameters per block (DWNet-T doubles to 51M), so r = 16 here,
# and depth moves from stage 4 (most parameters, no extra MACs) to stages 1-2 to keep the MACs.
register_family(
    "dyn_dwconv",
    "dyn_dwconv",
    {  # params / MACs vs DWConv: -0.3% / -4.3%, -2.0% / +0.3%, +1.2% / -2.7%, +1.3% / -2.7%
        "micro": dict(depths=(4, 3, 7, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
        "tiny": dict(depths=(2, 4, 8, 1), dims=(96, 192, 384, 768), drop_path_rate=0.1),
        "small": dict(depths=(4, 4, 20, 1), dims=(96, 192, 384, 768), drop_path_rate=0.4),
        "base": dict(depths=(4, 4, 20, 1), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
    },
    source="DWNet dynamic depth-wise conv (Han et al., ICLR 2022), homogeneous",
    recipe="cnn",
    mixer_args={"reduction": 16},
    norm_eps=1e-6,
)
# DWNet's inhomogeneous dynamic depth-wise conv: per-pixel 7x7 kernels, one per group of 16 channels
# (DWNet uses 32 groups; 16-channel groups, as DCNv3's, fit the micro budget).
register_family(
    "idyn_dwconv",
    "idyn_dwconv",
    {  # +1.6% / -2.1%, +2.4% / +0.8%, -1.0% / -2.3%, -0.7% / -1.9%
        "micro": dict(depths=(3, 3, 7, 3), dims=(32, 64, 128, 256), heads=(2, 4, 8, 16), drop_path_rate=0.0),
        "tiny": dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), heads=(6, 12, 24, 48), drop_path_rate=0.1),
        "small": dict(depths=(2, 2, 21, 2), dims=(96, 192, 384, 768), heads=(6, 12, 24, 48), drop_path_rate=0.4),
        "base": dict(depths=(2, 2, 21, 2), dims=(128, 256, 512, 1024), heads=(8, 16, 32, 64), drop_path_rate=0.5),
    },
    source="DWNet inhomogeneous dynamic depth-wise conv (Han et al., ICLR 2022)",
    recipe="cnn",
    norm_eps=1e-6,
)
# Twins-SVT: LSA (7x7 windows) on even blocks, GSA (sr 8/4/2/1) on odd blocks, and the conditional
# position encoding after the first block of each stage; every stage has an even depth.
register_family(
    "twins",
    "twins",
    {  # +2.9% / +0.1%, -0.3% / -4.0%, -1.9% / -4.3%, -1.7% / -4.7%
        "micro": dict(depths=(2, 2, 8, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
        "tiny": dict(depths=(2, 4, 4, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
        "small": dict(depths=(4, 4, 14, 2), dims=(96, 192, 384, 768), drop_path_rate=0.3),
        "base": dict(depths=(4, 4, 14, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
    },
    source="Twins-SVT (Chu et al., NeurIPS 2021)",
    stage_mixer_args=({"sr_ratio": 8}, {"sr_ratio": 4}, {"sr_ratio": 2}, {"sr_ratio": 1}),
    pos_embed="conv",
    pos_embed_blocks=1,
    norm_eps=1e-6,
)
# STViT: super tokens of 8x8 / 4x4 cells in stages 1-2, global attention in stages 3-4, and the
# convolutional position encoding before every block.
register_family(
    "stvit",
    "stvit",
    {  # -1.1% / +8.3%, +0.7% / +0.3%, -1.7% / +1.6%, -1.5% / +0.3%
        "micro": dict(depths=(2, 2, 9, 2), dims=(32, 64, 128, 256), drop_path_rate=0.0),
        "tiny": dict(depths=(3, 3, 6, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
        "small": dict(depths=(3, 3, 18, 2), dims=(96, 192, 384, 768), drop_path_rate=0.3),
        "base": dict(depths=(3, 3, 18, 2), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
    },
    source="STViT super-token attention (Huang et al., CVPR 2023)",
    stage_mixer_args=({"cell_size": 8}, {"cell_size": 4}, {"cell_size": 1}, {"cell_size": 1}),
    pos_embed="conv",
    pos_embed_blocks="all",
    norm_eps=1e-6,
)

# -- the paper's ablations -------------------------------------------------------------------------------
# Table VII (local attention, small models): halo on every second block, a 1-pixel halo, and the query
# block moved to the top-left corner of its (unchanged) key window.
register_variant("unified_halo_small_switch", "unified_halo_small", mixer_args={"halo_every": 2})
register_variant("unified_halo_small_1px", "unified_halo_small", mixer_args={"halo_size": 1})
register_variant("unified_halo_small_shift", "unified_halo_small", mixer_args={"query_offset": 0})
# Table VI (architecture, small models): B = LayerNorm after pooling, C = B without stage norms,
# D = the ConvNeXt block (DWConv then without its 1x1 projections, as in ConvNeXt).
for _family in ("halo", "pvt", "swin", "convnext", "dcn_v3"):
    _base = f"unified_{_family}_small"
    register_variant(f"{_base}_b", _base, norm_after_pool=True)
    register_variant(f"{_base}_c", _base, norm_after_pool=True, stage_norms=False)
    _d = {"mixer_args": {**MODEL_ARGS[_base].get("mixer_args", {}), "projections": False}} if _family == "convnext" else {}
    register_variant(f"{_base}_d", _base, block_style="convnext", **_d)
