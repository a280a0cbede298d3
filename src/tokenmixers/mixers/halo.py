"""Halo attention (HaloNet, Vaswani et al. 2021) as used by the unified HaloNet.

Queries are grouped in non-overlapping ``block x block`` blocks; each block attends to a
``window = block + 2 * halo`` neighbourhood of keys around it. Relative logits depend on the
query ("query-related", Attention Augmented Conv style): one table per axis, ``(2 * window - 1,
head_dim)``. Keys that fall outside the map (the halo at the border, and the bottom/right padding
added so that any size divides into blocks) are masked, so padding never acts as a token.

``mask_padding=False`` reproduces the official *detection* blocks instead: the map is zero-padded
at the bottom/right to whole blocks and those padded tokens act as keys (only the halo beyond the
padded map is masked); at sizes that are multiples of the block both behaviours are the same.

``query_offset`` moves the query block inside its key window: the default ``halo`` centres it;
``0`` puts it in the top-left corner (the paper's Halo-Shift ablation). ``halo_every = 2`` gives
the Halo-Switch ablation: blocks with an even index attend within their block only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import biased_attention, masked_value, num_windows, pad_to_multiple, size_cache
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


def _key_span(size: int, n_blocks: int, before: int, window: int) -> tuple[int, int]:
    """Which window positions can hold real keys along one axis: ``(start, length)``.

    With a single block along the axis, only the ``size`` positions over the map are real; trimming
    the window to them gives the same result (the rest is masked) for a fraction of the work.
    """
    return (before, size) if n_blocks == 1 else (0, window)


def _windows(x: torch.Tensor, nh: int, nw: int, block: int, lh: int, lw: int) -> torch.Tensor:
    """Overlapping ``lh x lw`` windows at stride ``block``: ``(B, Hp, Wp, C) -> (B, nh, nw, lh * lw, C)``.

    Both branches compute the same values: ``unfold`` is the fastest forward, ``index_select``
    has a far faster backward (``unfold``'s backward is a slow generic kernel on CPU).
    """
    B, C = x.shape[0], x.shape[-1]
    if x.requires_grad:
        rows = (torch.arange(nh, device=x.device)[:, None] * block + torch.arange(lh, device=x.device)).flatten()
        cols = (torch.arange(nw, device=x.device)[:, None] * block + torch.arange(lw, device=x.device)).flatten()
        x = x.index_select(1, rows).index_select(2, cols).view(B, nh, lh, nw, lw, C).transpose(2, 3)
    else:
        x = x.unfold(1, lh, block).unfold(2, lw, block).permute(0, 1, 2, 4, 5, 3)
    return x.reshape(B, nh, nw, lh * lw, C)


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
        mask_padding: bool = True,
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
        self.mask_padding = mask_padding

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # per head: [k | v]
        scale = self.head_dim**-0.5
        self.height_rel = nn.Parameter(torch.randn(2 * window - 1, self.head_dim) * scale)
        self.width_rel = nn.Parameter(torch.randn(2 * window - 1, self.head_dim) * scale)
        self.proj = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        """Relative-logit tables are not decayed."""
        return {"height_rel", "width_rel"}

    def _bias(self, q: torch.Tensor, H: int, W: int, span_h: tuple[int, int], span_w: tuple[int, int]) -> torch.Tensor:
        """Relative logits plus key mask: ``q (B, nh, nw, heads, bs, bs, d) -> (..., bs, bs, lh, lw)``."""
        bs, win, before = self.block_size, self.window, self.query_offset
        (h0, lh), (w0, lw) = span_h, span_w
        idx_h, idx_w = _rel_index(bs, win, q.device)
        mask_h = _axis_mask(H, bs, win, before, q.device, q.dtype)[:, h0 : h0 + lh]
        mask_w = _axis_mask(W, bs, win, before, q.device, q.dtype)[:, w0 : w0 + lw]
        logits_h = q @ self.height_rel.transpose(0, 1)  # (..., qh, qw, 2 * win - 1)
        logits_w = q @ self.width_rel.transpose(0, 1)
        idx_h, idx_w = idx_h[..., h0 : h0 + lh], idx_w[..., w0 : w0 + lw]
        rel_h = logits_h.gather(-1, idx_h.expand(logits_h.shape[:-1] + (lh,)))  # (..., qh, qw, kh)
        rel_w = logits_w.gather(-1, idx_w.expand(logits_w.shape[:-1] + (lw,)))  # (..., qh, qw, kw)
        rel_h = rel_h + mask_h[:, None, None, None, None, :]  # per block row: nh, nw, heads, qh, qw, kh
        rel_w = rel_w + mask_w[:, None, None, None, :]  # per block column: nw, heads, qh, qw, kw
        return rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        bs, win, heads, d = self.block_size, self.window, self.num_heads, self.head_dim
        if not self.mask_padding and (H % bs or W % bs):  # official detection blocks: padding acts as tokens
            return self.forward(F.pad(x, (0, 0, 0, -W % bs, 0, -H % bs)))[:, :H, :W]
        nh, nw = num_windows(H, bs), num_windows(W, bs)
        before = self.query_offset
        (h0, lh), (w0, lw) = span_h, span_w = _key_span(H, nh, before, win), _key_span(W, nw, before, win)

        q = pad_to_multiple(self.q(x), bs)  # a copy only where the map is not whole blocks
        q = q.view(B, nh, bs, nw, bs, heads, d).permute(0, 1, 3, 5, 2, 4, 6)  # B nh nw heads bs bs d
        # pad so that window position p of block i reads map row i * bs + p - before
        pad_h = (before - h0, (nh - 1) * bs + h0 + lh - before - H)
        pad_w = (before - w0, (nw - 1) * bs + w0 + lw - before - W)
        kv = F.pad(self.kv(x), (0, 0, *pad_w, *pad_h))
        kv = _windows(kv, nh, nw, bs, lh, lw).unflatten(-1, (heads, 2 * d)).transpose(3, 4)
        k, v = kv.split(d, dim=-1)  # B nh nw heads lh*lw d

        bias = self._bias(q, H, W, span_h, span_w)
        n = B * nh * nw
        out = biased_attention(
            q.reshape(n, heads, bs * bs, d),
            k.reshape(n, heads, lh * lw, d),
            v.reshape(n, heads, lh * lw, d),
            bias.reshape(n, heads, bs * bs, lh * lw),
        )
        out = out.view(B, nh, nw, heads, bs, bs, d).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, nh * bs, nw * bs, C)[:, :H, :W]
        return self.proj(out)
