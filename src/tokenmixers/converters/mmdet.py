"""Converter for mmdetection 2.x Mask R-CNN checkpoints (the official STM-Evaluation detectors).

mmdet keeps ``backbone.*`` (here: official STM-Evaluation names), ``neck.*`` (FPN),
``rpn_head.*`` and ``roi_head.*``; tokenmixers' detector is torchvision's Mask R-CNN with the
backbone as ``backbone.body`` and the FPN as ``backbone.fpn``. Class-dependent layers differ in
layout: mmdet puts the background class *last* in ``fc_cls`` and has no background rows in
``fc_reg`` and ``conv_logits``; torchvision puts background *first* everywhere. The background
rows that mmdet does not have are zero (they are never used: torchvision drops class 0).
"""
from __future__ import annotations

import re

import torch

from . import stm_eval

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
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RENAMES)
_MARKERS = ("backbone.downsample_layers.", "neck.lateral_convs.", "rpn_head.rpn_conv.", "roi_head.bbox_head.")


def is_mmdet(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses mmdetection's Mask R-CNN names (with an official STM-Evaluation backbone)."""
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


def rename(key: str) -> str:
    """Map one mmdet key onto the tokenmixers detector's name."""
    if key.startswith("backbone."):
        return "backbone.body." + stm_eval.rename(key.removeprefix("backbone."))
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)
    return key


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmdet Mask R-CNN state dict and move the class rows to torchvision's layout."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.") and any(p.search(key) for p in stm_eval.DROPPED_PATTERNS):
            continue
        new = rename(key)
        out[new] = _background_first(new, value)
    return out
