"""Halo attention (HaloNet, Vaswani et al. 2021) as used by the unified HaloNet.

Queries are grouped in non-overlapping ``block x block`` blocks; each block attends to a
``window = block + 2 * halo`` neighbourhood of keys around it. Relative logits depend on the
query ("query-related", Attention Augmented Conv style): one table per axis, ``(2 * window - 1,
head_dim)``. Keys that fall outside the map (the halo at the border, and the bottom/right padding
added so that any size divides into blocks) are masked, so padding never acts as a token.

``query_offset`` moves the query block inside its key window: the default ``halo`` centres it;
``0`` puts it in the top-left corner (the paper's Halo-Shift ablation). ``halo_every = 2`` gives
the Halo-Switch ablation: blocks with an even index attend within their block only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import masked_value, num_windows, size_cache
from . import TokenMixer, register_mixer


@size_cache
def _axis_mask(size: int, block: int, window: int, before: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive key mask along one axis, ``(n_blocks, window)``: 0 inside the map, very negative outside.

    Padding is rectangular, so the 2-D key mask is the sum of one mask per axis.
    """
    n = num_windows(size, block)
    pos = torch.arange(n)[:, None] * block - before + torch.arange(window)[None, :]
    outside = (pos < 0) | (pos >= size)
    return torch.zeros(outside.shape, dtype=dtype).masked_fill(outside, masked_value(dtype)).to(device)


@size_cache
def _rel_index(block: int, window: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into a ``2 * window - 1`` table for ``(q_row, q_col, key)``: ``key - query + window - 1``.

    Returns the index for the height table (query row matters) and for the width table (query
    column matters), each ``(block, block, window)``.
    """
    q = torch.arange(block)[:, None, None]
    k = torch.arange(window)[None, None, :]
    rel = k - q + window - 1  # (block, 1, window)
    return rel.expand(block, block, window).to(device), rel.transpose(0, 1).expand(block, block, window).to(device)


@register_mixer("halo")
class HaloAttention(TokenMixer):
    """Blocked local attention with a halo of keys and query-related relative logits."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        block_size: int = 7,
        halo_size: int = 3,
        query_offset: Optional[int] = None,
        halo_every: int = 1,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"block_size must be >= 1 and halo_size >= 0, got {block_size}, {halo_size}")
        if halo_every < 1:
            raise ValueError(f"halo_every must be >= 1, got {halo_every}")
        if block_index % halo_every != halo_every - 1:
            halo_size = 0  # Halo-Switch: this block attends within its own block only
        window = block_size + 2 * halo_size
        offset = halo_size if query_offset is None else min(query_offset, 2 * halo_size)
        if offset < 0:
            raise ValueError(f"query_offset must be >= 0, got {query_offset}")
        self.block_size, self.halo_size, self.window, self.query_offset = block_size, halo_size, window, offset
        self.head_dim = dim // num_heads

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # per head: [k | v]
        scale = self.head_dim**-0.5
        self.height_rel = nn.Parameter(torch.randn(2 * window - 1, self.head_dim) * scale)
        self.width_rel = nn.Parameter(torch.randn(2 * window - 1, self.head_dim) * scale)
        self.proj = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        """Relative-logit tables are not decayed."""
        return {"height_rel", "width_rel"}

    def _bias(self, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Relative logits plus key mask: ``q (B, nh, nw, heads, bs, bs, d) -> (..., bs, bs, win, win)``."""
        bs, win, before = self.block_size, self.window, self.query_offset
        idx_h, idx_w = _rel_index(bs, win, q.device)
        mask_h = _axis_mask(H, bs, win, before, q.device, q.dtype)[:, None, None, None, None, :]  # nh,1,1,qh,qw,kh
        mask_w = _axis_mask(W, bs, win, before, q.device, q.dtype)[:, None, None, None, :]  # nw,heads,qh,qw,kw
        logits_h = q @ self.height_rel.transpose(0, 1)  # (..., qh, qw, 2 * win - 1)
        logits_w = q @ self.width_rel.transpose(0, 1)
        rel_h = logits_h.gather(-1, idx_h.expand(logits_h.shape[:-1] + (win,))) + mask_h  # (..., qh, qw, kh)
        rel_w = logits_w.gather(-1, idx_w.expand(logits_w.shape[:-1] + (win,))) + mask_w  # (..., qh, qw, kw)
        return rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        bs, win, heads, d = self.block_size, self.window, self.num_heads, self.head_dim
        nh, nw = num_windows(H, bs), num_windows(W, bs)
        before = self.query_offset

        q = F.pad(self.q(x), (0, 0, 0, nw * bs - W, 0, nh * bs - H))
        q = q.view(B, nh, bs, nw, bs, heads, d).permute(0, 1, 3, 5, 2, 4, 6)  # B nh nw heads bs bs d
        kv = F.pad(
            self.kv(x),
            (0, 0, before, nw * bs - W + win - bs - before, before, nh * bs - H + win - bs - before),
        )
        kv = kv.unfold(1, win, bs).unfold(2, win, bs).unflatten(3, (heads, 2 * d))  # B nh nw heads 2d win win
        kv = kv.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, nh, nw, heads, win * win, 2 * d)
        k, v = kv.split(d, dim=-1)  # B nh nw heads win² d

        bias = self._bias(q, H, W)
        n = B * nh * nw
        out = F.scaled_dot_product_attention(
            q.reshape(n, heads, bs * bs, d),
            k.reshape(n, heads, win * win, d),
            v.reshape(n, heads, win * win, d),
            attn_mask=bias.reshape(n, heads, bs * bs, win * win),
        )
        out = out.view(B, nh, nw, heads, bs, bs, d).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, nh * bs, nw * bs, C)[:, :H, :W]
        return self.proj(out)
