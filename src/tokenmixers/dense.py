"""Dense backbones (four maps, strides 4-32) for detection and segmentation: the official detection backbone of every
unified model, the published architectures' dense backbones, and any timm model.

The official Mask R-CNN backbone (STM-Evaluation, ``detection/mmdet_custom``) is not the
classification network's ``features_only``:

* the stage norms leave the data path: stage i feeds the next downsampling un-normed;
* each of the four outputs gets a new LayerNorm (eps 1e-6), ``out_norms.<i>`` (official
  ``out_norm_<i>``), used only on the map handed to the FPN;
* no head; the drop-path rate comes from the Mask R-CNN configs (micro 0.1, tiny and small 0.2,
  base 0.3);
* ``variant="official"`` (default) also reproduces what the official detection blocks do at sizes
  that are not multiples of the window: Halo and Swin zero-pad the map to whole windows and let the
  padding act as tokens, Swin shifts on odd blocks in every stage (even a map that fits one window),
  and PVT adds its (resized) position embedding to the attention input only, not to the residual
  path; at sizes that are not multiples of its reduction ratio PVT's key/value reduction drops the
  last rows and columns instead of padding them. ``variant="masked"`` keeps tokenmixers'
  classification behaviour (padding masked, a one-window map not shifted, the embedding on the
  residual path too, the reduction padded).

The same construction applies to every registered unified model (related mixers and a user's own);
any other timm model with ``features_only`` works through :class:`TimmBackbone`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import timm
import torch
from torch import nn

from .backbone import UnifiedNet
from .checkpoint import Checkpoint, LoadReport, group_keys, read_checkpoint
from .configs import ModelCfg
from .mixers import mixer_options
from .models import DWNet
from .models.dwnet import ConvBranch
from .zoo import check_model_name, create_model, is_registered, load_checkpoint, model_cfg, scale_of

VARIANTS = ("official", "masked")
DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3}  # the official Mask R-CNN configs
STRIDES = (4, 8, 16, 32)
_CLASSIFICATION_ONLY = re.compile(r"^(head\.|stages\.\d+\.norm\.)")


def detection_cfg(cfg: ModelCfg, variant: str = "official") -> ModelCfg:
    """A classification config turned into its detection backbone's: no stage norms, no head, the variant's options."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    changes: dict[str, Any] = dict(stage_norms=False, head_hidden_ratio=0.0)
    if variant == "official":
        official = {k: False for k in ("mask_padding", "pad_reduction") if k in mixer_options(cfg.mixer)}
        if official:
            changes["mixer_args"] = {**cfg.mixer_args, **official}
        if cfg.pos_embed == "absolute":
            changes["pos_embed_residual"] = False
    return cfg.replace(**changes)


def detection_drop_path(name: str) -> Optional[float]:
    """The official Mask R-CNN drop-path rate of a model's scale (``None`` for a model without one)."""
    scale = scale_of(name)
    return DROP_PATH.get(scale) if scale else None


class DetectionBackbone(UnifiedNet):
    """A unified model as the official detection backbone: ``(B, 3, H, W)`` -> four NCHW maps.

    Args:
        cfg: the classification architecture (turned into the detection one here).
        variant: ``"official"`` or ``"masked"`` (module docstring).
        out_indices: stages whose outputs are returned (the official configs: all four).
        in_chans, img_size: as for :class:`UnifiedNet`.
        **overrides: ``ModelCfg`` fields, e.g. ``drop_path_rate=0.1``.

    Attributes:
        out_channels: channels of each returned map; ``strides``: their strides.
    """

    def __init__(
        self,
        cfg: ModelCfg,
        *,
        variant: str = "official",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        in_chans: int = 3,
        img_size: Union[int, Sequence[int]] = 224,
        **overrides: Any,
    ) -> None:
        cfg = cfg.replace(**overrides) if overrides else cfg
        super().__init__(detection_cfg(cfg, variant), in_chans=in_chans, num_classes=0, global_pool="", img_size=img_size)
        self.variant = variant
        self.out_indices = tuple(out_indices)
        self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(self.cfg.dims[i], eps=1e-6) for i in self.out_indices})
        self.out_channels = [self.cfg.dims[i] for i in self.out_indices]
        self.strides = [STRIDES[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> one ``(B, C_i, H / s_i, W / s_i)`` map per out index, each through its out norm."""
        maps = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True, intermediates_only=True)
        return [self.out_norms[str(i)](m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, m in zip(self.out_indices, maps)]


class TimmBackbone(nn.Module):
    """Any timm model's ``features_only`` maps at strides 4, 8, 16, 32, as NCHW tensors."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__()
        with torch.device("meta"):
            probe = timm.create_model(name, features_only=True)
        reductions = probe.feature_info.reduction()
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"{name} has no feature maps at stride(s) {missing} (its strides: {reductions})")
        out_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES]
        self.model = timm.create_model(name, features_only=True, out_indices=out_indices, **kwargs)
        self.out_channels = self.model.feature_info.channels()
        self.strides = self.model.feature_info.reduction()
        self.nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> four NCHW maps."""
        maps = self.model(x)
        return [m.permute(0, 3, 1, 2) for m in maps] if self.nhwc else list(maps)

    def no_weight_decay(self) -> set[str]:
        """Position tables of the wrapped model, if it names any (a feature wrapper's inner model too)."""
        own = set(self.state_dict())
        for prefix, module in (("model.", self.model), ("model.model.", getattr(self.model, "model", None))):
            names = {f"{prefix}{n}" for n in getattr(module, "no_weight_decay", lambda: set())()}
            found = {n for n in own if any(n == t or n.startswith(f"{t}.") for t in names)}
            if found:
                return found
        return set()


class PublishedBackbone(nn.Module):
    """A published architecture (DWNet, STViT) as a dense backbone: ``(B, 3, H, W)`` -> four NCHW maps.

    Its stem and stages, each stage's output taken before the next downsampling, without the
    classification norm and head. DWNet as its official dense backbone (DemystifyLocalViT's mmseg /
    mmdet ``DWNet``): a BatchNorm on each output (``out_norms.<i>``, official ``norm<i>``) and the
    conv branch's input zero-padded to whole 7x7 windows at the bottom and right (so the padding
    passes the branch's first BatchNorm and ReLU, as there; ``variant="masked"``: no padding). STViT has no released dense code: its
    stage outputs are returned as they are.
    """

    def __init__(self, name: str, variant: str = "official", **kwargs: Any) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
        model = create_model(name, num_classes=0, **kwargs)
        self.stem, self.stages = model.stem, model.stages
        self.stages[-1].norm = nn.Identity()  # the classification norm
        self.out_channels = list(model.cfg.dims)
        self.strides = list(STRIDES)
        dense_norms = isinstance(model, DWNet)
        self.out_norms = nn.ModuleList(nn.BatchNorm2d(c) if dense_norms else nn.Identity() for c in self.out_channels)
        for module in self.modules():
            if isinstance(module, ConvBranch) and variant == "official":
                module.pad_to = model.cfg.kernel_size
        self.pretrained_cfg = {"architecture": name}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> one map per stage (strides 4-32), each through its out norm."""
        x, maps = self.stem(x), []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            maps.append(norm(x.permute(0, 3, 1, 2)))
        return maps


def create_backbone(
    name: str,
    *,
    variant: str = "official",
    drop_path_rate: Optional[float] = None,
    weights: Optional[Union[str, Path]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The detection backbone of a model: a module mapping ``(B, 3, H, W)`` to four NCHW maps (strides 4-32).

    Args:
        name: a registered unified model (the official detection backbone is built) or any timm model
            with ``features_only`` (e.g. ``twins_svt_small``).
        variant: ``"official"`` or ``"masked"`` (unified models; see the module docstring).
        drop_path_rate: default: the official Mask R-CNN rate of the model's scale.
        weights: an ImageNet classification checkpoint (official or ours) loaded as the official
            code does (:func:`load_imagenet`).
        **kwargs: ``ModelCfg`` fields (unified models) or timm ``create_model`` arguments.

    The returned module has ``out_channels`` and ``strides`` (one per map).
    """
    check_model_name(name)
    rate = drop_path_rate if drop_path_rate is not None else detection_drop_path(name)
    if not is_registered(name):
        if weights is not None:  # timm loads (and filters) its own weight files
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        return TimmBackbone(name, **({"drop_path_rate": rate} if rate is not None else {}), **kwargs)
    if not isinstance(model_cfg(name), ModelCfg):  # a published architecture (DWNet, STViT)
        model = PublishedBackbone(name, variant, **({"drop_path_rate": rate} if rate is not None else {}), **kwargs)
        if weights is not None:
            load_imagenet(model, weights)
        return model
    model = DetectionBackbone(model_cfg(name), variant=variant, **({"drop_path_rate": rate} if rate is not None else {}),
                              **kwargs)
    model.pretrained_cfg = {"architecture": name}
    if weights is not None:
        load_imagenet(model, weights)
    return model


def load_imagenet(backbone: nn.Module, path: Union[str, Path, Checkpoint], *, entry: str = "auto") -> LoadReport:
    """Load a classification checkpoint (official or ours, or timm's) into a dense backbone, as the official code does.

    The classifier head and the stage norms are dropped (a timm model's: what its features do not use), the out norms keep their fresh values (unless
    the checkpoint has them); everything else must fit exactly. All or nothing: on any mismatch a
    :class:`CheckpointError` names it (e.g. a checkpoint of another size) and the backbone is unchanged.
    """
    read = path if isinstance(path, Checkpoint) else read_checkpoint(path, entry)
    converted = read.weights(entry)
    if isinstance(backbone, TimmBackbone):  # timm's features_only keeps the classifier's names, minus its tail
        target = backbone.state_dict()
        prefix = max(("model.", "model.model."), key=lambda p: sum(f"{p}{k}" in target for k in converted))
        dropped = [k for k in converted if f"{prefix}{k}" not in target]
        kept = {f"{prefix}{k}": v for k, v in converted.items() if k not in dropped}
        report = load_checkpoint(backbone, read.with_weights(kept))
        if dropped:
            report.adapted.append(f"entries outside the feature maps dropped: {group_keys(dropped)}")
        return report
    dropped = [k for k in converted if _CLASSIFICATION_ONLY.match(k)]
    state = {k: v for k, v in converted.items() if k not in dropped}
    fresh = {k: v for k, v in backbone.state_dict().items() if k.startswith("out_norms.") and k not in state}
    report = load_checkpoint(backbone, read.with_weights({**state, **fresh}))
    if dropped:
        report.adapted.append(f"classification-only entries dropped (head, stage norms): {group_keys(dropped)}")
    if fresh:
        report.adapted.append(f"out norms freshly initialised: {group_keys(sorted(fresh))}")
    return report
