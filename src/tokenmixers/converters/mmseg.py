"""Converter for mmsegmentation checkpoints (0.x and 1.x): ``backbone.*`` in an upstream layout, heads as they are.

mmseg keeps the backbone under ``backbone.`` in its own code's names (the official STM-Evaluation
detection backbones, DWNet, STViT) and the heads as ``decode_head.*``, ``auxiliary_head.*`` and
``neck.*``. tokenmixers' segmentor uses mmseg's head names, so only the backbone part is renamed,
by the converter of its layout.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import dwnet, stm_eval, stvit

StateDict = dict[str, torch.Tensor]
HEADS = ("decode_head.", "auxiliary_head.", "neck.")
BACKBONES: tuple[tuple[Callable[[StateDict], bool], Callable[[StateDict], StateDict]], ...] = (
    (stm_eval.is_stm_eval, stm_eval.convert),
    (dwnet.is_dwnet, dwnet.convert),
    (stvit.is_stvit, stvit.convert),
)


def _backbone(state_dict: StateDict) -> StateDict:
    return {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}


def _converter(backbone: StateDict) -> Optional[Callable[[StateDict], StateDict]]:
    return next((convert for detect, convert in BACKBONES if detect(backbone)), None)


def is_mmseg(state_dict: StateDict) -> bool:
    """Whether a state dict is a segmentor's with heads and a backbone in an upstream layout."""
    return any(k.startswith("decode_head.") for k in state_dict) and _converter(_backbone(state_dict)) is not None


def convert_backbone(backbone: StateDict) -> Optional[StateDict]:
    """A dense backbone's weights (``backbone.`` removed) renamed by the converter of their layout; None when no
    converter knows it. Shared with the mmdet converter."""
    convert = _converter(backbone)
    return None if convert is None else convert(backbone)


def convert(state_dict: StateDict) -> StateDict:
    """Rename the backbone part by its layout's converter; keep the heads' names."""
    converted = convert_backbone(_backbone(state_dict))
    heads = {k: v for k, v in state_dict.items() if k.startswith(HEADS)}
    return {**{f"backbone.{k}": v for k, v in converted.items()}, **heads}  # type: ignore[union-attr]
