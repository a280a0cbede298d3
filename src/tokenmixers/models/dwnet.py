"""DWNet (Han et al., ICLR 2022): the published DWNet-T/B, dynamic DWNet-T/B and I-dynamic DWNet-T/B.

A Swin skeleton whose attention is replaced by a depth-wise convolution branch::

    stem      4x4/4 conv -> LayerNorm                                                  stride 4
    stage i   [Swin patch merging: 2x2 concat -> LayerNorm(4C) -> Linear(4C, 2C)]   (i > 0)
              blocks: x = x + drop_path(branch(x))              no norm before the branch
                      x = x + drop_path(mlp(BatchNorm(x)))      BatchNorm, not LayerNorm
              branch: 1x1 conv -> BN -> ReLU -> spatial op -> BN -> ReLU -> 1x1 conv -> BN
              LayerNorm after the last stage
    head      global avg pool -> Linear

The spatial operator is a registered mixer without its projections: ``dwconv`` (static 7x7
depth-wise conv with bias), ``dyn_dwconv`` (per-sample kernels from the pooled input, C -> C/4 ->
49*C) or ``idyn_dwconv`` (per-pixel kernels shared by ``group_channels`` channels, C -> C/4 -> 49*G).

Any input size >= 32: the stem pads the image to a multiple of 4 and patch merging pads odd maps at
the bottom/right (as the official detection backbone). At multiples of 32 this is exactly the
official classification model, which accepts only the size it was built for.

The official classification code (Atten4Vis/DemystifyLocalViT @ ce7c0b7) has three bugs; these models
follow the released checkpoints instead:

* the dynamic configs build a *static* model at HEAD (in ``DWBlock`` an ``if`` where an ``elif`` was
  meant replaces the ``DynamicDWConv`` by a static conv: 24.2M parameters instead of 51.1M); the
  released ``dynamic_dwnet_*`` weights hold the dynamic generator, so ``spatial="dynamic"`` builds it;
* ``DWNet.__init__`` indexes ``inhomo_heads`` that ``build_model`` passes only for the inhomogeneous
  type, so the static and dynamic configs fail with a ``TypeError`` (nothing to reproduce);
* the inhomogeneous op is a CUDA-only cupy kernel (and its module imports cupy and mmcv, so even the
  static model needs them); ``idyn_dwconv`` computes the same sum in plain PyTorch on any device.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging
from torch import nn

from ..backbone import Block, Head, Mlp, Stage, StagedNet, drop_path_rates
from ..configs import DWNetCfg
from ..layers import ChannelsLastBatchNorm
from ..mixers import TokenMixer, create_mixer


class ConvBranch(nn.Module):
    """DWNet's token mixer: 1x1 conv -> BN -> ReLU -> spatial op -> BN -> ReLU -> 1x1 conv -> BN."""

    def __init__(self, dim: int, spatial: TokenMixer) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.in_norm = ChannelsLastBatchNorm(dim)
        self.spatial = spatial
        self.spatial_norm = ChannelsLastBatchNorm(dim)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.out_norm = ChannelsLastBatchNorm(dim)
        self.act = nn.ReLU()
        self.pad_to = 0  # the official dense backbone pads the branch input to whole 7x7 windows (0: no padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        if self.pad_to:
            H, W = x.shape[1:3]
            x = F.pad(x, (0, 0, 0, -W % self.pad_to, 0, -H % self.pad_to))
            return self._branch(x)[:, :H, :W]
        return self._branch(x)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.in_norm(self.in_proj(x)))
        x = self.act(self.spatial_norm(self.spatial(x)))
        return self.out_norm(self.out_proj(x))


class DWNetBlock(Block):
    """The backbone block in DWNet's form: no norm before the branch, BatchNorm before the MLP, no layer scale."""

    def __init__(self, dim: int, branch: ConvBranch, mlp_ratio: float, drop_path: float) -> None:
        super().__init__(dim, branch, mlp_ratio, layer_scale_init=None, drop_path=drop_path)  # type: ignore[arg-type]
        self.norm1 = nn.Identity()
        self.norm2 = ChannelsLastBatchNorm(dim)


class DWNet(StagedNet):
    """DWNet built from a :class:`tokenmixers.DWNetCfg`.

    Args:
        cfg: the architecture (every field is documented in :class:`tokenmixers.configs.DWNetCfg`).
        **kwargs: timm's ``in_chans``, ``num_classes``, ``global_pool``, ``drop_rate`` and config fields to
            change, e.g. ``drop_path_rate=0.1`` (see :class:`tokenmixers.backbone.StagedNet`).
    """

    def __init__(self, cfg: DWNetCfg, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        cfg = self.cfg
        self.stem = PatchEmbed(
            None, 4, self.in_chans, cfg.dims[0], norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False,
            dynamic_img_pad=True,
        )
        dp_rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        last = len(cfg.depths) - 1
        self._set_stages([
            Stage(
                PatchMerging(cfg.dims[i - 1], dim) if i else nn.Identity(),
                [DWNetBlock(dim, ConvBranch(dim, self._spatial(i)), cfg.mlp_ratio, dp) for dp in dp_rates[i]],
                nn.LayerNorm(dim) if i == last else nn.Identity(),
            )
            for i, dim in enumerate(cfg.dims)
        ])
        self._set_head(0)
        # official init: trunc-normal for the true Linear layers; the 1x1 convs (Linear here) keep
        # PyTorch's default, which is the same for a Conv2d and a Linear of that fan-in
        for module in self.modules():
            if isinstance(module, (Mlp, PatchMerging, Head)):
                module.apply(self._init_weights)

    def _spatial(self, stage: int) -> TokenMixer:
        """The branch's spatial operator in ``stage``: a registered mixer without projections."""
        cfg, dim = self.cfg, self.cfg.dims[stage]
        groups = dim // cfg.group_channels[stage] if cfg.spatial == "inhomogeneous" else 1
        options = {} if cfg.spatial == "static" else {"reduction": cfg.reduction}
        return create_mixer(cfg.mixer, dim, num_heads=groups, kernel_size=cfg.kernel_size, projections=False, **options)
