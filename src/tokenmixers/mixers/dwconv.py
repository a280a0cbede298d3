"""Depth-wise convolution between 1x1 projections (the unified ConvNeXt / DWNet mixer).

``out_proj(dwconv_k x k(in_proj(x)))`` with a ``kernel_size`` depth-wise convolution (7 by
default, zero padding, any size). ``projections=False`` drops the two 1x1 projections, which is
the plain ConvNeXt depth-wise conv used with the ConvNeXt-style block. :class:`ProjectedMixer`
is the shared shape of the depth-wise family (static here, dynamic in ``dyn_dwconv``/``idyn_dwconv``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import TokenMixer, register_mixer


class ProjectedMixer(TokenMixer):
    """``out_proj(spatial(in_proj(x)))``: a ``kernel_size`` spatial operator between two 1x1 projections."""

    def __init__(self, dim: int, num_heads: int, block_index: int, kernel_size: int, projections: bool = True) -> None:
        super().__init__(dim, num_heads, block_index)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(dim, dim) if projections else nn.Identity()
        self.out_proj = nn.Linear(dim, dim) if projections else nn.Identity()

    @staticmethod
    def hidden_width(dim: int, reduction: int) -> int:
        """Width ``dim // reduction`` of a kernel generator, checked."""
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be in [1, dim={dim}], got {reduction}")
        return dim // reduction

    def spatial(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The spatial operator: ``(B, H, W, C) -> (B, H, W, C)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return self.out_proj(self.spatial(self.in_proj(x)))


@register_mixer("dwconv")
class DepthwiseConvMixer(ProjectedMixer):
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
        super().__init__(dim, num_heads, block_index, kernel_size, projections)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Depth-wise convolution on the channels-last map (an NCHW view)."""
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
