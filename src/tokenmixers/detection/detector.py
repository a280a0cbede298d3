"""Mask R-CNN on torchvision with any tokenmixers backbone: mmdetection 2.x's ``mask_rcnn_r50_fpn``.

torchvision's ``GeneralizedRCNN`` with the official detection backbone (:mod:`tokenmixers.dense`), an FPN of
256 channels on its four maps plus P6 by max-pooling, and parts set as mmdetection 2.x sets them where
torchvision's defaults differ in ways that move AP (mmdet value, *torchvision default*):

* anchors of 32-512 px (scale 8 x strides 4-64), ratios 0.5/1/2, **not rounded** (*rounded to whole
  pixels*), on cells at the **fixed strides** 4-64 (*padded size // grid size, 61 instead of 64 for P6
  at 800 px*), so converted mmdet checkpoints see the same anchors;
* images resized keeping the ratio with **mmcv's rounding to nearest** (*down*), boxes scaled per axis;
* RPN and RoI-head box regression with an **L1 loss** (*smooth L1, beta 1/9*), normalised by the
  sampled anchors / RoIs as both libraries do;
* **1000 proposals** per image after NMS in training (*2000*); 2000 per level before NMS, 1000/1000
  in testing, NMS 0.7 (same);
* **RoIAlign with ``aligned=True`` and ``sampling_ratio=0``** (adaptive) (*aligned=False, 2*), each
  RoI from FPN level ``floor(log2(sqrt(wh) / 56))`` clamped to 0-3 (same rule);
* mask targets are the ground-truth masks RoIAligned (aligned) to 28x28 and **binarised at 0.5**
  (*not aligned, soft*);
* **mask pasting as mmdet**: each 28x28 mask is sampled bilinearly at the pixel centres of its box
  (``grid_sample``) and thresholded at 0.5 (*masks padded by one pixel, resized and pasted as
  probabilities*); the detector returns boolean masks at the original image size;
* head initialisation as mmdet: Xavier-uniform FPN convs and shared FCs, class scores N(0, 0.01),
  box deltas N(0, 0.001) (*PyTorch's default init*);
* boxes decoded with the log size change **clamped both ways** (*growth only*);
* RPN targets by **mmdet's assigner**: a ground truth's best anchors count only from IoU 0.3 and
  are assigned to it (*any IoU, each kept on its own best ground truth*);
* the rest is the same in both: 256 RPN anchors per image (half positive, IoU 0.7/0.3), 512 RoIs per
  image (25 % positive, IoU 0.5, ground truth added), box-delta weights 10/10/5/5, Shared2FC box head
  of 1024, 4-conv mask head, test score > 0.05, per-class NMS 0.5, 100 detections per image, images
  resized to 1333x800 keeping the ratio, ImageNet mean/std, batches padded to multiples of 32.

Labels are contiguous: 0 is background, 1..``num_classes`` the object classes (mmdet puts background
last; :mod:`tokenmixers.converters.mmdet` moves it).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..checkpoint import Checkpoint, CheckpointError, LoadReport, as_checkpoint, read_checkpoint
from ..dense import create_backbone
from ..files import atomic_write, atomic_write_text
from ..zoo import load_checkpoint
from .cascade import CascadeRoIHeads
from .data import rescale_size
from .ops import LEVELS, LevelRoIAlign, mask_loss

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FPN_CHANNELS = 256


class BackboneFPN(nn.Module):
    """A detection backbone followed by an FPN: ``(B, 3, H, W)`` -> maps ``'0'..'3'`` (strides 4-32) and ``'pool'``."""

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Image batch -> the five FPN levels."""
        return self.fpn(OrderedDict(zip(LEVELS, self.body(x))))


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet 2.x's ``AnchorGenerator(strides=[4, 8, 16, 32, 64], center_offset=0)`` in torchvision's interface.

    Two things differ from torchvision's: the base anchors are not rounded, and each level's stride is
    fixed (torchvision divides the padded size by the grid size, rounded down: at 800 px padded, P6's
    13 cells would sit every 61 px instead of every 64).
    """

    def __init__(self, sizes: Any, aspect_ratios: Any, strides: tuple[int, ...] = (4, 8, 16, 32, 64)) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def forward(self, image_list: Any, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """One ``(sum_l H_l W_l A, 4)`` anchor tensor per image: cells ``(x, y) * stride``, position-major."""
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides[:len(grid_sizes)]]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        """Each level's base anchors made afresh for the features' dtype and device (a few numbers; nothing kept from
        construction, so a detector built on the meta device and then materialised has them right)."""
        self.cell_anchors = [self.generate_anchors(s, r, dtype, device) for s, r in zip(self.sizes, self.aspect_ratios)]

    def generate_anchors(
        self, scales: list[int], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """Zero-centred ``(len(ratios) * len(scales), 4)`` anchors, ratio-major as in both libraries.

        Computed in float32 whatever the model's dtype, as mmdet does, so a float64 detector sees the
        same anchors as mmdet's float64 run."""
        scales_t = torch.as_tensor(scales, dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device))
        ws = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).to(dtype)


class MMDetBoxCoder(BoxCoder):
    """torchvision's box coder with mmdet's ``delta2bbox`` clamp: the log size change is clamped both ways (at
    +-log(1000 / 16)); torchvision clamps only growth, so a box shrunk further comes out thinner."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes from deltas, as mmdet decodes them."""
        codes = rel_codes.clone()
        _, _, ww, wh = self.weights
        codes[:, 2::4] = codes[:, 2::4].clamp(min=-self.bbox_xform_clip * ww)
        codes[:, 3::4] = codes[:, 3::4].clamp(min=-self.bbox_xform_clip * wh)
        return super().decode_single(codes, boxes)


class MaxIoUAssigner(Matcher):
    """mmdet's ``MaxIoUAssigner`` with ``match_low_quality=True``: each ground truth also takes its best anchors
    (all ties), but only when their IoU reaches ``min_pos_iou``, and they become *its* positives (a later ground
    truth wins an anchor two share). torchvision's low-quality matching ignores that floor and keeps each such
    anchor on its own best ground truth."""

    def __init__(self, high: float, low: float, min_pos_iou: float) -> None:
        super().__init__(high, low, allow_low_quality_matches=False)
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        """``(M ground truths, N anchors)`` IoUs -> ``(N,)`` matched index, or -1 (background) / -2 (ignored)."""
        matches = super().__call__(match_quality_matrix)
        best = match_quality_matrix.max(dim=1).values
        for i in range(len(best)):
            if best[i] >= self.min_pos_iou:
                matches[match_quality_matrix[i] == best[i]] = i
        return matches


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN with mmdet's assigner (:class:`MaxIoUAssigner`) and L1 box loss (smooth L1 with
    ``smooth_l1_beta > 0``, as the cascade configs have it)."""

    def __init__(self, *args: Any, smooth_l1_beta: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proposal_matcher = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)
        self.box_coder = MMDetBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(
        self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness BCE over the sampled anchors; L1 on the positive ones, divided by the sampled count."""
        pos, neg = self.fg_bg_sampler(labels)
        pos_idx, neg_idx = torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos_idx, neg_idx])
        targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos_idx], targets[pos_idx], reduction="sum",
                                    beta=self.smooth_l1_beta) / max(len(sampled), 1)  # beta 0: L1
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


def box_losses(
    class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor], targets: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Cross-entropy over the sampled RoIs and mmdet's L1 loss on the positive ones' class deltas."""
    labels_t, targets_t = torch.cat(labels), torch.cat(targets)
    pos = torch.where(labels_t > 0)[0]
    deltas = box_regression.reshape(len(labels_t), -1, 4)[pos, labels_t[pos]]
    return {
        "loss_classifier": F.cross_entropy(class_logits, labels_t),
        "loss_box_reg": F.l1_loss(deltas, targets_t[pos], reduction="sum") / max(len(labels_t), 1),
    }


class MMDetRoIHeads(RoIHeads):
    """torchvision's RoI heads with mmdet's training losses (L1 boxes, binarised aligned mask targets)."""

    def forward(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, torch.Tensor]]] = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Training: the losses; inference: torchvision's detections (boxes, labels, scores, mask probabilities)."""
        if not self.training:
            return super().forward(features, proposals, image_shapes)
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        losses = box_losses(class_logits, box_regression, labels, regression_targets)
        if self.has_mask():
            positive = [torch.where(lab > 0)[0] for lab in labels]
            boxes = [p[i] for p, i in zip(proposals, positive)]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
            losses["loss_mask"] = mask_loss(logits, boxes, [t["masks"] for t in targets],
                                            [m[i] for m, i in zip(matched, positive)],
                                            [lab[i] for lab, i in zip(labels, positive)])
        return [], losses


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> torch.Tensor:
    """mmdet's mask pasting: ``(N, M, M)`` probabilities in boxes -> ``(N, height, width)`` bool masks.

    Each mask is sampled bilinearly at the centres of the pixels around its box and thresholded.
    """
    out = torch.zeros((len(masks), height, width), dtype=torch.bool, device=masks.device)
    for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes.tolist())):
        xa, ya = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        xb, yb = min(int(x1) + 2, width), min(int(y1) + 2, height)
        if xb <= xa or yb <= ya:
            continue
        gx = (torch.arange(xa, xb, device=masks.device, dtype=mask.dtype) + 0.5 - x0) / max(x1 - x0, 1e-6) * 2 - 1
        gy = (torch.arange(ya, yb, device=masks.device, dtype=mask.dtype) + 0.5 - y0) / max(y1 - y0, 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        sampled = F.grid_sample(mask[None, None], grid, align_corners=False)[0, 0]
        out[i, ya:yb, xa:xb] = sampled >= threshold
    return out


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise / pad-to-32 with mmdet's resize (mmcv's rounding, boxes scaled per axis) and mask
    pasting on the way back."""

    def resize(self, image: torch.Tensor, target: Optional[dict[str, torch.Tensor]] = None,
               ) -> tuple[torch.Tensor, Optional[dict[str, torch.Tensor]]]:
        """One image (and its target) resized to fit the scale, as mmdet's ``Resize(keep_ratio=True)``."""
        h, w = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = rescale_size(h, w, short, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def postprocess(
        self, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to the original image size; masks pasted there as ``(N, 1, H, W)`` bool."""
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"][:, 0], pred["boxes"], *original)[:, None]
        return result


class DetectorSurface:
    """What the tasks ask of any detector here (Mask R-CNN, RetinaNet): its decay exemptions and test scale."""

    backbone: nn.Module
    transform: GeneralizedRCNNTransform

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's position tables and embeddings (names as in ``state_dict``)."""
        body = self.backbone.body
        names = body.no_weight_decay() if hasattr(body, "no_weight_decay") else set()
        return {f"backbone.body.{n}" for n in names}

    def set_test_scale(self, min_size: int, max_size: int) -> None:
        """The size images are resized to in eval mode (shorter side, longer side cap)."""
        self.transform.min_size = (min_size,)
        self.transform.max_size = max_size


class Detector(DetectorSurface, GeneralizedRCNN):
    """Mask R-CNN (or Faster R-CNN without masks) around a tokenmixers backbone.

    ``detector(images)`` takes a list of ``(3, H, W)`` float images in [0, 1]. In training mode it also
    takes targets (``boxes`` xyxy, ``labels`` 1..num_classes, ``masks`` (N, H, W) uint8) and returns
    the losses; in eval mode one dict per image: ``boxes`` (xyxy, original pixels), ``labels``,
    ``scores`` and, with masks, ``masks`` ``(N, 1, H, W)`` bool.
    """

    def __init__(self, backbone: BackboneFPN, rpn: MMDetRPN, roi_heads: MMDetRoIHeads, transform: DetectionTransform,
                 config: dict[str, Any]) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config  # the create_detector arguments that rebuild this detector
        self.num_classes = config["num_classes"]


def _init_like_mmdet(model: Detector) -> None:
    """mmdet's initialisation of the FPN and the box head (the RPN, the mask head and the cascade's heads already
    match)."""
    fpn_convs = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.Conv2d)]
    cascade = isinstance(model.roi_heads, CascadeRoIHeads)
    fc_layers = [] if cascade else [model.roi_heads.box_head.fc6, model.roi_heads.box_head.fc7]
    for layer in fc_layers + fpn_convs:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    if cascade:
        return
    predictor = model.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def create_detector(
    name: str,
    num_classes: int,
    *,
    masks: bool = True,
    variant: str = "official",
    backbone_weights: Optional[Union[str, Path]] = None,
    min_size: Union[int, tuple[int, ...]] = 800,
    max_size: int = 1333,
    rois_per_image: int = 512,
    fpn_channels: int = FPN_CHANNELS,
    anchor_scale: float = 8.0,
    cascade: bool = False,
    **backbone_kwargs: Any,
) -> Detector:
    """Mask R-CNN (mmdetection 2.x ``mask_rcnn_r50_fpn``), or Cascade Mask R-CNN, with the detection backbone of
    any model.

    Args:
        name: a registered unified model (also a user's, e.g. through ``--import``) or a timm model.
        num_classes: object classes (background not counted).
        masks: ``False`` builds Faster R-CNN (box-only data).
        variant: the backbone's ``"official"`` or ``"masked"`` behaviour (:mod:`.backbone`).
        backbone_weights: an ImageNet classification checkpoint for the backbone (official or ours).
        min_size, max_size: training/test resize (a tuple of shorter sides is multi-scale training:
            one is drawn per image; the last is used in eval mode).
        rois_per_image: RoIs sampled per training image for the heads (mmdet: 512).
        fpn_channels: width of the FPN, RPN and RoI heads (mmdet: 256). Fewer RoIs and a narrower
            FPN make a micro detector for small-data runs on a CPU.
        anchor_scale: anchor side in units of the level's stride (mmdet's ``octave_base_scale``: 8,
            i.e. 32-512 px); smaller suits small objects at a low resolution.
        cascade: Cascade Mask R-CNN as DWNet's configs build it (:mod:`.cascade`): three stages of 4conv1f box
            heads and mask heads, an RPN with smooth L1 (beta 1/9) and 2000 proposals per training image.
        **backbone_kwargs: ``ModelCfg`` fields or timm arguments, e.g. ``drop_path_rate=0.1``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, background not counted), got {num_classes}")
    body = create_backbone(name, variant=variant, weights=backbone_weights, **backbone_kwargs)
    backbone = BackboneFPN(body, fpn_channels)
    strides = (4, 8, 16, 32, 64)
    anchors = MMDetAnchorGenerator(tuple((anchor_scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * 5, strides)
    rpn = MMDetRPN(anchors, RPNHead(fpn_channels, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
                   positive_fraction=0.5, pre_nms_top_n=dict(training=2000, testing=1000),
                   post_nms_top_n=dict(training=2000 if cascade else 1000, testing=1000), nms_thresh=0.7,
                   smooth_l1_beta=1 / 9 if cascade else 0.0)
    roi_heads = CascadeRoIHeads(num_classes, fpn_channels, masks=masks, rois_per_image=rois_per_image) if cascade \
        else mask_rcnn_heads(num_classes, fpn_channels, masks, rois_per_image)
    sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
    transform = DetectionTransform(sizes, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32)
    config = dict(model=name, num_classes=num_classes, masks=masks, variant=variant, min_size=list(sizes),
                  max_size=max_size, rois_per_image=rois_per_image, fpn_channels=fpn_channels,
                  anchor_scale=anchor_scale, **({"cascade": True} if cascade else {}), **backbone_kwargs)
    detector = Detector(backbone, rpn, roi_heads, transform, config)
    _init_like_mmdet(detector)
    return detector


def mask_rcnn_heads(num_classes: int, fpn_channels: int, masks: bool, rois_per_image: int) -> MMDetRoIHeads:
    """Mask R-CNN's RoI heads: Shared2FC box head and 4-conv mask head, set up as mmdet's."""
    roi_heads = MMDetRoIHeads(
        LevelRoIAlign(7), TwoMLPHead(fpn_channels * 7 * 7, 1024), FastRCNNPredictor(1024, num_classes + 1),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=rois_per_image, positive_fraction=0.25, bbox_reg_weights=None,
        score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        mask_roi_pool=LevelRoIAlign(14) if masks else None,
        mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1) if masks else None,
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1) if masks else None,
    )
    roi_heads.box_coder = MMDetBoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    return roi_heads


# -- saving and loading --------------------------------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
CLASS_LAYERS = re.compile(r"^roi_heads\.(box_predictor\.|mask_predictor\.mask_fcn_logits\.|bbox_head\.\d+\.fc_(cls|reg)\.|"
                          r"mask_head\.\d+\.conv_logits\.)")
CLASS_KEYS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.bbox_head.0.fc_cls.weight")


def save_detector(detector: Detector, directory: Union[str, Path], categories: Optional[list[str]] = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (the ``create_detector`` arguments, category names)."""
    directory = Path(directory)
    state = {k: v.contiguous() for k, v in detector.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(safetensors.torch.save(state)))
    config = {**detector.config, "categories": categories or detector.config.get("categories")}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def holds_detector(checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint holds a whole detector (Mask R-CNN or cascade, ours or mmdetection's), not a classifier."""
    return any(key in checkpoint.state_dict for key in CLASS_KEYS)


def load_detector_weights(detector: Detector, checkpoint: Union[str, Path, Checkpoint, Mapping[str, Any]], *,
                          reset_heads: bool = False, entry: str = "auto") -> LoadReport:
    """Load a detection checkpoint (ours or mmdet's) into ``detector``, all or nothing; returns the report.

    A checkpoint with another number of classes is refused with a clear message, unless
    ``reset_heads`` asks to re-initialise the class-specific layers (box predictor, mask logits).
    """
    read = as_checkpoint(checkpoint, entry)
    state = read.weights(entry)
    own = detector.state_dict()
    notes = []
    if holds_detector(read) and read.num_classes != detector.num_classes:
        if not reset_heads:
            raise CheckpointError(
                f"checkpoint {read.path} predicts {read.num_classes} classes, the detector {detector.num_classes}; "
                f"the detector was left unchanged. To fine-tune on {detector.num_classes} classes, re-initialise the "
                "class-specific layers (box predictor, mask logits): reset_heads=True (command line: --reset-heads)."
            )
        state = {k: (own[k] if CLASS_LAYERS.match(k) else v) for k, v in state.items()}
        notes.append(f"class-specific layers re-initialised ({read.num_classes} -> {detector.num_classes} classes)")
    report = load_checkpoint(detector, read.with_weights(state))
    report.adapted += notes
    return report


def load_detector(
    checkpoint: Union[str, Path, Checkpoint], model: Optional[str] = None, num_classes: Optional[int] = None, *,
    reset_heads: bool = False, entry: str = "auto", **kwargs: Any,
) -> tuple[Detector, LoadReport]:
    """A detector rebuilt from a checkpoint (our folder or training checkpoint, or mmdet's with ``model``).

    Returns the detector and the load report. ``num_classes`` defaults to the checkpoint's; another
    value needs ``reset_heads=True``. ``kwargs`` go to :func:`create_detector` (e.g. ``min_size``).
    """
    read = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, entry)
    config = read.model_config
    name = model or read.model_name
    if not holds_detector(read):
        raise ValueError(f"{read.path} holds no detector (no box predictor): it is a classification checkpoint. "
                         f"To train a detector from it: tokenmixers detect train --model {name or '<model>'} "
                         f"--data <coco-folder> backbone_weights={read.path}")
    if name is None:
        raise ValueError(f"{read.path} does not say which backbone it was trained with: pass the model name "
                         "(e.g. model='unified_halo_tiny', command line --model)")
    options = {k: config[k] for k in ("variant", "max_size", "rois_per_image", "fpn_channels", "anchor_scale")
               if k in config}
    if "min_size" in config:
        options["min_size"] = tuple(config["min_size"])
    options.update(kwargs)
    masks = any(k.startswith(("roi_heads.mask_predictor.", "roi_heads.mask_head.")) for k in read.state_dict)
    cascade = "roi_heads.bbox_head.0.fc_cls.weight" in read.state_dict
    detector = create_detector(name, num_classes or read.num_classes, masks=masks, cascade=cascade, **options)
    detector.config["categories"] = config.get("categories")
    report = load_detector_weights(detector, read, reset_heads=reset_heads, entry=entry)
    return detector, report
