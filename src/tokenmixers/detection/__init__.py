"""Mask R-CNN (the paper's Table V) and RetinaNet with any tokenmixers backbone, on plain PyTorch + torchvision,
computing what mmdetection 2.x computes.

>>> from tokenmixers.detection import create_backbone, create_detector, create_retinanet
>>> backbone = create_backbone("unified_halo_tiny")          # (B, 3, H, W) -> four NCHW maps
>>> detector = create_detector("unified_halo_tiny", num_classes=80)
>>> retinanet = create_retinanet("unified_halo_tiny", num_classes=80)
"""
from ..dense import DetectionBackbone, TimmBackbone, create_backbone, load_imagenet
from .detector import Detector, create_detector, holds_detector, load_detector, load_detector_weights, save_detector
from .retinanet import MMDetRetinaNet, create_retinanet, load_retinanet_weights

__all__ = ["DetectionBackbone", "TimmBackbone", "create_backbone", "load_imagenet", "Detector", "create_detector",
           "holds_detector", "load_detector", "load_detector_weights", "save_detector", "MMDetRetinaNet",
           "create_retinanet", "load_retinanet_weights"]
