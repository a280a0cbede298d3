"""Segmentation heads as mmsegmentation (0.x and 1.x) defines them, in its parameter names.

mmseg's checkpoints load without renaming: every conv + norm + activation unit is a
:class:`ConvModule` (``conv``, ``bn``), every head ends in ``conv_seg`` behind a ``Dropout2d``.

* :class:`UPerHead` (UPerNet, Xiao et al. 2018): a pyramid pooling module on the last map, lateral
  1x1 and FPN 3x3 convs, top-down bilinear fusion, one 3x3 fusion conv;
* :class:`FCNHead`: the auxiliary head (one 3x3 conv on the third map, loss weight 0.4);
* :class:`FPN` (the neck, no norm) + :class:`FPNHead`: Semantic FPN (Kirillov et al. 2019).

Every resize is bilinear with ``align_corners=False`` (nearest in the FPN neck's top-down path),
to the size of the map it is added to, so any input size works.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvModule


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """``x`` resized to ``size`` (mmseg's ``resize`` with ``align_corners=False``)."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=False if mode == "bilinear" else None)


class DecodeHead(nn.Module):
    """What every mmseg decode head shares: ``Dropout2d`` then the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init of the classifier
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits of a feature map."""
        return self.conv_seg(self.dropout(feat))


class UPerHead(DecodeHead):
    """UPerNet's decode head on four maps (strides 4-32) -> logits at stride 4.

    Args:
        in_channels: channels of the four input maps.
        num_classes: output classes.
        channels: width of every internal map (512 in the released configs).
        pool_scales: output sizes of the pyramid pooling module on the last map.
        dropout: before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = list(in_channels)
        last = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(last, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(last + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last map with its pooled summaries, fused: ``(B, C_last, h, w) -> (B, channels, h, w)``."""
        pooled = [resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps -> ``(B, num_classes, H/4, W/4)``."""
        laterals = [conv(m) for conv, m in zip(self.lateral_convs, maps)] + [self.psp_forward(maps[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """mmseg's ``FCNHead`` as the auxiliary head: ``num_convs`` 3x3 convs on one map (``in_index``), no input concat."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 in_index: int = 2, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps -> logits at the stride of map ``in_index``."""
        return self.cls_seg(self.convs(maps[self.in_index]))


class FPN(nn.Module):
    """mmseg's (and mmdet's) ``FPN`` neck with one output per input: 1x1 laterals, nearest top-down, 3x3 outputs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=False, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, norm=False, act=False) for _ in in_channels)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Maps of any widths -> as many maps of ``out_channels``, same sizes."""
        laterals = [conv(m) for conv, m in zip(self.lateral_convs, maps)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], mode="nearest")
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]


class Upsample(nn.Module):
    """mmseg's ``Upsample(scale_factor=2)``: bilinear to twice the size (sizes computed, not a scale factor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w) -> (B, C, 2h, 2w)``."""
        return resize(x, [2 * s for s in x.shape[2:]])


class FPNHead(DecodeHead):
    """Semantic FPN's head: each FPN level upsampled to stride 4 by (3x3 conv, 2x up) steps, summed, classified.

    Args:
        in_channels: channels of each neck output (256 each in the released configs).
        num_classes: output classes.
        channels: width of the per-level branches (128).
        strides: the levels' strides.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128,
                 strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.scale_heads = nn.ModuleList()
        for c, stride in zip(in_channels, strides):
            steps: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(strides[0])))):
                steps.append(ConvModule(c if k == 0 else channels, channels, 3))
                if stride != strides[0]:
                    steps.append(Upsample())
            self.scale_heads.append(nn.Sequential(*steps))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps -> ``(B, num_classes, H/4, W/4)``."""
        out = self.scale_heads[0](maps[0])
        for head, m in zip(self.scale_heads[1:], maps[1:]):
            out = out + resize(head(m), out.shape[2:])
        return self.cls_seg(out)


HEADS = ("upernet", "semantic_fpn")


def pretty_head(head: str) -> str:
    """The name a head is published under."""
    return {"upernet": "UperNet", "semantic_fpn": "Semantic FPN"}[head]

