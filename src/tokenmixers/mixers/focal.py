"""Focal modulation (FocalNet, Yang et al. NeurIPS 2022).

A linear layer ``f: C -> 2C + (L + 1)`` gives a query ``q``, a context ``ctx`` and ``L + 1`` gates.
The context is aggregated hierarchically: level ``l = 1..L`` applies ``GELU(dwconv_{k_l}(ctx))`` to the
previous level's output, with ``k_l = focal_factor * (l - 1) + focal_window`` (3 and 5 by default, no
bias, zero 'same' padding), and adds it to ``ctx_all`` weighted by gate ``l``. The global level is
``GELU(mean over H x W of the last level)`` weighted by the last gate. The modulator is ``h(ctx_all)``
(a 1x1 projection ``C -> C``) and the output ``proj(q * modulator)``.

Defaults are the official FocalNet-T/S/B "srf" models (``focal_level=2``, ``focal_window=3``); the
"lrf" models use ``focal_level=3``. Any size works: the convolutions pad with zeros and the mean is
over the real ``H x W``. The official post-modulation LayerNorm (large models only) is left out.
"""
from __future__ import annotations

import torch
from torch import nn

from . import TokenMixer, register_mixer


@register_mixer("focal")
class FocalModulation(TokenMixer):
    """Gated multi-level depth-wise context modulating a query (FocalNet).

    Args:
        focal_level: number of depth-wise context levels ``L`` (a global level is always added).
        focal_window: kernel of the first level.
        focal_factor: kernel growth per level (kernels ``focal_window + focal_factor * l``, l = 0..L-1).
        normalize_modulator: divide the aggregated context by ``L + 1`` (FocalNet's option, off by default).
    """

    knobs = {"focal_level": (2, 3), "focal_window": (3, 5)}

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        focal_level: int = 2,
        focal_window: int = 3,
        focal_factor: int = 2,
        normalize_modulator: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if focal_level < 1:
            raise ValueError(f"focal_level must be >= 1, got {focal_level}")
        self.kernel_sizes = [focal_window + focal_factor * level for level in range(focal_level)]
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(
                f"focal_window {focal_window} and focal_factor {focal_factor} give kernels {self.kernel_sizes}; "
                "every kernel must be a positive odd number"
            )
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.focal_layers = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in self.kernel_sizes
        )
        self.act = nn.GELU()
        self.h = nn.Linear(dim, dim)  # FocalNet's 1x1 conv; a Linear on channels-last
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        C, L = self.dim, self.focal_level
        q, ctx, gates = self.f(x).split((C, C, L + 1), dim=-1)  # (B, H, W, C), (B, H, W, C), (B, H, W, L + 1)
        ctx = ctx.permute(0, 3, 1, 2)  # NCHW view for the depth-wise convs
        ctx_all = torch.zeros_like(q)
        for level, conv in enumerate(self.focal_layers):
            ctx = self.act(conv(ctx))
            ctx_all = ctx_all + ctx.permute(0, 2, 3, 1) * gates[..., level : level + 1]
        context = self.act(ctx.mean((2, 3)))  # (B, C): global level, from the last local level
        ctx_all = ctx_all + context[:, None, None, :] * gates[..., L:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (L + 1)
        return self.proj(q * self.h(ctx_all))
