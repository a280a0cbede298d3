"""STViT (Huang et al., CVPR 2023): the published STViT-S/B/L.

    stem      4 x [3x3 conv -> GELU -> BatchNorm], strides 2/1/2/1, widths C/2, C/2, C, C   stride 4
    stage i   [3x3/2 conv -> BatchNorm]   (i > 0)
              blocks: x = x + dwconv3x3(x)                                       (CPE)
                      x = x + drop_path(gamma1 * super_token_attention(LN(x)))
                      x = x + drop_path(gamma2 * conv_ffn(BatchNorm(x)))
              conv_ffn: 1x1 conv (4C) -> GELU -> h + dwconv3x3(h) -> 1x1 conv
    head      1x1 conv (1024) -> BatchNorm -> Swish -> global avg pool -> Linear

The attention is the ``stvit`` mixer in its published form (``mask_padding=False``: zero padding
enters the super tokens as in the official code; super tokens of 8x8 / 4x4 cells in stages 1-2,
global attention in stages 3-4). Layer scale only where the config sets it (B and L: stages 3-4).
Fully convolutional: any input size >= 32, as the official model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbone import Block, ConvPosEmbed, Stage, StagedNet, drop_path_rates
from ..configs import STViTCfg
from ..layers import ChannelsLastBatchNorm
from ..mixers import TokenMixer, create_mixer


class ConvGeluNorm(nn.Sequential):
    """3x3 conv -> GELU -> BatchNorm (NCHW), the order of STViT's stem."""

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1)
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(out_dim)


class ConvStem(nn.Sequential):
    """Four 3x3 convs (strides 2, 1, 2, 1): ``(B, in_chans, H, W) -> (B, H/4, W/4, dim)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        half = dim // 2
        super().__init__(
            ConvGeluNorm(in_chans, half, 2), ConvGeluNorm(half, half, 1), ConvGeluNorm(half, dim, 2),
            ConvGeluNorm(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image -> channels-last tokens."""
        return super().forward(x).permute(0, 2, 3, 1)


class ConvDownsample(nn.Module):
    """3x3/2 conv (with bias) -> BatchNorm: ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution of channels-last tokens."""
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class ConvFFN(nn.Module):
    """1x1 conv -> GELU -> ``h + dwconv3x3(h)`` -> 1x1 conv on channels-last tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = ConvPosEmbed(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, hidden)``: the part before the last projection (see :class:`Mlp`)."""
        return self.dwconv(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return self.fc2(self.hidden(x))


class STViTBlock(Block):
    """The backbone block in STViT's form: CPE first, LayerNorm (eps 1e-6) -> attention, BatchNorm -> ConvFFN."""

    def __init__(self, dim: int, mixer: TokenMixer, mlp_ratio: float, layer_scale_init: float, drop_path: float) -> None:
        super().__init__(
            dim, mixer, mlp_ratio, norm_eps=1e-6, layer_scale_init=layer_scale_init, drop_path=drop_path,
            pos=ConvPosEmbed(dim),
        )
        self.norm2 = ChannelsLastBatchNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))


class STViT(StagedNet):
    """STViT built from a :class:`tokenmixers.STViTCfg`.

    Args:
        cfg: the architecture (every field is documented in :class:`tokenmixers.configs.STViTCfg`).
        **kwargs: timm's ``in_chans``, ``num_classes``, ``global_pool``, ``drop_rate`` and config fields to
            change, e.g. ``drop_path_rate=0.1`` (see :class:`tokenmixers.backbone.StagedNet`).
    """

    def __init__(self, cfg: STViTCfg, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        cfg = self.cfg
        self.stem = ConvStem(self.in_chans, cfg.dims[0])
        dp_rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        self._set_stages([
            Stage(
                ConvDownsample(cfg.dims[i - 1], dim) if i else nn.Identity(),
                [
                    STViTBlock(dim, self._attention(i, j), cfg.mlp_ratio, cfg.layer_scale_init[i], dp)
                    for j, dp in enumerate(dp_rates[i])
                ],
                nn.Identity(),
            )
            for i, dim in enumerate(cfg.dims)
        ])
        self._set_head(cfg.head_dim, proj_bias=True, act_layer=nn.SiLU)
        self._init_weights(self.head.fc)  # official init: trunc-normal Linear; the 1x1 convs keep PyTorch's default

    def _attention(self, stage: int, block: int) -> TokenMixer:
        """The published super-token attention of a block."""
        cfg = self.cfg
        return create_mixer(
            "stvit", cfg.dims[stage], num_heads=cfg.heads[stage], block_index=block, cell_size=cfg.cell_sizes[stage],
            n_iter=cfg.n_iter, qkv_bias=cfg.qkv_bias, mask_padding=False,
        )
