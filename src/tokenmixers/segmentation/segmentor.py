"""A segmentor: any backbone under a UPerNet or Semantic FPN head, mmsegmentation's ``EncoderDecoder``.

>>> from tokenmixers.segmentation import create_segmentor
>>> model = create_segmentor("unified_swin_tiny", num_classes=150).eval()
>>> model(images).shape            # (B, 150, H, W): logits at the input size

The parts keep mmseg's names (``backbone``, ``neck``, ``decode_head``, ``auxiliary_head``), so an
mmseg checkpoint of the same backbone loads with :func:`tokenmixers.load_checkpoint`; a classification
checkpoint of the backbone (official or ours) loads into the backbone with the heads left fresh.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, LoadReport, load_state, read_checkpoint
from ..converters.mmseg import HEADS as HEAD_PREFIXES
from ..dense import create_backbone, load_imagenet
from ..zoo import guess_architecture
from .data import IGNORE_INDEX
from .heads import FPN, HEADS, FCNHead, FPNHead, UPerHead, resize


class Segmentor(nn.Module):
    """Backbone (four maps, strides 4-32) -> optional neck -> decode head (+ auxiliary head in training).

    ``model(images)`` gives logits ``(B, num_classes, H, W)`` at the input size (mmseg's whole-image
    inference: decoded at stride 4, resized bilinearly); ``model(images, labels)`` gives the training
    losses: cross-entropy of the decode head and ``aux_weight`` x that of the auxiliary head, both
    on logits resized to the labels, averaged as mmseg averages: over all pixels, those of
    ``ignore_index`` counting zero.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, neck: Optional[nn.Module] = None,
                 auxiliary_head: Optional[nn.Module] = None, aux_weight: float = 0.4,
                 ignore_index: int = IGNORE_INDEX, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight, self.ignore_index = aux_weight, ignore_index
        self.num_classes: int = decode_head.num_classes
        self.config: dict[str, Any] = dict(config or {})

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps the heads see: the backbone's, through the neck when there is one."""
        maps = list(self.backbone(images))
        return self.neck(maps) if self.neck is not None else maps

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Any:
        """``(B, 3, H, W)`` -> logits ``(B, K, H, W)``; with ``labels`` ``(B, H', W')`` -> ``{loss name: loss}``."""
        maps = self.features(images)
        logits = self.decode_head(maps)
        if labels is None:
            return resize(logits, images.shape[2:])
        losses = {"loss_ce": self.loss(logits, labels)}
        if self.auxiliary_head is not None:
            losses["aux_loss_ce"] = self.aux_weight * self.loss(self.auxiliary_head(maps), labels)
        return losses

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """mmseg's cross-entropy: logits resized to the labels, mean over every pixel (ignored ones count 0)."""
        logits = resize(logits, labels.shape[-2:])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16 / bf16 up, float64 kept
        per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index, reduction="none")
        return per_pixel.mean()

    def no_weight_decay(self) -> set[str]:
        """The backbone's position tables and embeddings (as ``backbone.<name>``)."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in names}

    def load_from(self, checkpoint: Checkpoint, *, entry: str = "auto", strict: bool = True) -> LoadReport:
        """Load a segmentor checkpoint (mmseg's or ours) whole, or a backbone's weights with the heads fresh."""
        state = checkpoint.weights(entry)
        if any(k.startswith(HEAD_PREFIXES) for k in state):
            return load_state(self, checkpoint, entry=entry, strict=strict, guess=guess_architecture)
        report = load_imagenet(self.backbone, checkpoint, entry=entry)
        report.adapted.append("decode and auxiliary heads freshly initialised")
        return report


def create_segmentor(
    backbone: Union[str, nn.Module],
    num_classes: int,
    head: str = "upernet",
    *,
    channels: Optional[int] = None,
    auxiliary: Optional[bool] = None,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    neck_channels: int = 256,
    dropout: float = 0.1,
    pool_scales: tuple[int, ...] = (1, 2, 3, 6),
    ignore_index: int = IGNORE_INDEX,
    backbone_weights: Optional[Union[str, Path]] = None,
    **backbone_kwargs: Any,
) -> Segmentor:
    """A segmentor of any backbone, set up as mmseg's released configs set it up.

    Args:
        backbone: a registered model (its official dense backbone, with out norms), a published
            architecture (DWNet, STViT), any timm model with ``features_only``, or a module mapping
            images to four maps (strides 4-32) with an ``out_channels`` list.
        num_classes: classes of the label maps (150 for ADE20K).
        head: ``"upernet"`` (UPerHead 512 + FCN auxiliary head 256 on the third map, the Swin setting)
            or ``"semantic_fpn"`` (FPN neck 256 + FPNHead 128, no auxiliary head, the PVT setting).
        channels: the decode head's width (default 512 for UperNet, 128 for Semantic FPN).
        auxiliary: add the FCN auxiliary head (default: with UperNet only).
        backbone_weights: a classification checkpoint of the backbone (official or ours).
        **backbone_kwargs: ``variant``, ``drop_path_rate`` or other backbone arguments (see
            :func:`tokenmixers.detection.create_backbone`).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; accepted: {', '.join(HEADS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    name = backbone if isinstance(backbone, str) else None
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, weights=backbone_weights, **backbone_kwargs)
    elif backbone_weights is not None or backbone_kwargs:
        raise ValueError("backbone_weights and backbone arguments apply to a backbone given by name; "
                         "load weights into your module before passing it")
    widths = getattr(backbone, "out_channels", None)
    if not isinstance(widths, (list, tuple)) or len(widths) != 4:
        raise ValueError(f"the backbone must return four maps (strides 4, 8, 16, 32) and name their widths in "
                         f"an out_channels list of four; {type(backbone).__name__} has out_channels={widths!r}")
    auxiliary = head == "upernet" if auxiliary is None else auxiliary
    neck = None
    if head == "upernet":
        channels = channels or 512
        decode: nn.Module = UPerHead(widths, num_classes, channels, pool_scales, dropout)
        head_widths = list(widths)
    else:
        channels = channels or 128
        neck = FPN(widths, neck_channels)
        head_widths = [neck_channels] * 4
        decode = FPNHead(head_widths, num_classes, channels, dropout=dropout)
    aux = FCNHead(head_widths[2], num_classes, aux_channels, dropout=dropout) if auxiliary else None
    config = dict(model=name, num_classes=num_classes, head=head, channels=channels, auxiliary=auxiliary,
                  aux_channels=aux_channels, aux_weight=aux_weight, neck_channels=neck_channels,
                  ignore_index=ignore_index, **{k: v for k, v in backbone_kwargs.items() if k in ("variant", "drop_path_rate")})
    return Segmentor(backbone, decode, neck=neck, auxiliary_head=aux, aux_weight=aux_weight,
                     ignore_index=ignore_index, config=config)


def holds_segmentor(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint holds a whole segmentor (ours or mmsegmentation's), not only a backbone."""
    return "decode_head.conv_seg.weight" in checkpoint.state_dict


def load_segmentor(checkpoint: Union[str, Path, Checkpoint], model: Optional[str] = None, *,
                   entry: str = "auto", **kwargs: Any) -> tuple[Segmentor, LoadReport]:
    """A segmentor rebuilt from a checkpoint (our training checkpoint, or mmseg's with ``model``) and the load report.

    The head, its widths and the classes are read from the weights (and from our run's settings
    where it has them); ``kwargs`` go to :func:`create_segmentor` (e.g. ``variant``).
    """
    read = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, entry)
    state, config = read.weights(entry), read.model_config
    name = model or config.get("model") or read.model_name
    if not holds_segmentor(read):
        raise ValueError(f"{read.path} holds no segmentor (no decode_head.conv_seg): it is a backbone's checkpoint. "
                         f"To train a segmentor from it: tokenmixers segment train --model {name or '<model>'} "
                         f"--data <folder> backbone_weights={read.path}")
    if name is None:
        raise ValueError(f"{read.path} does not say which backbone it was trained with: pass the model name "
                         "(e.g. model='unified_swin_tiny', command line --model)")
    head = "semantic_fpn" if any(k.startswith("neck.") for k in state) else "upernet"
    options: dict[str, Any] = dict(channels=int(state["decode_head.conv_seg.weight"].shape[1]),
                                   auxiliary="auxiliary_head.conv_seg.weight" in state)
    if options["auxiliary"]:
        options["aux_channels"] = int(state["auxiliary_head.conv_seg.weight"].shape[1])
    if head == "semantic_fpn":
        options["neck_channels"] = int(state["neck.fpn_convs.0.conv.weight"].shape[0])
    options.update({k: config[k] for k in ("variant", "aux_weight", "ignore_index") if k in config})
    options.update(kwargs)
    segmentor = create_segmentor(name, int(state["decode_head.conv_seg.weight"].shape[0]), head, **options)
    segmentor.config.update({k: config[k] for k in ("classes", "scale", "test_mode") if k in config})
    if "classes" not in segmentor.config and read.class_names:
        segmentor.config["classes"] = read.class_names
    report = segmentor.load_from(read, entry=entry)
    return segmentor, report
