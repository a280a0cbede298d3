"""The unified backbone of "Demystify Transformers & Convolutions in Modern Image Deep Networks".

One network, any spatial token mixer::

    stem      conv3x3/s2 (C/2) -> LN -> GELU -> conv3x3/s2 (C) -> LN            stride 4
    stage i   [conv3x3/s2, no bias -> LN]  (i > 0)
              blocks: x = x + drop_path(gamma1 * mixer(LN(x)))
                      x = x + drop_path(gamma2 * mlp(LN(x)))
              LN                                                 (stage norm)
    head      1x1 proj to 1.5*C4 (no bias) -> BatchNorm -> GELU -> global avg pool -> Linear

Tokens stay channels-last ``(B, H, W, C)`` from the stem to the head, so norms and projections
never permute; see :mod:`tokenmixers.mixers` for the mixer contract. Public feature maps
(``forward_features``, ``forward_intermediates``) are NCHW views of that memory.

The architecture is a :class:`tokenmixers.ModelCfg` (depths, widths, heads, mixer and its options,
...); ``UnifiedNet(cfg)`` builds it. Ablation switches of the paper's Table VI are fields too:
``norm_after_pool`` (B: LayerNorm after pooling), ``stage_norms=False`` (C: no stage norms) and
``block_style="convnext"`` (D: ConvNeXt block, ``x = x + drop_path(gamma * mlp(LN(mixer(x))))``).

:class:`StagedNet` is the timm surface (features, intermediates, classifier, checkpointing) of any
``stem -> stages -> head`` network; the published architectures of :mod:`tokenmixers.models` share
it, together with :class:`Block`, :class:`Stage` and :class:`Head`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.models import checkpoint_seq
from torch import nn

from .configs import ModelCfg
from .layers import check_batch_statistics
from .mixers import TokenMixer, create_mixer

MIN_INPUT_SIZE = 32
GLOBAL_POOLS = ("avg", "")


class Stem(nn.Module):
    """Overlapping stride-4 stem: ``(B, in_chans, H, W) -> (B, H/4, W/4, dim)``."""

    def __init__(self, in_chans: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2, eps=eps)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image -> channels-last tokens."""
        x = self.act(self.norm1(self.conv1(x).permute(0, 2, 3, 1)))
        return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (no bias) + LayerNorm: ``(B, H, W, C_in) -> (B, H/2, W/2, C_out)``."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution of channels-last tokens."""
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class AbsolutePosEmbed(nn.Module):
    """Learned absolute position embedding ``(1, C, h, w)``, bilinearly resized to the actual grid."""

    def __init__(self, dim: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid_size))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the embedding to ``(B, H, W, C)`` tokens."""
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[1:3]:
            pos = F.interpolate(pos, size=x.shape[1:3], mode="bilinear", align_corners=True)
        return x + pos.permute(0, 2, 3, 1)


class ConvPosEmbed(nn.Module):
    """Conditional position encoding (Twins' PEG, STViT's CPE): ``x + dwconv3x3(x)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add a depth-wise 3x3 convolution of ``(B, H, W, C)`` tokens to themselves."""
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` on channels-last tokens; :meth:`hidden` is everything before ``fc2``.

    Any MLP of a :class:`Block` has ``hidden`` and ``fc2``, so that the block can fold its layer scale into ``fc2``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, hidden)``: the part before the last projection."""
        return self.act(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return self.fc2(self.hidden(x))


class Block(nn.Module):
    """Transformer-style block around any mixer (or the ConvNeXt-style block, Table VI D)."""

    def __init__(
        self,
        dim: int,
        mixer: TokenMixer,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        layer_scale_init: Optional[float] = 1e-6,
        drop_path: float = 0.0,
        pos: Optional[nn.Module] = None,
        convnext_style: bool = False,
        pos_residual: bool = True,
    ) -> None:
        super().__init__()
        self.convnext_style = convnext_style
        self.pos = pos if pos is not None else nn.Identity()
        self.pos_residual = pos_residual  # False: the position encoding reaches only the mixer's input
        self.norm1 = nn.Identity() if convnext_style else nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.ls1 = nn.Identity() if convnext_style or not layer_scale_init else LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        z = self.pos(x)
        x = z if self.pos_residual else x
        if self.convnext_style:
            return x + self.drop_path(self.scaled_mlp(self.norm2(self.mixer(z))))
        x = x + self.drop_path(self.ls1(self.mixer(self.norm1(z))))
        return x + self.drop_path(self.scaled_mlp(self.norm2(x)))

    def scaled_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``ls2(mlp(x))``; in training, the layer scale folded into ``fc2``'s weights where that keeps less.

        Folded, ``fc2``'s output is neither scaled in a pass of its own nor kept for the scale's gradient; the
        scaled weights are kept instead. That is less wherever there are more tokens than hidden channels (every
        block at the training batches but the last stage's): a tiny model's training step then peaks below the
        official code's. Without autograd nothing is kept, and the output is scaled as written.
        """
        fc2 = self.mlp.fc2
        tokens = x.numel() // x.shape[-1]
        if not (isinstance(self.ls2, LayerScale) and torch.is_grad_enabled() and tokens > fc2.in_features):
            return self.ls2(self.mlp(x))
        gamma = self.ls2.gamma
        return F.linear(self.mlp.hidden(x), fc2.weight * gamma[:, None], fc2.bias * gamma)


class Stage(nn.Module):
    """Optional downsampling, a sequence of blocks and an optional stage norm (channels-last)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[Block], norm: nn.Module) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in) -> (B, H', W', C)``."""
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class Head(nn.Module):
    """1x1 projection (no bias) -> BatchNorm -> GELU -> pool [-> LayerNorm] -> dropout -> Linear.

    ``proj_bias`` and ``act_layer`` serve published heads (STViT: bias and Swish).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_classes: int,
        global_pool: str = "avg",
        norm_after_pool: bool = False,
        drop_rate: float = 0.0,
        *,
        proj_bias: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.global_pool = global_pool
        if hidden_dim:
            self.proj = nn.Linear(in_dim, hidden_dim, bias=proj_bias)
            self.bn = nn.BatchNorm2d(hidden_dim)
            self.act = act_layer()
        else:
            hidden_dim = in_dim
            self.proj, self.bn, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        self.hidden_dim = hidden_dim
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6) if norm_after_pool else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, H, W, C)`` tokens -> logits ``(B, classes)`` (or pooled / unpooled features)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            check_batch_statistics(self.training, x.shape[0] * x.shape[1] * x.shape[2], "the head")
        x = self.act(self.bn(self.proj(x).permute(0, 3, 1, 2)))  # NCHW view
        if self.global_pool == "avg":
            x = self.norm(x.mean((2, 3)))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


def _per_stage(value: Union[Any, Sequence[Any]], n: int) -> list[Any]:
    """Broadcast a scalar option to ``n`` stages (a per-stage tuple is checked by ``ModelCfg``)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _pos_embed(kind: Optional[str], dim: int, grid: tuple[int, int]) -> Optional[nn.Module]:
    """The position-encoding module of a block (or None)."""
    if kind == "absolute":
        return AbsolutePosEmbed(dim, grid)
    if kind == "conv":
        return ConvPosEmbed(dim)
    return None


def check_pool(global_pool: str, num_classes: int) -> None:
    """Validate the pooling mode; unpooled output has no classifier."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unknown global_pool {global_pool!r}; accepted: {', '.join(map(repr, GLOBAL_POOLS))}")
    if global_pool == "" and num_classes > 0:
        raise ValueError("global_pool='' returns unpooled feature maps and needs num_classes=0")


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rate of every block, per stage, rising linearly from 0 to ``rate`` over all blocks."""
    rates = torch.linspace(0, rate, sum(depths), device="cpu").tolist()
    return [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]


def stage_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> tuple[list[int], int]:
    """Stage indices to return (timm's convention: an int n means the last n) and the largest one."""
    if indices is None:
        indices = num_stages
    taken = list(range(num_stages - indices, num_stages)) if isinstance(indices, int) else [
        i + num_stages if i < 0 else i for i in indices
    ]
    if not taken or not all(0 <= i < num_stages for i in taken):
        raise ValueError(f"stage indices {indices!r} out of range for a model with {num_stages} stages")
    return taken, max(taken)


class StagedNet(nn.Module):
    """The timm model surface of a four-stage network: ``stem -> stages -> head`` on channels-last tokens.

    Shared by the unified backbone and the published architectures of :mod:`tokenmixers.models`. A
    subclass passes its typed config (with ``dims`` and ``mixer``) and timm's keyword arguments to
    ``__init__``, then builds ``stem`` (image -> ``(B, H/4, W/4, C)`` tokens), the stages
    (:meth:`_set_stages`: one :class:`Stage` per stride 4/8/16/32) and the head (:meth:`_set_head`).

    Args:
        cfg: the typed architecture config.
        in_chans, num_classes, global_pool, drop_rate: as in timm.
        **overrides: config fields to change, e.g. ``drop_path_rate=0.1`` (what
            ``timm.create_model(name, **kwargs)`` passes through).
    """

    head: Head
    head_hidden_size: int

    def __init__(
        self,
        cfg: Any,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **overrides: Any,
    ) -> None:
        super().__init__()
        check_pool(global_pool, num_classes)
        self.cfg = cfg.replace(**overrides) if overrides else cfg  # the resolved architecture, saved with the weights
        self.mixer: str = self.cfg.mixer
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features: int = self.cfg.dims[-1]
        self._initial_pool = global_pool  # for _set_head; the head owns the pooling afterwards

    def _set_stages(self, stages: Sequence[Stage]) -> None:
        """Install the stages (strides 4, 8, 16, 32) and describe their outputs for timm (``feature_info``)."""
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}") for i, dim in enumerate(self.cfg.dims)
        ]

    def _set_head(self, hidden_dim: int, **options: Any) -> None:
        """Install the :class:`Head` (``hidden_dim=0``: pool -> Linear) with the constructor's classifier settings."""
        self.head = Head(
            self.num_features, hidden_dim, self.num_classes, self._initial_pool, drop_rate=self.drop_rate, **options
        )
        self.head_hidden_size = self.head.hidden_dim

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: trunc-normal(0.02) weights and zero bias for every Linear/Conv2d."""
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.is_meta:  # meta: no values, five ops each for nothing
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- timm model surface -------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The mixers' position tables (names as in ``state_dict``)."""
        return {
            f"{name}.{p}"
            for name, module in self.named_modules()
            if isinstance(module, TokenMixer)
            for p in module.no_weight_decay()
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final Linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """Replace the classifier (``num_classes=0`` removes it); ``global_pool=''`` disables pooling."""
        if global_pool is not None:
            check_pool(global_pool, num_classes)
            self.head.global_pool = global_pool
        if reset_other:
            self.head.proj, self.head.bn, self.head.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.head.norm = nn.Identity()
            self.head.hidden_dim = self.head_hidden_size = self.num_features
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.head.hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head.fc)

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` that names the problem for anything but ``(B, in_chans, H>=32, W>=32)``."""
        if x.ndim != 4:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}{hint}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"create the model with in_chans={x.shape[1]} or convert the images"
            )
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(
                f"input {x.shape[2]}x{x.shape[3]} is below the minimum size {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; "
                "resize or pad the images"
            )
        weight = next(self.stem.parameters())  # the first conv's weight: the model's dtype
        if not x.is_floating_point():
            raise ValueError(f"input is {x.dtype}, the model needs floating-point images: convert and normalise them "
                             "first (timm's transforms give float32, e.g. x.float() / 255 then normalise)")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"input is {x.dtype} but the model's weights are {weight.dtype}: convert the input "
                             f"(x.to({weight.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Forward that also returns the stage outputs (NCHW, strides 4/8/16/32).

        Args:
            x: image batch ``(B, C, H, W)``.
            indices: last n stages if int, all if None, else the listed stage indices.
            norm: unused (stage outputs are already normalised by the stage norms).
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of stage outputs.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = stage_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested index (and the head); return the kept indices."""
        take_indices, max_index = stage_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` -> last stage map ``(B, C4, H/32, W/32)`` (NCHW view)."""
        self._check_input(x)
        return self.stages(self.stem(x)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last stage map (NCHW) -> logits, or the pooled features with ``pre_logits=True``."""
        return self.head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> logits."""
        return self.forward_head(self.forward_features(x))


class UnifiedNet(StagedNet):
    """The unified four-stage backbone with a pluggable spatial token mixer.

    Args:
        cfg: the architecture (:class:`tokenmixers.ModelCfg`; every field is documented there).
        in_chans, num_classes, global_pool, drop_rate: as in timm.
        img_size: the size the absolute position embeddings are built for (resized to other inputs).
        **overrides: ``ModelCfg`` fields to change, e.g. ``drop_path_rate=0.1`` or
            ``norm_after_pool=True`` (what ``timm.create_model(name, **kwargs)`` passes through).
    """

    def __init__(
        self,
        cfg: ModelCfg,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        img_size: Union[int, Sequence[int]] = 224,
        **overrides: Any,
    ) -> None:
        super().__init__(
            cfg, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate, **overrides
        )
        cfg = self.cfg
        n = len(cfg.depths)
        heads = [max(d // 32, 1) for d in cfg.dims] if cfg.heads is None else list(cfg.heads)
        stage_mixer_args = _per_stage(cfg.stage_mixer_args or {}, n)
        mlp_ratios = _per_stage(cfg.mlp_ratios, n)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        self.stem = Stem(in_chans, cfg.dims[0])
        dp_rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        stages = []
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            grid = (img_size[0] // 2 ** (i + 2), img_size[1] // 2 ** (i + 2))
            mixer_kwargs = {**cfg.mixer_args, **stage_mixer_args[i]}
            blocks = [
                Block(
                    dim,
                    create_mixer(cfg.mixer, dim, num_heads=heads[i], block_index=j, **mixer_kwargs),
                    mlp_ratio=mlp_ratios[i],
                    norm_eps=cfg.norm_eps,
                    layer_scale_init=cfg.layer_scale_init,
                    drop_path=dp_rates[i][j],
                    pos=_pos_embed(cfg.pos_embed, dim, grid) if cfg.pos_embed_blocks in (j, "all") else None,
                    convnext_style=cfg.block_style == "convnext",
                    pos_residual=cfg.pos_embed_residual,
                )
                for j in range(depth)
            ]
            stages.append(
                Stage(
                    nn.Identity() if i == 0 else Downsample(cfg.dims[i - 1], dim),
                    blocks,
                    nn.LayerNorm(dim, eps=1e-6) if cfg.stage_norms else nn.Identity(),
                )
            )
        self._set_stages(stages)

        hidden = int(cfg.dims[-1] * cfg.head_hidden_ratio)
        self._set_head(hidden, norm_after_pool=cfg.norm_after_pool)
        self.apply(self._init_weights)
        # The 3x3 kernels are stored channels-last, the layout of the tokens they read and write: an NCHW kernel is
        # copied to that layout in every forward and backward pass (the last downsampling kernel's copy, 10 MiB at
        # tiny scale, sits at the training step's peak), and on the NCHW image the stem then writes channels-last
        # tokens directly. After the init, whose random values fill memory in storage order.
        for part in (self.stem, *(stage.downsample for stage in self.stages)):
            part.to(memory_format=torch.channels_last)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables and embeddings (names as in ``state_dict``)."""
        names = super().no_weight_decay()
        for name, module in self.named_modules():
            if isinstance(module, Block):
                names |= {f"{name}.pos.{p}" for p, _ in module.pos.named_parameters()}
        return names
