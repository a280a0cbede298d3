"""Super-token attention (STViT, Huang et al., CVPR 2023).

The map is divided into ``cell_size`` cells; each cell starts as one *super token* (the mean of
its pixels). Pixels associate with the super tokens of their 3x3 neighbourhood of cells
(``softmax(P S^T / sqrt(C))`` over the 9 candidates), super tokens become association-weighted
means of their pixels (``n_iter`` rounds), multi-head attention runs among the super tokens, and
every pixel reads back the association-weighted sum of its neighbouring super tokens. With
``cell_size = 1`` the mixer is plain global multi-head attention over all pixels (the published
stages 3-4).

As published: the association is computed without gradient (``grad_association=True`` lets the
gradient through), neighbours outside the grid are zero vectors that still take softmax mass, and
the attention's qkv channels are grouped per head as ``(q, k, v)``. Any size: the map is
zero-padded at the bottom/right to whole cells; padded pixels neither enter a super token's
initial mean nor associate with super tokens, and their outputs are cropped.
``mask_padding=False`` is the published computation instead (``tokenmixers.models.stvit``): the
zero pixels count in the cell means and add their uniform association to the super tokens' mass.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import num_windows, pad_to_multiple
from . import TokenMixer, register_mixer

NEIGHBOURS = [(dy, dx) for dy in range(3) for dx in range(3)]


def _neighbours(s: torch.Tensor) -> torch.Tensor:
    """``(B, hh, ww, C) -> (B, hh, ww, 9, C)``: each cell's 3x3 super tokens, zeros outside the grid."""
    hh, ww = s.shape[1:3]
    padded = F.pad(s, (0, 0, 1, 1, 1, 1))
    return torch.stack([padded[:, dy : dy + hh, dx : dx + ww] for dy, dx in NEIGHBOURS], dim=3)


def _fold(contrib: torch.Tensor) -> torch.Tensor:
    """``(B, hh, ww, 9, ...) -> (B, hh, ww, ...)``: add each neighbour's share onto that super token."""
    B, hh, ww = contrib.shape[:3]
    out = contrib.new_zeros((B, hh + 2, ww + 2) + contrib.shape[4:])
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        out[:, dy : dy + hh, dx : dx + ww] += contrib[:, :, :, k]
    return out[:, 1:-1, 1:-1]


@register_mixer("stvit")
class SuperTokenAttention(TokenMixer):
    """Attention among super tokens of ``cell_size`` cells, mapped back by soft association."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        cell_size: Union[int, tuple[int, int]] = 1,
        n_iter: int = 1,
        grad_association: bool = False,
        qkv_bias: bool = True,
        mask_padding: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        cell = (cell_size, cell_size) if isinstance(cell_size, int) else tuple(cell_size)
        if len(cell) != 2 or min(cell) < 1:
            raise ValueError(f"cell_size must be a positive int or (h, w), got {cell_size!r}")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.cell, self.n_iter, self.grad_association = cell, n_iter, grad_association
        self.mask_padding = mask_padding
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # per head: [q | k | v]
        self.proj = nn.Linear(dim, dim)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over ``(B, N, C)`` tokens."""
        B, N, C = tokens.shape
        q, k, v = self.qkv(tokens).view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, C = x.shape
        h, w = self.cell
        if (h, w) == (1, 1):
            return self.attention(x.reshape(B, H * W, C)).view(B, H, W, C)
        hh, ww = num_windows(H, h), num_windows(W, w)
        pixels = pad_to_multiple(x, (h, w)).view(B, hh, h, ww, w, C)  # a copy only where cells are not whole
        pixels = pixels.permute(0, 1, 3, 2, 4, 5).reshape(B, hh, ww, h * w, C)
        pad = (0, ww * w - W, 0, hh * h - H)
        valid = F.pad(x.new_ones(H, W), pad, value=0.0 if self.mask_padding else 1.0).view(hh, h, ww, w)
        valid = valid.permute(0, 2, 1, 3).reshape(hh, ww, h * w, 1)  # the pixels that count in each cell

        tokens = (pixels * valid).sum(3) / valid.sum(2).clamp_min(1)  # initial super tokens: cell means
        with nullcontext() if self.grad_association else torch.no_grad():
            for step in range(self.n_iter):
                logits = pixels @ _neighbours(tokens).transpose(-1, -2) * C**-0.5  # B hh ww hw 9
                assoc = logits.softmax(-1) * valid
                norm = _fold(assoc.sum(3))[..., None] + 1e-12  # B hh ww 1: association mass per super token
                if step < self.n_iter - 1:
                    tokens = _fold(assoc.transpose(-1, -2) @ pixels) / norm
        # the published model has no gradient through the association (norm is detached there); with
        # grad_association the whole expression is differentiated
        tokens = _fold(assoc.transpose(-1, -2) @ pixels) / (norm if self.grad_association else norm.detach())
        tokens = self.attention(tokens.reshape(B, hh * ww, C)).view(B, hh, ww, C)
        out = assoc @ _neighbours(tokens)  # B hh ww hw C
        out = out.view(B, hh, ww, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hh * h, ww * w, C)
        return out[:, :H, :W]
