"""Semantic segmentation with any tokenmixers backbone: UperNet and Semantic FPN as mmsegmentation builds them.

>>> from tokenmixers.segmentation import create_segmentor
>>> model = create_segmentor("unified_halo_tiny", num_classes=150)                  # UperNet + FCN auxiliary head
>>> model = create_segmentor("unified_pvt_tiny", num_classes=150, head="semantic_fpn")
"""
from .heads import FPN, FCNHead, FPNHead, UPerHead
from .segmentor import Segmentor, create_segmentor

__all__ = ["FPN", "FCNHead", "FPNHead", "UPerHead", "Segmentor", "create_segmentor"]
