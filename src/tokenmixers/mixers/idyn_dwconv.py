"""Inhomogeneous dynamic depth-wise convolution (DWNet's I-D-DW conv), in pure PyTorch.

Every pixel gets its own ``k x k`` kernel, shared by the channels of a group:
``w = 1x1 conv C -> C/r (bias) -> BatchNorm -> ReLU -> 1x1 conv C/r -> G*k*k (bias)`` evaluated at
every pixel, then ``out[b, y, x, c] = sum_ij w[b, y, x, g(c), i, j] * x[b, y+i-k//2, x+j-k//2, c]``
with zero padding and no bias. ``num_heads`` is the number of groups G. It sits between the two
1x1 projections like the static DWConv mixer.

The weighted sum runs as k*k shifted multiply-adds on the channels-last map (a loop over kernel
offsets, not samples), so no k*k-times larger unfolded copy is materialised; its backward (an
autograd Function) accumulates into one padded buffer instead of one per offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import check_batch_statistics
from . import register_mixer
from .dwconv import ProjectedMixer


class _PixelKernels(torch.autograd.Function):
    """``out[b,y,x,g,c] = sum_k w[b,y,x,g,k] * padded[b, y+i_k, x+j_k, g, c]`` for a ``k x k`` grid."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
        B, Hp, Wp, G, Cg = padded.shape
        H, W = Hp - k + 1, Wp - k + 1
        out = padded.new_zeros(B, H, W, G, Cg)
        for i in range(k):
            for j in range(k):
                out.addcmul_(padded[:, i : i + H, j : j + W], weight[..., i * k + j, None])
        ctx.save_for_backward(padded, weight)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        padded, weight = ctx.saved_tensors
        k = ctx.k
        H, W = grad.shape[1:3]
        grad_padded = torch.zeros_like(padded)
        grad_weight = torch.empty_like(weight)
        for i in range(k):
            for j in range(k):
                window = padded[:, i : i + H, j : j + W]
                grad_padded[:, i : i + H, j : j + W].addcmul_(grad, weight[..., i * k + j, None])
                grad_weight[..., i * k + j] = torch.linalg.vecdot(grad, window, dim=-1)
        return grad_padded, grad_weight, None


@register_mixer("idyn_dwconv")
class InhomogeneousDynamicDWConv(ProjectedMixer):
    """Per-pixel ``k x k`` kernels, shared within each of ``num_heads`` channel groups."""

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
        self.reduce = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.expand = nn.Linear(hidden, num_heads * kernel_size * kernel_size)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, G, k*k)`` per-pixel kernels."""
        B, H, W, _ = x.shape
        check_batch_statistics(self.training, B * H * W, "idyn_dwconv's kernel generator")
        hidden = self.reduce(x)
        hidden = self.act(self.bn(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.expand(hidden).view(B, H, W, self.num_heads, self.kernel_size**2)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the k*k shifted maps, each weighted by its per-pixel, per-group kernel entry."""
        B, H, W, C = x.shape
        k, G = self.kernel_size, self.num_heads
        weight = self.kernels(x).to(x.dtype)
        padded = F.pad(x, (0, 0, k // 2, k // 2, k // 2, k // 2)).view(B, H + k - 1, W + k - 1, G, C // G)
        return _PixelKernels.apply(padded, weight, k).view(B, H, W, C)
