"""The Gated CNN token mixer of MambaOut (Yu & Wang, 2024), the convolutional control of SS2D.

``fc1: C -> 2 * hidden`` (``hidden = int(expansion_ratio * C)``, as MambaOut rounds) is split into a
gate ``g`` (``hidden`` channels), an identity part ``i`` (``hidden - conv_channels``) and a conv part
``c`` (``conv_channels = int(conv_ratio * C)``, the last channels); ``c`` goes through a ``k x k``
depth-wise convolution (with bias, zero padding, any size) and the output is
``fc2(GELU(g) * cat(i, c))`` with ``fc2: hidden -> C``.

In MambaOut this is a whole block: it has its own norm and residual and replaces the MLP. Here only
the mixing part is the mixer; the unified block adds the norm, the residual and an MLP around it.
"""
from __future__ import annotations

import torch
from torch import nn

from . import TokenMixer, register_mixer


@register_mixer("gated_cnn")
class GatedCNN(TokenMixer):
    """``fc2(GELU(g) * cat(i, dwconv(c)))`` on a ``2 * hidden`` expansion (MambaOut).

    Args:
        kernel_size: odd side of the depth-wise kernel (MambaOut: 7).
        expansion_ratio: ``hidden / C`` (MambaOut: 8/3).
        conv_ratio: ``conv_channels / C``, the share of the value that is convolved (MambaOut: 1.0).
    """

    knobs = {"kernel_size": (3, 5, 7), "expansion_ratio": (1.0, 4 / 3, 2.0, 8 / 3)}

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        kernel_size: int = 7,
        expansion_ratio: float = 8 / 3,
        conv_ratio: float = 1.0,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        hidden, conv_channels = int(expansion_ratio * dim), int(conv_ratio * dim)
        if not 1 <= conv_channels <= hidden:
            raise ValueError(
                f"need 1 <= conv channels <= hidden channels, got int(conv_ratio * dim) = {conv_channels} and "
                f"int(expansion_ratio * dim) = {hidden} (dim {dim}, conv_ratio {conv_ratio}, "
                f"expansion_ratio {expansion_ratio})"
            )
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)  # g, i, c
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        g, i, c = self.fc1(x).split(self.split_sizes, dim=-1)  # (B, H, W, hidden | hidden - conv | conv)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(g) * torch.cat((i, c), dim=-1))
