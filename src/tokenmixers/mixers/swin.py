"""Shifted-window attention (Swin Transformer, Liu et al. 2021).

Tokens attend within non-overlapping ``window x window`` windows with a learned relative position
bias; blocks with an odd ``block_index`` first roll the map by ``shift`` so that windows straddle
the previous block's boundaries, and mask the pairs that the roll brought together.

Any size: the map is zero-padded at the bottom/right to a multiple of the window and padded
tokens are masked (a real query never attends to a padded key). Masks are built for the actual
padded size and cached per size.

Shift rule: an axis is shifted only if the map needs more than one window along it. At 224x224
this is exactly the official models (stage 4's 7x7 map fits one window and is never shifted).
At larger inputs (e.g. 448, or detection-sized images) every stage whose map exceeds one window
shifts on odd blocks, as the detection variant of the official code does; the official
classification models instead keep their 224-sized masks and misapply them at other sizes.
A map smaller than one window along an axis uses the map itself as the window there (no padding,
no shift), which equals padding and masking it, with the same relative-bias table.

``mask_padding=False`` reproduces the official *detection* blocks instead: the map is zero-padded
to whole windows whose padded tokens act as keys, and odd blocks shift in every stage, even a map
that fits one window (only the shift regions are masked).
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..layers import biased_attention, pad_to_multiple, size_cache, window_mask, window_merge, window_partition
from . import TokenMixer, register_mixer


@size_cache
def relative_position_index(wh: int, ww: int, window: int, device: torch.device) -> torch.Tensor:
    """``(wh*ww, wh*ww)`` index into a ``(2 * window - 1) ** 2`` bias table (Swin layout) for a
    ``wh x ww`` window (smaller than ``window`` where the map itself is smaller)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)


@register_mixer("swin")
class ShiftedWindowAttention(TokenMixer):
    """Window attention with relative position bias; odd blocks use shifted windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        window_size: int = 7,
        shift_size: Optional[int] = None,
        qkv_bias: bool = True,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        shift = window_size // 2 if shift_size is None else shift_size
        if not 0 <= shift < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift}")
        self.window_size = window_size
        self.shift_size = shift if block_index % 2 == 1 else 0
        self.head_dim = dim // num_heads
        self.mask_padding = mask_padding
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        """The relative position bias table is not decayed."""
        return {"relative_position_bias_table"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        ws, heads, d = self.window_size, self.num_heads, self.head_dim
        # an axis that fits in one window is neither padded nor shifted: its window is the map itself,
        # which equals padding and masking it (the bias table is indexed by relative position)
        wh, ww = min(H, ws), min(W, ws)
        shift_h = self.shift_size if H > ws else 0
        shift_w = self.shift_size if W > ws else 0
        if not self.mask_padding:  # official detection blocks: whole windows, always shifted, padding unmasked
            wh = ww = ws
            shift_h = shift_w = self.shift_size
        N = wh * ww

        x = pad_to_multiple(x, (wh, ww))
        Hp, Wp = x.shape[1:3]
        real_h, real_w = (H, W) if self.mask_padding else (Hp, Wp)
        if shift_h or shift_w:
            x = torch.roll(x, (-shift_h, -shift_w), (1, 2))
        windows = window_partition(x, (wh, ww))  # B, nW, N, C
        nW = windows.shape[1]
        qkv = self.qkv(windows).view(B, nW, N, 3, heads, d).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, B, nW * heads, N, d).unbind(0)

        index = relative_position_index(wh, ww, ws, x.device)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1)  # heads, N, N
        mask = window_mask(real_h, real_w, wh, ww, shift_h, shift_w, x.device, bias.dtype)
        bias = bias.expand(nW, heads, N, N) if mask is None else bias + mask
        out = biased_attention(q, k, v, bias.reshape(1, nW * heads, N, N))

        out = out.view(B, nW, heads, N, d).transpose(2, 3).reshape(B, nW, N, C)
        out = window_merge(out, (wh, ww), Hp, Wp)
        if shift_h or shift_w:
            out = torch.roll(out, (shift_h, shift_w), (1, 2))
        return self.proj(out[:, :H, :W])
