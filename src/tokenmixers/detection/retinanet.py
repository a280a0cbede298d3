"""RetinaNet on torchvision with any tokenmixers backbone: mmdetection 2.x's ``retinanet_r50_fpn``.

Set up as Twins' "PVT setting" (``retinanet_*_fpn_1x_coco_pvt_setting.py``) runs it: an FPN of 256 channels on
the backbone's last three maps (C3-C5, strides 8-32, mmdet's ``start_level=1``) plus P6 by a 3x3 stride-2 conv on
C5 (``add_extra_convs='on_input'``) and P7 by a 3x3 stride-2 conv on P6 -- **without** a ReLU in between
(mmdet's ``relu_before_extra_convs=False``; torchvision's ``LastLevelP6P7`` applies one, and takes P5 rather than
C5 when C5 already has 256 channels). The rest as mmdet 2.28.2 (mmdet value, *torchvision default*):

* anchors ``octave_base_scale=4``, 3 scales per octave, ratios 0.5/1/2 on the **fixed strides** 8-128, base
  anchors computed in float32 and **not rounded** (:class:`~.detector.MMDetAnchorGenerator`);
* RetinaHead: 4 stacked 3x3 convs of 256 + ReLU per branch, class scores by sigmoid, initialised N(0, 0.01) with the
  class bias at prior 0.01 (same); FPN convs Xavier-uniform (*PyTorch's default*);
* box deltas with means 0 and stds 1, decoded as mmdet's ``delta2bbox`` (log-ratio clamped both ways) and clipped
  to the image;
* training: mmdet's ``MaxIoUAssigner`` (positive IoU 0.5, negative below 0.4, low-quality matches from IoU 0),
  focal loss (gamma 2, alpha 0.25) and L1 box loss, both summed and divided by the **positive anchors of the whole
  batch** (*per image, then averaged over images*; *L1 too*);
* testing as ``BaseDenseHead._get_bboxes_single``: per level, the sigmoid scores over ``score_thr`` 0.05 and, of
  those **(anchor, class) pairs**, the 1000 best (*the same*), decoded; then one class-aware NMS 0.5 over all
  levels (mmcv's ``batched_nms``) and the 100 best (*the same, by torchvision's ``batched_nms``*);
* images resized and normalised as Mask R-CNN (:class:`~.detector.DetectionTransform`).

Labels outside are 1..``num_classes`` (as the Mask R-CNN detector's); the class layer has no background row and
predicts mmdet's 0..``num_classes - 1``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, box_iou, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..checkpoint import Checkpoint, CheckpointError, LoadReport, as_checkpoint, read_checkpoint
from ..dense import create_backbone
from ..zoo import load_checkpoint
from .detector import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    DetectorSurface,
    MaxIoUAssigner,
    MMDetAnchorGenerator,
)
from .ops import batched_nms, decode_boxes, encode_boxes

FPN_CHANNELS = 256
STRIDES = (8, 16, 32, 64, 128)
RATIOS = (0.5, 1.0, 2.0)


class OctaveAnchorGenerator(MMDetAnchorGenerator):
    """mmdet's ``AnchorGenerator(octave_base_scale, scales_per_octave, ratios, strides)``: per level, anchors of
    side ``stride * octave_base_scale * 2**(i / scales_per_octave)`` for each ratio, computed in float32 exactly as
    mmdet does (``stride * (1 / sqrt(ratio)) * scale``), ratio-major, centred on ``stride * (x, y)``."""

    def __init__(self, octave_base_scale: float = 4.0, scales_per_octave: int = 3,
                 ratios: tuple[float, ...] = RATIOS, strides: tuple[int, ...] = STRIDES) -> None:
        # set first: the parent's constructor already generates the base anchors
        self.octave_scales = [2 ** (i / scales_per_octave) * octave_base_scale for i in range(scales_per_octave)]
        super().__init__(tuple((s,) for s in strides), (ratios,) * len(strides), strides)

    def num_anchors_per_location(self) -> list[int]:
        """Anchors per cell on each level: ratios x scales."""
        return [len(r) * len(self.octave_scales) for r in self.aspect_ratios]

    def generate_anchors(
        self, scales: list[int], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """Zero-centred ``(len(ratios) * len(scales), 4)`` base anchors of the level whose stride is ``scales[0]``."""
        stride = scales[0]
        octave = torch.tensor(self.octave_scales, dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device))
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * octave[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * octave[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1).to(dtype)


class ExtraConvs(ExtraFPNBlock):
    """mmdet's extra FPN levels ``add_extra_convs='on_input'``: P6 = conv3x3/2(C5), P7 = conv3x3/2(P6)."""

    def __init__(self, in_channels: int, out_channels: int, relu_before_p7: bool = False) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.relu_before_p7 = relu_before_p7

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor], names: list[str],
                ) -> tuple[list[torch.Tensor], list[str]]:
        """Append P6 (from the last input map) and P7."""
        p6 = self.p6(x[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return results + [p6, p7], names + ["p6", "p7"]


class BackboneRetinaFPN(nn.Module):
    """A detection backbone followed by mmdet's RetinaNet FPN: maps ``'0'..'2'`` (strides 8-32), ``p6``, ``p7``."""

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS) -> None:
        super().__init__()
        self.body = body
        channels = list(body.out_channels)[1:]
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=ExtraConvs(channels[-1], out_channels))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Image batch -> the five FPN levels (strides 8-128)."""
        maps = list(self.body(x))[1:]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class MMDetRetinaNet(DetectorSurface, RetinaNet):
    """RetinaNet around a tokenmixers backbone, trained and tested as mmdetection 2.28.2's.

    ``detector(images)`` takes a list of ``(3, H, W)`` float images in [0, 1]; in training mode also targets
    (``boxes`` xyxy, ``labels`` 1..num_classes) and returns ``classification`` and ``bbox_regression`` losses; in
    eval mode one dict per image: ``boxes`` (xyxy, original pixels), ``labels`` (1..num_classes), ``scores``.
    """

    def __init__(self, backbone: BackboneRetinaFPN, num_classes: int, transform: DetectionTransform,
                 config: dict[str, Any], anchor_scale: float = 4.0, scales_per_octave: int = 3) -> None:
        anchors = OctaveAnchorGenerator(anchor_scale, scales_per_octave)
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
        super().__init__(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=0.05,
                         nms_thresh=0.5, detections_per_img=100, topk_candidates=1000)
        self.transform = transform
        self.proposal_matcher = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0)
        self.config = config
        self.num_classes = num_classes
        self.focal_alpha, self.focal_gamma = 0.25, 2.0

    def compute_loss(self, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor],
                     anchors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """mmdet's RetinaNet losses: focal and L1, summed over the batch and divided by its positive anchors."""
        cls_logits, bbox_reg = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        cls_terms, box_terms, num_pos = [], [], 0
        for i, (target, image_anchors) in enumerate(zip(targets, anchors)):
            boxes = target["boxes"]
            if boxes.numel() == 0:
                matched = torch.full((len(image_anchors),), -1, dtype=torch.long, device=image_anchors.device)
            else:
                matched = self.proposal_matcher(box_iou(boxes.to(image_anchors), image_anchors))
            pos = matched >= 0
            valid = matched != self.proposal_matcher.BETWEEN_THRESHOLDS
            gt_classes = torch.zeros_like(cls_logits[i])
            if pos.any():
                gt_classes[pos, target["labels"][matched[pos]] - 1] = 1.0
                deltas = encode_boxes(image_anchors[pos], boxes[matched[pos]].to(image_anchors))
                box_terms.append(F.l1_loss(bbox_reg[i][pos], deltas.to(bbox_reg), reduction="sum"))
            cls_terms.append(sigmoid_focal_loss(cls_logits[i][valid], gt_classes[valid], alpha=self.focal_alpha,
                                                gamma=self.focal_gamma, reduction="sum"))
            num_pos += int(pos.sum())
        norm = max(num_pos, 1)
        box_loss = torch.stack(box_terms).sum() if box_terms else bbox_reg.sum() * 0
        return {"classification": torch.stack(cls_terms).sum() / norm, "bbox_regression": box_loss / norm}

    def postprocess_detections(self, head_outputs: dict[str, list[torch.Tensor]], anchors: list[list[torch.Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """mmdet 2.28.2's ``_get_bboxes_single`` + ``_bbox_post_process`` at input scale (labels 1..num_classes)."""
        detections = []
        for index, (image_anchors, shape) in enumerate(zip(anchors, image_shapes)):
            all_boxes, all_scores, all_labels = [], [], []
            for level, level_anchors in enumerate(image_anchors):
                scores = torch.sigmoid(head_outputs["cls_logits"][level][index])
                deltas = head_outputs["bbox_regression"][level][index]
                keep = torch.nonzero(scores > self.score_thresh)
                kept = scores[keep[:, 0], keep[:, 1]]
                kept, order = kept.sort(descending=True)
                top = keep[order[: self.topk_candidates]]
                all_scores.append(kept[: self.topk_candidates])
                all_labels.append(top[:, 1])
                all_boxes.append(decode_boxes(level_anchors[top[:, 0]].to(deltas), deltas[top[:, 0]], shape))
            boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep] + 1})
        return detections


def _init_like_mmdet(model: MMDetRetinaNet) -> None:
    """mmdet's FPN initialisation (Xavier-uniform, zero bias); torchvision's RetinaNet head already matches."""
    for layer in model.backbone.fpn.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def create_retinanet(
    name: str,
    num_classes: int,
    *,
    variant: str = "official",
    backbone_weights: Optional[Union[str, Path]] = None,
    min_size: Union[int, tuple[int, ...]] = 800,
    max_size: int = 1333,
    **backbone_kwargs: Any,
) -> MMDetRetinaNet:
    """RetinaNet (mmdetection 2.x ``retinanet_r50_fpn`` in Twins' PVT setting) with the backbone of any model.

    Args:
        name: a registered unified model (also a user's) or a timm model.
        num_classes: object classes (labels 1..num_classes; no background class).
        variant: the backbone's ``"official"`` or ``"masked"`` behaviour.
        backbone_weights: an ImageNet classification checkpoint for the backbone.
        min_size, max_size: training/test resize (a tuple of shorter sides is multi-scale training).
        **backbone_kwargs: ``ModelCfg`` fields or timm arguments, e.g. ``drop_path_rate=0.1``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    body = create_backbone(name, variant=variant, weights=backbone_weights, **backbone_kwargs)
    sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
    transform = DetectionTransform(sizes, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32)
    config = dict(detector="retinanet", model=name, num_classes=num_classes, variant=variant, min_size=list(sizes),
                  max_size=max_size, **backbone_kwargs)
    model = MMDetRetinaNet(BackboneRetinaFPN(body), num_classes, transform, config)
    _init_like_mmdet(model)
    norms = getattr(body, "out_norms", None)
    if isinstance(norms, nn.ModuleDict) and "0" in norms:
        norms["0"].requires_grad_(False)  # C2's out norm feeds nothing here (the FPN starts at C3): DDP wants no idle one
    return model


CLASS_LAYER = "head.classification_head.cls_logits."


def load_retinanet_weights(model: MMDetRetinaNet, checkpoint: Union[str, Path, Checkpoint, Mapping[str, Any]], *,
                           reset_heads: bool = False, entry: str = "auto") -> LoadReport:
    """Load a RetinaNet checkpoint (ours or mmdet's) into ``model``, all or nothing; returns the report.

    A checkpoint with another number of classes is refused unless ``reset_heads`` re-initialises the class layer.
    """
    read = as_checkpoint(checkpoint, entry)
    state, own = read.weights(entry), model.state_dict()
    key, notes = CLASS_LAYER + "weight", []
    if key in state and state[key].shape != own[key].shape:
        if not reset_heads:
            raise CheckpointError(
                f"checkpoint {read.path}'s class layer has {state[key].shape[0]} outputs, the detector's "
                f"{own[key].shape[0]}; the detector was left unchanged. To fine-tune, re-initialise the class layer: "
                "reset_heads=True.")
        state = {k: (own[k] if k.startswith(CLASS_LAYER) else v) for k, v in state.items()}
        notes.append("class layer re-initialised")
    report = load_checkpoint(model, read.with_weights(state))
    report.adapted += notes
    return report


def holds_retinanet(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint holds a whole RetinaNet (ours or mmdetection's, converted)."""
    return CLASS_LAYER + "weight" in checkpoint.state_dict


def load_retinanet(checkpoint: Union[str, Path, Checkpoint], model: Optional[str] = None,
                   num_classes: Optional[int] = None, *, entry: str = "auto", **kwargs: Any,
                   ) -> tuple[MMDetRetinaNet, LoadReport]:
    """A RetinaNet rebuilt from a checkpoint (our training checkpoint or folder, or mmdet's with ``model``)."""
    read = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, entry)
    config, name = read.model_config, model or read.model_name
    if name is None:
        raise ValueError(f"{read.path} does not say which backbone it was trained with: pass the model name "
                         "(e.g. model='unified_halo_tiny', command line --model)")
    classes = int(read.state_dict[CLASS_LAYER + "weight"].shape[0]) // 9  # 9 anchors per location
    options = {k: config[k] for k in ("variant", "max_size") if k in config}
    if "min_size" in config:
        options["min_size"] = tuple(config["min_size"])
    model_ = create_retinanet(name, num_classes or classes, **{**options, **kwargs})
    model_.config["categories"] = config.get("categories")
    return model_, load_retinanet_weights(model_, read, entry=entry)
