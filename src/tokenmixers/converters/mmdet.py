"""Converter for mmdetection 2.x Mask R-CNN, Cascade Mask R-CNN and RetinaNet checkpoints.

mmdet keeps ``backbone.*`` (in the layout of the backbone's own code: the official STM-Evaluation detection
backbones, DWNet, STViT; renamed by that layout's converter, as for mmseg), ``neck.*`` (FPN),
``rpn_head.*`` and ``roi_head.*``; tokenmixers' detector is torchvision's Mask R-CNN with the
backbone as ``backbone.body`` and the FPN as ``backbone.fpn``. Class-dependent layers differ in
layout: mmdet puts the background class *last* in ``fc_cls`` and has no background rows in
``fc_reg`` and ``conv_logits``; torchvision puts background *first* everywhere. The background
rows that mmdet does not have are zero (they are never used: torchvision drops class 0).

Cascade Mask R-CNN (``roi_head.bbox_head.<stage>.*``): the RoI heads keep mmdet's names and class layout
(:mod:`tokenmixers.detection.cascade`), so only ``roi_head.`` becomes ``roi_heads.``.

RetinaNet (``bbox_head.retina_cls`` present) maps onto :mod:`tokenmixers.detection.retinanet`: the FPN's
``fpn_convs.0-2`` are the output convs, ``fpn_convs.3``/``4`` the extra P6/P7 convs, the head's stacked convs
and ``retina_cls``/``retina_reg`` torchvision's RetinaNet head. Its class layer has no background and the same
(anchor-major, then class) channel layout in both libraries: nothing is reordered.
"""
from __future__ import annotations

import re

import torch

from . import mmseg, stm_eval

_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
    (r"^roi_head\.(bbox_head|mask_head)\.(\d+)\.", r"roi_heads.\1.\2."),  # the cascade's stages
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RENAMES)
_RETINANET_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.3\.conv\.", "backbone.fpn.extra_blocks.p6."),
    (r"^neck\.fpn_convs\.4\.conv\.", "backbone.fpn.extra_blocks.p7."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^bbox_head\.cls_convs\.(\d+)\.conv\.", r"head.classification_head.conv.\1.0."),
    (r"^bbox_head\.reg_convs\.(\d+)\.conv\.", r"head.regression_head.conv.\1.0."),
    (r"^bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
    (r"^bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
)
_RETINANET_COMPILED = tuple((re.compile(p), r) for p, r in _RETINANET_RENAMES)
_MARKERS = ("backbone.downsample_layers.", "neck.lateral_convs.", "rpn_head.rpn_conv.", "roi_head.bbox_head.",
            "bbox_head.retina_cls.")


def is_mmdet(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses mmdetection's Mask R-CNN or RetinaNet names (with an official STM-Evaluation backbone)."""
    if any(k.startswith(("decode_head.", "auxiliary_head.")) for k in state_dict):
        return False  # a segmentor (Semantic FPN has an FPN neck too)
    return any(k.startswith(_MARKERS) for k in state_dict)


def _background_first(key: str, value: torch.Tensor) -> torch.Tensor:
    """torchvision's class layout: background row first (moved from last, or added as zeros)."""
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([value[-1:], value[:-1]])
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([value.new_zeros((4,) + value.shape[1:]), value])
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([value.new_zeros((1,) + value.shape[1:]), value])
    return value


def is_retinanet(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether an mmdet state dict is a RetinaNet's (``bbox_head.retina_cls``)."""
    return any(k.startswith("bbox_head.retina_cls.") for k in state_dict)


def rename(key: str, retinanet: bool = False) -> str:
    """Map one mmdet key onto the tokenmixers detector's name (Mask R-CNN's, or RetinaNet's)."""
    if key.startswith("backbone."):
        return "backbone.body." + stm_eval.rename(key.removeprefix("backbone."))
    for pattern, repl in _RETINANET_COMPILED if retinanet else _COMPILED:
        new = pattern.sub(repl, key)
        if retinanet and new != key:
            return new  # the first matching rule only (fpn_convs.3/4 before the output convs)
        key = new
    return key


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmdet Mask R-CNN (cascade, RetinaNet) state dict; Mask R-CNN's class rows go to torchvision's
    layout."""
    retinanet = is_retinanet(state_dict)
    backbone = mmseg.convert_backbone({k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")})
    out = {} if backbone is None else {f"backbone.body.{k}": v for k, v in backbone.items()}
    for key, value in state_dict.items():
        if key.startswith("backbone.") and (backbone is not None or any(p.search(key) for p in stm_eval.DROPPED_PATTERNS)):
            continue
        new = rename(key, retinanet)
        out[new] = value if retinanet else _background_first(new, value)
    return out
