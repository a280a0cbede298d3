"""Published architectures whose stem, downsampling or blocks differ from the unified backbone.

Each is a short model file built from the project's mixers and backbone parts (:class:`Block`,
:class:`Stage`, :class:`Head`, the :class:`StagedNet` timm surface): :mod:`.dwnet` (DWNet-T/B and
the dynamic variants) and :mod:`.stvit` (STViT-S/B/L). Their configs live in
:mod:`tokenmixers.configs`, their registration in :mod:`tokenmixers.zoo`.
"""
from .dwnet import DWNet
from .stvit import STViT

__all__ = ["DWNet", "STViT"]
