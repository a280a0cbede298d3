"""Depth-wise convolution between 1x1 projections (the unified ConvNeXt / DWNet mixer).

``out_proj(dwconv_k x k(in_proj(x)))`` with a ``kernel_size`` depth-wise convolution (7 by
default, zero padding, any size). ``projections=False`` drops the two 1x1 projections, which is
the plain ConvNeXt depth-wise conv used with the ConvNeXt-style block.
"""
from __future__ import annotations

import torch
from torch import nn

from . import TokenMixer, register_mixer


@register_mixer("dwconv")
class DepthwiseConvMixer(TokenMixer):
    """``k x k`` depth-wise convolution, optionally between two 1x1 projections."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        kernel_size: int = 7,
        projections: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.in_proj = nn.Linear(dim, dim) if projections else nn.Identity()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim) if projections else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        x = self.in_proj(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.out_proj(x)
