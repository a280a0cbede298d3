"""Dynamic depth-wise convolution (DWNet, Han et al. ICLR 2022), homogeneous variant.

Each sample gets its own ``k x k`` kernel per channel, predicted from global context:
``GAP(x) -> 1x1 conv C -> C/r (no bias) -> BatchNorm -> ReLU -> 1x1 conv C/r -> C*k*k (bias)``,
plus a static per-channel bias (zero-initialised). The kernel is the same at every position. It
sits between the two 1x1 projections like the static DWConv mixer.

All samples run as one grouped convolution over the batch (groups = B*C): no Python loop over
samples. The generator's BatchNorm normalises the pooled features over the batch in training
(as DWNet), so training needs more than one sample per process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import check_batch_statistics
from . import register_mixer
from .dwconv import ProjectedMixer


@register_mixer("dyn_dwconv")
class DynamicDWConv(ProjectedMixer):
    """Per-sample ``k x k`` depth-wise kernels predicted from the globally pooled input."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        kernel_size: int = 7,
        reduction: int = 4,
        projections: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, block_index, kernel_size, projections)
        hidden = self.hidden_width(dim, reduction)
        self.reduce = nn.Linear(dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.expand = nn.Linear(hidden, dim * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.zeros(dim))

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B*C, 1, k, k)`` depth-wise kernels, one set per sample."""
        B, _, _, C = x.shape
        check_batch_statistics(self.training, B, "dyn_dwconv's kernel generator")
        context = self.act(self.bn(self.reduce(x.mean((1, 2)))))
        return self.expand(context).view(B * C, 1, self.kernel_size, self.kernel_size)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """One grouped convolution over the whole batch."""
        B, H, W, C = x.shape
        weight = self.kernels(x)
        inputs = x.permute(0, 3, 1, 2).reshape(1, B * C, H, W)
        out = F.conv2d(inputs, weight, padding=self.kernel_size // 2, groups=B * C).view(B, C, H, W)
        return out.permute(0, 2, 3, 1) + self.bias
