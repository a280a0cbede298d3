"""tokenmixers: spatial token mixers compared fairly inside one unified vision backbone.

>>> import tokenmixers, timm
>>> model = timm.create_model("unified_halo_tiny")          # or tokenmixers.create_model(...)
"""
__version__ = "0.1.0"

from .allocator import reuse_cpu_memory
from .backbone import UnifiedNet
from .checkpoint import CheckpointError
from .configs import SCALES, DWNetCfg, Family, ModelCfg, STViTCfg
from .fit import budget, fit_budget, fit_family
from .hub import load_pretrained, save_pretrained
from .mixers import TokenMixer, create_mixer, get_mixer, list_mixers, register_mixer
from .models import DWNet, STViT
from .zoo import (
    FAMILIES,
    create_model,
    list_models,
    load_checkpoint,
    model_cfg,
    register_family,
    register_model_cfg,
    register_variant,
)

__all__ = [
    "UnifiedNet",
    "ModelCfg",
    "DWNet",
    "DWNetCfg",
    "STViT",
    "STViTCfg",
    "Family",
    "CheckpointError",
    "load_checkpoint",
    "load_pretrained",
    "save_pretrained",
    "TokenMixer",
    "create_mixer",
    "get_mixer",
    "list_mixers",
    "register_mixer",
    "FAMILIES",
    "SCALES",
    "create_model",
    "list_models",
    "model_cfg",
    "register_family",
    "register_model_cfg",
    "register_variant",
    "reuse_cpu_memory",
    "budget",
    "fit_budget",
    "fit_family",
    "__version__",
]
