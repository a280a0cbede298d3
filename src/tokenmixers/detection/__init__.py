"""Mask R-CNN with any tokenmixers backbone, on plain PyTorch + torchvision (the paper's Table V).

>>> from tokenmixers.detection import create_backbone
>>> backbone = create_backbone("unified_halo_tiny")          # (B, 3, H, W) -> four NCHW maps
"""
from .backbone import DetectionBackbone, TimmBackbone, create_backbone, load_imagenet

__all__ = ["DetectionBackbone", "TimmBackbone", "create_backbone", "load_imagenet"]
