"""Average pooling minus identity: the PoolFormer token mixer (MetaFormer, Yu et al. CVPR 2022).

``pool(x) - x`` with a ``pool_size x pool_size`` average pool, stride 1, zero padding of
``pool_size // 2`` that is *not* counted (``count_include_pad=False``): each output averages only the
real pixels of its window, so a border pixel is never pulled towards zero, and any size works (on a
1x1 map the output is 0). The input is subtracted because the block adds its own residual.

The mixer has no parameters and no width of its own, so the budget fitter may vary the block's
MLP ratio instead (``knobs``); at the same width, ratio 5 gives a block the parameters of a
projected depth-wise-conv block (``2C^2`` of projections plus ``8C^2`` of MLP).
"""
from __future__ import annotations

import torch
from torch import nn

from . import TokenMixer, register_mixer


@register_mixer("pool")
class Pooling(TokenMixer):
    """``AvgPool(x) - x`` (PoolFormer), padding not counted in the average.

    Args:
        pool_size: odd side of the pooling window (PoolFormer: 3).
    """

    knobs = {"mlp_ratio": (4, 5, 6)}

    def __init__(self, dim: int, num_heads: int = 1, block_index: int = 0, *, pool_size: int = 3) -> None:
        super().__init__(dim, num_heads, block_index)
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number, got {pool_size}")
        self.pool_size = pool_size
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x
