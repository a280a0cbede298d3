"""Spatial-reduction attention (PVT, Wang et al. 2021).

Every query attends globally to keys and values computed on a grid reduced by ``sr_ratio``: a
``sr x sr`` stride-``sr`` convolution followed by a LayerNorm. With ``sr_ratio = 1`` it is plain
global multi-head attention.

Any size: a map whose side is not a multiple of ``sr_ratio`` is zero-padded at the bottom/right
before the reduction (ceil), so every pixel contributes to some key. The official code assumes
divisible sizes, which is the case at 224x224; its dense backbone, at other sizes, lets the strided
convolution drop the last rows and columns (floor): ``pad_reduction=False`` does the same (a side
shorter than ``sr_ratio``, where the official code fails, is still padded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import TokenMixer, register_mixer


@register_mixer("sra")
class SpatialReductionAttention(TokenMixer):
    """Global attention with keys/values on an ``sr_ratio``-times reduced grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        pad_reduction: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.sr_ratio, self.pad_reduction = sr_ratio, pad_reduction
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # [k | v], each head-major
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, M, C)`` key/value tokens on the reduced grid."""
        B, H, W, C = x.shape
        if self.sr_ratio == 1:
            return x.reshape(B, H * W, C)
        r = self.sr_ratio
        x = x.permute(0, 3, 1, 2)
        if (self.pad_reduction or H < r or W < r) and (H % r or W % r):  # F.pad would copy even a zero padding
            x = F.pad(x, (0, -W % r, 0, -H % r))
        x = self.sr(x).flatten(2).transpose(1, 2)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        heads, d = self.num_heads, self.head_dim
        q = self.q(x).view(B, H * W, heads, d).transpose(1, 2)
        kv = self.kv(self.reduce(x)).view(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))
