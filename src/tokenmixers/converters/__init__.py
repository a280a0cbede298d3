"""Converters from upstream checkpoint layouts to tokenmixers' parameter names.

Each upstream source is one module with ``is_<source>(state_dict)`` detection and
``convert(state_dict)``; :func:`to_tokenmixers` picks the matching one.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import dwnet, mmdet, mmseg, stm_eval, stvit

StateDict = dict[str, torch.Tensor]

# (name, detect, convert), tried in order; a state dict that matches none is taken as tokenmixers' own.
CONVERTERS: list[tuple[str, Callable[[StateDict], bool], Callable[[StateDict], StateDict]]] = [
    ("mmseg", mmseg.is_mmseg, mmseg.convert),
    ("mmdet", mmdet.is_mmdet, mmdet.convert),
    ("stm-eval", stm_eval.is_stm_eval, stm_eval.convert),
    ("dwnet", dwnet.is_dwnet, dwnet.convert),
    ("stvit", stvit.is_stvit, stvit.convert),
]


def to_tokenmixers(state_dict: StateDict) -> tuple[StateDict, str]:
    """Convert a state dict from any known upstream layout; return it with the source's name.

    A ``ValueError`` says why an upstream state dict cannot be converted.
    """
    for name, detect, convert in CONVERTERS:
        if detect(state_dict):
            return convert(state_dict), name
    return dict(state_dict), "tokenmixers"
