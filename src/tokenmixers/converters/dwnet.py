"""Converter for the official DWNet classification checkpoints (Atten4Vis/DemystifyLocalViT).

The official models are Swin-shaped: ``patch_embed.*``, ``layers.<s>.blocks.<i>.*`` with the conv
branch as ``attn2conv.*`` (``conv0``/``bn0``, the spatial op ``conv`` — a static depth-wise conv,
a ``DynamicDWConv`` or an ``IDynamicDWConv`` — then ``bn``, ``conv2``/``bn2``), the pre-MLP
BatchNorm as ``bn``, patch merging at the *end* of stage ``s`` as ``layers.<s>.downsample.*``,
then ``norm.*`` and ``head.*``; the dense (mmseg / mmdet) backbone drops those two and adds a
BatchNorm ``norm<i>.*`` on each output (here ``out_norms.<i>.*``). This module renames every entry
onto :mod:`tokenmixers.models.dwnet` (patch merging opens stage ``s + 1``, the final norm closes the
last stage); 1x1 conv weights are reshaped to Linear weights by the loader. ``num_batches_tracked`` is dropped.
"""
from __future__ import annotations

import re

import torch

_RENAMES: tuple[tuple[str, object], ...] = (
    (r"^norm(\d+)\.", r"out_norms.\1."),  # the dense (segmentation / detection) backbone's output norms
    (r"^patch_embed\.", "stem."),
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    # the conv branch
    (r"\.attn2conv\.conv0\.", ".mixer.in_proj."),
    (r"\.attn2conv\.bn0\.", ".mixer.in_norm."),
    (r"\.attn2conv\.conv\.conv1\.0\.", ".mixer.spatial.reduce."),  # IDynamicDWConv: conv1 = [conv, BN, ReLU]
    (r"\.attn2conv\.conv\.conv1\.1\.", ".mixer.spatial.bn."),
    (r"\.attn2conv\.conv\.conv2\.0\.", ".mixer.spatial.expand."),
    (r"\.attn2conv\.conv\.conv1\.", ".mixer.spatial.reduce."),  # DynamicDWConv
    (r"\.attn2conv\.conv\.bn\.", ".mixer.spatial.bn."),
    (r"\.attn2conv\.conv\.conv2\.", ".mixer.spatial.expand."),
    (r"\.attn2conv\.conv\.weight$", ".mixer.spatial.dwconv.weight"),  # static depth-wise conv
    (r"\.attn2conv\.bn\.", ".mixer.spatial_norm."),
    (r"\.attn2conv\.conv2\.", ".mixer.out_proj."),
    (r"\.attn2conv\.bn2\.", ".mixer.out_norm."),
    (r"(blocks\.\d+)\.bn\.", r"\1.norm2."),
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RENAMES)


def is_dwnet(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the official DWNet key names."""
    return any(".attn2conv." in k for k in state_dict)


def rename(key: str, state_dict: dict[str, torch.Tensor], last_stage: int) -> str:
    """Map one official key onto tokenmixers' name (``state_dict`` tells a static from a dynamic conv)."""
    if key.startswith("norm."):
        return f"stages.{last_stage}.{key}"
    if key.endswith(".attn2conv.conv.bias"):  # the static conv's bias, or DynamicDWConv's own bias
        static = key.removesuffix("bias") + "weight" in state_dict
        key = key.removesuffix(".attn2conv.conv.bias") + (".mixer.spatial.dwconv.bias" if static else ".mixer.spatial.bias")
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)  # type: ignore[arg-type]
    return key


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DWNet state dict, dropping ``num_batches_tracked``."""
    last_stage = max((int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))), default=0)
    return {
        rename(k, state_dict, last_stage): v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }
