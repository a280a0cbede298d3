"""mmdetection 2.x's box maths as plain torch functions: box coding, class-aware NMS, GIoU, RoI pooling by FPN level
and mask targets; shared by the detectors here."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

LEVELS = ("0", "1", "2", "3")
WH_RATIO_CLIP = 16 / 1000


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor, max_shape: Optional[tuple[int, int]] = None,
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """mmdet's ``delta2bbox`` (means 0): ``(N, 4)`` anchors and deltas -> xyxy boxes clipped to ``(h, w)``.

    The deltas are multiplied by ``stds`` first, as mmdet does (not divided by their inverses: the same bits)."""
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    deltas = deltas * deltas.new_tensor(stds)
    pxy = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    pwh = anchors[:, 2:] - anchors[:, :2]
    gxy = pxy + pwh * deltas[:, :2]
    gwh = pwh * deltas[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=max_shape[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=max_shape[0])
    return boxes


def encode_boxes(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mmdet's ``bbox2delta`` (means 0, stds 1): the deltas that take ``anchors`` to ``gt``."""
    pxy, pwh = (anchors[:, :2] + anchors[:, 2:]) * 0.5, anchors[:, 2:] - anchors[:, :2]
    gxy, gwh = (gt[:, :2] + gt[:, 2:]) * 0.5, gt[:, 2:] - gt[:, :2]
    return torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mmdet's ``giou_loss``: ``1 - GIoU`` of ``(N, 4)`` xyxy pairs, union and enclosing area floored at ``eps``."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    wh = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """mmcv's ``batched_nms`` (class-aware by offsetting each class's boxes by ``max + 1``): kept indices, best first."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


class LevelRoIAlign(nn.Module):
    """mmdet's SingleRoIExtractor: RoIAlign (``aligned=True``, adaptive sampling) on each box's FPN level."""

    def __init__(self, output_size: int, strides: tuple[int, ...] = (4, 8, 16, 32), finest_scale: float = 56.0) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.strides = strides
        self.finest_scale = finest_scale

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: Any = None) -> torch.Tensor:
        """Boxes ``[(N_i, 4)]`` in image coordinates -> ``(sum N_i, C, S, S)`` features."""
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp_min(0).sqrt()
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(self.strides) - 1)
        first = features[LEVELS[0]]
        out = first.new_zeros((len(rois), first.shape[1]) + self.output_size)
        for level, stride in enumerate(self.strides):
            idx = torch.where(levels == level)[0]
            if len(idx):
                pooled = roi_align(features[LEVELS[level]], rois[idx].to(first.dtype), self.output_size,
                                   spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
                out[idx] = pooled.to(out.dtype)
        return out


def mask_loss(
    logits: torch.Tensor, boxes: list[torch.Tensor], gt_masks: list[torch.Tensor], matched: list[torch.Tensor],
    labels: list[torch.Tensor],
) -> torch.Tensor:
    """BCE of each positive RoI's class mask against its ground truth RoIAligned (aligned) and binarised at 0.5."""
    size = logits.shape[-1]
    targets = []
    for masks, b, m in zip(gt_masks, boxes, matched):
        rois = torch.cat([m[:, None].to(b), b], dim=1)
        aligned = roi_align(masks[:, None].to(b), rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        targets.append((aligned[:, 0] >= 0.5).to(logits.dtype))
    target = torch.cat(targets)
    if target.numel() == 0:
        return logits.sum() * 0
    labels_t = torch.cat(labels)
    return F.binary_cross_entropy_with_logits(logits[torch.arange(len(labels_t), device=logits.device), labels_t], target)
