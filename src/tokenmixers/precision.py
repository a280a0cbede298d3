"""Numeric precision: one vocabulary (``fp32``, ``bf16``, ``fp16``, ``auto``) for every command and task.

``auto`` means fp16 with a grad scaler on CUDA (the official code's AMP) and fp32 elsewhere. Mixed
precision runs under :func:`autocast`; fp32 runs without any autocast context.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Union

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """``auto``: fp16 on CUDA, fp32 elsewhere; any other name is checked and returned."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: Union[str, torch.device], precision: str) -> AbstractContextManager:
    """The autocast context of a resolved precision on a device (none for fp32)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


__all__ = ["PRECISIONS", "DTYPES", "resolve_precision", "autocast"]
