"""Converter for the official STM-Evaluation classification checkpoints (OpenGVLab/STM-Evaluation).

The official models keep their blocks as ``stages.<s>.<b>.*`` with per-mixer names
(``attn.*``, ConvNeXt's ``dw_*``/``pw*``, DCN's ``gamma1``), the stem and downsampling layers as
``downsample_layers.*``, the stage norms as ``stage_norms.*`` and the head as
``conv_head.*``/``head.*`` (the detection backbones add ``out_norm_<i>.*``). This module renames
every entry onto tokenmixers' names; shapes that differ only by layout (1x1 conv vs Linear weights,
``[1,1,1,C]`` vs ``[C]`` layer scales) are reshaped by the loader.
"""
from __future__ import annotations

import re

import torch

# Buffers the official models carry and tokenmixers rebuilds on the fly.
DROPPED = (r"\.relative_position_index$", r"(^|\.)attn_mask$", r"num_batches_tracked$")

_RENAMES: tuple[tuple[str, str], ...] = (
    # stem, downsampling, stage norms, head
    (r"^downsample_layers\.0\.stem\.0\.", "stem.conv1."),
    (r"^downsample_layers\.0\.stem\.1\.", "stem.norm1."),
    (r"^downsample_layers\.0\.stem\.3\.", "stem.conv2."),
    (r"^downsample_layers\.0\.stem\.4\.", "stem.norm2."),
    (r"^downsample_layers\.(\d+)\.reduction\.0\.", r"stages.\1.downsample.conv."),
    (r"^downsample_layers\.(\d+)\.reduction\.1\.", r"stages.\1.downsample.norm."),
    (r"^stage_norms\.(\d+)\.", r"stages.\1.norm."),
    (r"^out_norm_(\d+)\.", r"out_norms.\1."),  # detection backbones
    (r"^conv_head\.0\.", "head.proj."),
    (r"^conv_head\.1\.", "head.bn."),
    (r"^avg_head\.1\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    # blocks
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.gamma_?1$", ".ls1.gamma"),
    (r"\.gamma_?2$", ".ls2.gamma"),
    (r"(blocks\.\d+)\.pos_embed$", r"\1.pos.pos_embed"),
    (r"\.attn\.pos_embed\.(height_rel|width_rel)$", r".mixer.\1"),  # Halo
    (r"\.attn\.dw_conv\.0\.", ".mixer.dw_conv."),  # DCNv3 offset/weight generator
    (r"\.attn\.dw_conv\.1\.norm\.", ".mixer.dw_norm."),
    (r"\.attn\.", ".mixer."),
    (r"(blocks\.\d+)\.dw_norm\.", r"\1.norm1."),  # unified ConvNeXt block
    (r"(blocks\.\d+)\.dw_input_proj\.", r"\1.mixer.in_proj."),
    (r"(blocks\.\d+)\.dwconv\.", r"\1.mixer.dwconv."),
    (r"(blocks\.\d+)\.dw_out_proj\.", r"\1.mixer.out_proj."),
    (r"(blocks\.\d+)\.pw_norm\.", r"\1.norm2."),
    (r"(blocks\.\d+)\.pwconv1\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.pwconv2\.", r"\1.mlp.fc2."),
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RENAMES)
DROPPED_PATTERNS = tuple(re.compile(p) for p in DROPPED)


def is_stm_eval(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the official STM-Evaluation key names."""
    return any(k.startswith("downsample_layers.0.stem.") for k in state_dict)


def rename(key: str) -> str:
    """Map one official key onto tokenmixers' name."""
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)
    return key


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict, dropping the buffers tokenmixers rebuilds."""
    return {
        rename(k): v for k, v in state_dict.items() if not any(p.search(k) for p in DROPPED_PATTERNS)
    }
