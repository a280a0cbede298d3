"""DCNv3 deformable convolution (InternImage, Wang et al. 2023) in pure PyTorch.

Channels are split into ``num_heads`` groups (16 channels each in the unified models). Every
pixel samples ``kernel_size**2`` points per group around itself: a fixed ``k x k`` grid plus a
learned offset, both in pixels and both multiplied by ``offset_scale``. The samples are bilinear
reads of ``value_proj(x)`` with zeros outside the map, weighted by a softmax over the points of
the group. Offsets and weights come from ``x`` through a 3x3 depth-wise conv, LayerNorm and GELU.

Geometry, exactly as the official unified model:

* offsets are ``(x, y)`` pairs (x = width axis), channels laid out ``(group, point, 2)``;
* point ``p = a * k + b`` of the fixed grid is ``(dx, dy) = (a - k // 2, b - k // 2)``: x is the
  outer index (the official grid is stored as (y, x) pairs but added as (x, y));
* the official code zero-pads the value by ``k // 2`` pixels and normalises locations by the
  padded size; sampling the unpadded value at the same pixel location with zero padding outside
  reads identical numbers, which is what is done here (no padded copy).

The reference points come from the actual map size, so any input size works.

Two ways to read the samples, equal to 1e-15 in float64: without gradients (inference), one
``embedding_bag`` gathers the four bilinear corners of every point from ``value`` as it comes out of
its projection and sums them with their weights, with no copy of the value and no per-point
intermediate (twice as fast as the other way on CPU); with gradients, ``grid_sample``, whose backward
is fast where ``embedding_bag``'s sorts every index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import size_cache
from . import TokenMixer, register_mixer


@size_cache
def _base_grid(kernel_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(k*k, 2)`` fixed sampling grid in (x, y) pixels, x the outer index."""
    r = torch.arange(kernel_size, dtype=dtype) - kernel_size // 2
    dx, dy = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx, dy], -1).reshape(-1, 2).to(device)


@size_cache
def _pixel_centres(H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(H, W, 1, 1, 2)`` (x, y) pixel coordinates of every position.

    The official code builds its reference points in float32 as ``(i + 1.5) / (H + 2)`` on the
    padded map; keeping that rounding makes float64 outputs agree with it to 1e-15 instead of 1e-8.
    """
    ys = (torch.linspace(1.5, H + 0.5, H, dtype=torch.float32) / (H + 2)).to(dtype) * (H + 2) - 1.5
    xs = (torch.linspace(1.5, W + 0.5, W, dtype=torch.float32) / (W + 2)).to(dtype) * (W + 2) - 1.5
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xs, ys], -1)[:, :, None, None, :].to(device)


@register_mixer("dcnv3")
class DCNv3(TokenMixer):
    """Deformable convolution v3: grouped, softmax-weighted bilinear sampling around each pixel."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        kernel_size: int = 3,
        dw_kernel_size: int = 3,
        offset_scale: float = 1.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if kernel_size < 1 or dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be >= 1 and dw_kernel_size a positive odd number, got {kernel_size}, {dw_kernel_size}"
            )
        self.kernel_size = kernel_size
        self.points = kernel_size**2
        self.offset_scale = offset_scale
        self.dw_conv = nn.Conv2d(dim, dim, dw_kernel_size, padding=dw_kernel_size // 2, groups=dim)
        self.dw_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.act = nn.GELU()
        self.sampling_offsets = nn.Linear(dim, num_heads * self.points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * self.points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        G, P, Cg = self.num_heads, self.points, C // self.num_heads

        value = self.value_proj(x).view(B, H, W, G, Cg)
        ctx = self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        ctx = self.act(self.dw_norm(ctx))
        offsets = self.sampling_offsets(ctx).view(B, H, W, G, P, 2)
        weights = _softmax_points(self.attention_weights(ctx).view(B, H, W, G, P))

        # pixel locations in at least float32: in bfloat16 a location near 56 is off by up to 1/8 pixel
        offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
        grid = _base_grid(self.kernel_size, x.device, offsets.dtype)
        loc = _pixel_centres(H, W, x.device, offsets.dtype) + (grid + offsets) * self.offset_scale
        if value.requires_grad or loc.requires_grad or weights.requires_grad:
            out = _sample_grid(value, loc, weights)
        else:
            out = _sample_gather(value, loc, weights)
        return self.output_proj(out.reshape(B, H, W, C))


def _softmax_points(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (short) dim of ``logits``.

    Torch's CPU softmax vectorises along the reduced dim, which has only ``k*k`` entries here; over
    the leading dim of the transposed view it runs across rows instead (4-5x faster, same numbers).
    """
    P = logits.shape[-1]
    return logits.reshape(-1, P).t().softmax(0).t().view(logits.shape)


def _sample_grid(value: torch.Tensor, loc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted bilinear samples by ``grid_sample``: value ``(B, H, W, G, Cg)``, loc ``(B, H, W, G, P, 2)``
    in (x, y) pixels, weights ``(B, H, W, G, P)`` -> ``(B, H, W, G, Cg)``."""
    B, H, W, G, Cg = value.shape
    P = loc.shape[-2]
    value = value.permute(0, 3, 4, 1, 2).reshape(B * G, Cg, H, W)
    loc = (2 * loc + 1) / loc.new_tensor([W, H]) - 1  # grid_sample coordinates, align_corners=False
    loc = loc.permute(0, 3, 1, 2, 4, 5).reshape(B * G, H * W, P, 2)
    # in the wider dtype of the two, so that bfloat16 values never round the locations
    dtype = torch.promote_types(value.dtype, loc.dtype)
    sampled = F.grid_sample(value.to(dtype), loc.to(dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.permute(0, 3, 1, 2, 4).reshape(B * G, 1, H * W, P)
    out = torch.linalg.vecdot(sampled, weights.to(sampled.dtype), dim=-1)  # B*G, Cg, H*W
    return out.view(B, G, Cg, H, W).permute(0, 3, 4, 1, 2)


def _sample_gather(value: torch.Tensor, loc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same as :func:`_sample_grid` by one ``embedding_bag`` over the four corners of every point."""
    B, H, W, G, Cg = value.shape
    rows = B * H * W * G  # value as a (rows, Cg) table, row ((b * H + y) * W + x) * G + g
    # Beyond one pixel outside the map every corner is outside: clamping there changes no weight and
    # keeps the integer conversion in range.
    x = loc[..., 0].clamp(-1, W)
    y = loc[..., 1].clamp(-1, H)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    index_dtype = torch.int32 if rows < 2**31 else torch.int64
    x0, y0 = x0.to(index_dtype), y0.to(index_dtype)
    wx0 = torch.where((x0 >= 0) & (x0 < W), 1 - fx, 0)
    wx1 = torch.where(x0 < W - 1, fx, 0)
    wy0 = torch.where((y0 >= 0) & (y0 < H), 1 - fy, 0) * weights
    wy1 = torch.where(y0 < H - 1, fy, 0) * weights
    corner_weights = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], -1)  # B, H, W, G, P, 4

    batch = torch.arange(B, dtype=index_dtype, device=value.device).view(B, 1, 1, 1, 1)
    group = torch.arange(G, dtype=index_dtype, device=value.device).view(G, 1)
    first = batch * (H * W * G) + group  # the row of pixel (0, 0) of each image and group
    corner_offsets = torch.tensor([0, G, W * G, W * G + G], dtype=index_dtype, device=value.device)
    # a corner outside the map has weight 0, so any row in the table serves it
    index = (first + (y0 * W + x0) * G).unsqueeze(-1) + corner_offsets
    index = index.clamp_(0, rows - 1).view(rows, -1)
    out = F.embedding_bag(
        index, value.reshape(rows, Cg), per_sample_weights=corner_weights.view(rows, -1).to(value.dtype), mode="sum"
    )
    return out.view(B, H, W, G, Cg)
