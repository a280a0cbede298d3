"""Twins-SVT attention (Chu et al., NeurIPS 2021): locally-grouped and global sub-sampled attention.

Blocks alternate, even ``block_index`` -> LSA, odd -> GSA:

* **LSA** (locally-grouped self-attention): attention inside non-overlapping ``window x window``
  windows (7). Any size: the map is zero-padded at the bottom/right and the padded keys are masked
  for every combination of bottom/right padding (the upstream segmentation code's mask is wrong
  unless both paddings are non-zero); an axis that fits one window is not padded at all.
* **GSA** (global sub-sampled attention): every query attends to keys/values from a
  ``sr x sr`` stride-``sr`` convolution + LayerNorm, i.e. PVT's spatial-reduction attention.

Both use a q projection and a kv projection (for LSA the pair equals Twins' fused qkv layer:
the same parameters split in two). The conditional position encoding that Twins applies after
the first block of each stage is a backbone option of the family (``pos_embed="conv"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import pad_to_multiple, window_mask, window_merge, window_partition
from . import register_mixer
from .sra import SpatialReductionAttention


@register_mixer("twins")
class TwinsAttention(SpatialReductionAttention):
    """LSA on even blocks, GSA (spatial-reduction attention) on odd blocks."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        sr_ratio: int = 1,
        window_size: int = 7,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        local = block_index % 2 == 0
        super().__init__(dim, num_heads, block_index, sr_ratio=1 if local else sr_ratio, qkv_bias=qkv_bias,
                         norm_eps=norm_eps)
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.local, self.window_size = local, window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        if not self.local:
            return super().forward(x)
        B, H, W, C = x.shape
        heads, d = self.num_heads, self.head_dim
        wh, ww = min(H, self.window_size), min(W, self.window_size)
        x = pad_to_multiple(x, (wh, ww))
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, (wh, ww))  # B, nW, N, C
        nW, N = windows.shape[1:3]
        q = self.q(windows).view(B, nW, N, heads, d).transpose(2, 3).reshape(B, nW * heads, N, d)
        kv = self.kv(windows).view(B, nW, N, 2, heads, d).permute(3, 0, 1, 4, 2, 5).reshape(2, B, nW * heads, N, d)
        mask = window_mask(H, W, wh, ww, 0, 0, x.device, q.dtype)
        if mask is not None:
            mask = mask.expand(nW, heads, N, N).reshape(1, nW * heads, N, N)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        out = window_merge(out.view(B, nW, heads, N, d).transpose(2, 3).reshape(B, nW, N, C), (wh, ww), Hp, Wp)
        return self.proj(out[:, :H, :W])
