"""Cascade Mask R-CNN's RoI heads as mmdetection 2.x's ``CascadeRoIHead``, with DWNet's "4conv1f" box heads.

DWNet reports COCO with Cascade Mask R-CNN in the Swin 3x setting (DemystifyLocalViT, ``downstreams/detection/
configs/dwnet/cascade_mask_rcnn_*_giou_4conv1f_adamw_3x_coco.py`` over ``_base_/models/
cascade_mask_rcnn_dwnet_fpn.py``; the tiny/base configs replace the base's box heads). What it computes:

* **three stages** with IoU thresholds 0.5 / 0.6 / 0.7 (positive = negative threshold, no low-quality matches),
  512 RoIs sampled per image and stage (25 % positive, ground truths added as proposals), losses weighted
  1 / 0.5 / 0.25 and named ``s<stage>.loss_cls|loss_bbox|loss_mask`` as mmdet names them;
* each stage's **box head** ``ConvFCBBoxHead``: 4 shared 3x3 convs of 256 (conv without bias -> BatchNorm ->
  ReLU; mmdet's SyncBN: the run engine converts BatchNorm under DDP), 1 shared fc of 1024 + ReLU, a class layer
  of ``num_classes + 1`` (background **last**, as mmdet) and a **class-specific** box layer of
  ``4 * num_classes`` (``reg_class_agnostic=False`` in DWNet's config, overriding the base's ``True``);
* box deltas scaled by per-stage stds (0.1, 0.1, 0.2, 0.2) / (0.05, 0.05, 0.1, 0.1) / (0.033, 0.033, 0.067,
  0.067), decoded as mmdet's ``delta2bbox`` and clipped to the image; trained by **GIoU on the decoded boxes**
  (``reg_decoded_bbox=True``, weight 10, averaged over all sampled RoIs) and cross-entropy;
* each stage's sampled RoIs, refined by its own regression (by the ground-truth class for positives, the best
  non-background class otherwise) and without the ground truths added as proposals, are the next stage's
  proposals; in testing all proposals go through the three stages the same way;
* test scores: the **mean of the three stages' class logits**, softmaxed; boxes from the last stage's regression;
  mmdet's ``multiclass_nms`` (score > 0.05, class-aware NMS 0.5, 100 per image);
* one ``FCNMaskHead`` per stage (4 convs of 256 + ReLU, a 2x transposed conv + ReLU, a 1x1 conv to
  ``num_classes`` 28x28 logits), trained on that stage's positive RoIs; in testing the three heads run on the
  final boxes and their **sigmoid probabilities are averaged** (mmdet's ``merge_aug_masks``) before pasting.

Module names are mmdet's (``bbox_head.<i>.shared_convs.<j>.conv``, ``.bn``, ``shared_fcs.0``, ``fc_cls``,
``fc_reg``, ``mask_head.<i>.convs.<j>.conv``, ``upsample``, ``conv_logits``) and the class layout is mmdet's, so a
converted checkpoint's RoI head loads without reordering. Labels handed in and out are 1..``num_classes`` as for
the other detectors here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou

from ..layers import ConvModule
from .ops import LevelRoIAlign, batched_nms, decode_boxes, giou_loss, mask_loss

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
GIOU_WEIGHT = 10.0


class ConvFCBBoxHead(nn.Module):
    """mmdet's ``ConvFCBBoxHead`` with shared layers only: ``(N, C, 7, 7)`` RoI features -> class logits
    ``(N, num_classes + 1)`` and class-specific deltas ``(N, 4 * num_classes)``."""

    def __init__(self, num_classes: int, in_channels: int = 256, num_convs: int = 4, num_fcs: int = 1,
                 fc_channels: int = 1024, roi_size: int = 7) -> None:
        super().__init__()
        self.shared_convs = nn.ModuleList(ConvModule(in_channels, in_channels, 3) for _ in range(num_convs))
        widths = [in_channels * roi_size * roi_size] + [fc_channels] * num_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.fc_cls = nn.Linear(widths[-1], num_classes + 1)
        self.fc_reg = nn.Linear(widths[-1], 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        for layer, std in ((self.fc_cls, 0.01), (self.fc_reg, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI features -> (class logits, deltas)."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """mmdet's ``FCNMaskHead``: ``(N, C, 14, 14)`` RoI features -> ``(N, num_classes, 28, 28)`` mask logits."""

    def __init__(self, num_classes: int, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvModule(channels, channels, 3, norm=False) for _ in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RoI features -> mask logits."""
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class CascadeRoIHeads(nn.Module):
    """The three-stage cascade in torchvision's RoI-heads interface (see the module docstring).

    ``forward(features, proposals, image_shapes, targets)`` returns ``([], losses)`` in training and
    ``(detections, {})`` in eval mode: per image ``boxes`` (xyxy, in the resized image), ``labels``
    (1..num_classes), ``scores`` and, with masks, ``masks`` ``(N, 1, 28, 28)`` probabilities.
    """

    def __init__(self, num_classes: int, channels: int = 256, *, masks: bool = True, rois_per_image: int = 512,
                 stage_ious: Sequence[float] = STAGE_IOUS, stage_stds: Sequence[Sequence[float]] = STAGE_STDS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100) -> None:
        super().__init__()
        if not len(stage_ious) == len(stage_stds) == len(stage_loss_weights):
            raise ValueError(f"one IoU threshold, std and loss weight per stage: got {len(stage_ious)}, "
                             f"{len(stage_stds)} and {len(stage_loss_weights)}")
        self.num_classes = num_classes
        self.stage_ious = tuple(stage_ious)
        self.stage_stds = tuple(tuple(s) for s in stage_stds)
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.sampler = BalancedPositiveNegativeSampler(rois_per_image, 0.25)
        self.bbox_roi_extractor = LevelRoIAlign(7)
        self.bbox_head = nn.ModuleList(ConvFCBBoxHead(num_classes, channels) for _ in self.stage_ious)
        self.mask_roi_extractor = LevelRoIAlign(14) if masks else None
        self.mask_head = nn.ModuleList(FCNMaskHead(num_classes, channels) for _ in self.stage_ious) if masks else None

    def has_mask(self) -> bool:
        """Whether the heads predict masks."""
        return self.mask_head is not None

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: Optional[list[dict[str, torch.Tensor]]] = None,
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Training: the losses of every stage; inference: the detections."""
        if self.training:
            if targets is None:
                raise ValueError("the cascade heads need targets in training mode")
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def stage(self, i: int, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``i``'s class logits and deltas for boxes ``[(N_j, 4)]`` (all images, concatenated)."""
        return self.bbox_head[i](self.bbox_roi_extractor(features, boxes))

    def decode(self, i: int, boxes: torch.Tensor, deltas: torch.Tensor,
               max_shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Stage ``i``'s boxes from ``(N, 4 * K)`` deltas: ``(N, 4 * K)``, class by class as mmdet decodes them."""
        k = deltas.shape[1] // 4
        decoded = decode_boxes(boxes.repeat(1, k).reshape(-1, 4), deltas.reshape(-1, 4), max_shape, self.stage_stds[i])
        return decoded.reshape(len(boxes), 4 * k)

    def refine(self, i: int, boxes: list[torch.Tensor], labels: torch.Tensor, deltas: torch.Tensor,
               image_shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each box moved by stage ``i``'s regression for its class (mmdet's ``regress_by_class``), clipped."""
        picked = deltas.reshape(len(labels), -1, 4)[torch.arange(len(labels), device=labels.device), labels]
        return [self.decode(i, b, d, shape) for b, d, shape in
                zip(boxes, picked.split([len(b) for b in boxes]), image_shapes)]

    def sample(self, i: int, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Stage ``i``'s RoIs per image: boxes, mmdet labels (``num_classes`` = background), matched ground truth
        (-1: none) and whether each RoI is a ground truth added as a proposal."""
        matcher = Matcher(self.stage_ious[i], self.stage_ious[i], allow_low_quality_matches=False)
        flags, candidates, matches = [], [], []
        for boxes, target in zip(proposals, targets):
            gt = target["boxes"].to(boxes)
            boxes = torch.cat([boxes, gt])
            if len(gt):
                matched = matcher(box_iou(gt, boxes))
            else:
                matched = torch.full((len(boxes),), -1, dtype=torch.long, device=boxes.device)
            flags.append((matched >= 0).long() - (matched < -1).long())  # 1 positive, 0 negative
            candidates.append(boxes)
            matches.append(matched)
        positive, negative = self.sampler(flags)
        rois, labels, matched_gt, is_gt = [], [], [], []
        for boxes, matched, target, pos, neg, n in zip(candidates, matches, targets, positive, negative, proposals):
            keep = torch.cat([torch.where(pos)[0], torch.where(neg)[0]])  # positives first, as mmdet samples
            m = matched[keep].clamp(min=-1)
            label = torch.full_like(m, self.num_classes)
            label[m >= 0] = target["labels"][m[m >= 0]] - 1
            rois.append(boxes[keep])
            labels.append(label)
            matched_gt.append(m)
            is_gt.append(keep >= len(n))
        return rois, labels, matched_gt, is_gt

    def losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """mmdet's ``CascadeRoIHead.forward_train``: every stage's weighted losses, proposals refined in between."""
        losses: dict[str, torch.Tensor] = {}
        proposals = [p.detach() for p in proposals]
        for i, weight in enumerate(self.stage_loss_weights):
            rois, labels, matched, is_gt = self.sample(i, proposals, targets)
            logits, deltas = self.stage(i, features, rois)
            labels_t = torch.cat(labels)
            pos = torch.where(labels_t < self.num_classes)[0]
            losses[f"s{i}.loss_cls"] = weight * F.cross_entropy(logits, labels_t)
            if len(pos):
                decoded = self.decode(i, torch.cat(rois)[pos], deltas[pos]).reshape(len(pos), -1, 4)
                gt = torch.cat([t["boxes"].to(r)[m.clamp(min=0)] for t, r, m in zip(targets, rois, matched)])[pos]
                box_loss = giou_loss(decoded[torch.arange(len(pos)), labels_t[pos]], gt).sum() / len(labels_t)
            else:
                box_loss = deltas.sum() * 0
            losses[f"s{i}.loss_bbox"] = weight * GIOU_WEIGHT * box_loss
            if self.mask_head is not None:
                keep = [lab < self.num_classes for lab in labels]
                boxes = [r[k] for r, k in zip(rois, keep)]
                logits_m = self.mask_head[i](self.mask_roi_extractor(features, boxes))
                losses[f"s{i}.loss_mask"] = weight * mask_loss(
                    logits_m, boxes, [t["masks"] for t in targets], [m[k] for m, k in zip(matched, keep)],
                    [lab[k] for lab, k in zip(labels, keep)])
            if i < len(self.stage_loss_weights) - 1:
                with torch.no_grad():
                    best = logits[:, :-1].argmax(1)
                    refined = self.refine(i, rois, torch.where(labels_t == self.num_classes, best, labels_t),
                                          deltas, image_shapes)
                proposals = [r[~g] for r, g in zip(refined, is_gt)]
        return losses

    def detect(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """mmdet's ``CascadeRoIHead.simple_test`` (without rescaling: boxes in the resized image)."""
        rois, stage_logits = proposals, []
        for i in range(len(self.bbox_head)):
            logits, deltas = self.stage(i, features, rois)
            stage_logits.append(logits)
            if i < len(self.bbox_head) - 1:
                rois = self.refine(i, rois, logits[:, :-1].argmax(1), deltas, image_shapes)
        scores = F.softmax(sum(stage_logits) / float(len(stage_logits)), dim=-1)
        counts = [len(r) for r in rois]
        results = []
        for boxes, image_scores, image_deltas, shape in zip(rois, scores.split(counts), deltas.split(counts),
                                                            image_shapes):
            decoded = self.decode(len(self.bbox_head) - 1, boxes, image_deltas, shape)
            results.append(self.multiclass_nms(decoded, image_scores))
        if self.mask_head is not None:
            self.add_masks(features, results)
        return results

    def multiclass_nms(self, boxes: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmdet's ``multiclass_nms``: every (box, class) over the score threshold, class-aware NMS, the best 100."""
        n, classes = scores.shape[0], self.num_classes
        boxes = boxes.reshape(n, classes, 4).reshape(-1, 4)
        labels = torch.arange(classes, device=scores.device).expand(n, classes).reshape(-1)
        scores = scores[:, :-1].reshape(-1)
        valid = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep] + 1}

    def add_masks(self, features: dict[str, torch.Tensor], results: list[dict[str, torch.Tensor]]) -> None:
        """The three mask heads on the final boxes, their probabilities averaged (``merge_aug_masks``)."""
        boxes = [r["boxes"] for r in results]
        if sum(len(b) for b in boxes) == 0:
            for r in results:
                r["masks"] = r["boxes"].new_zeros((0, 1, 28, 28))
            return
        roi_features = self.mask_roi_extractor(features, boxes)
        probs = sum(head(roi_features).sigmoid() for head in self.mask_head) / len(self.mask_head)
        labels = torch.cat([r["labels"] for r in results]) - 1
        picked = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
        for r, masks in zip(results, picked.split([len(b) for b in boxes])):
            r["masks"] = masks
