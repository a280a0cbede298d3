"""The model registry: typed configs (:mod:`tokenmixers.configs`) registered as timm models.

A unified model is ``unified_<family>_<scale>``, built from its :class:`ModelCfg` by
:class:`UnifiedNet`; a published architecture (``dwnet_*``, ``stvit_*``) is built from its own
config type by its model class (:mod:`tokenmixers.models`). ``register_family`` and
``register_variant`` add models at run time, so a new mixer gets the whole zoo from one call.

This is the only door to the model list: everything else asks it (:func:`list_models`,
:func:`family_of`, :func:`scale_of`, :func:`paper_models`, :func:`model_cfg`) and never builds or
parses model names. Its :func:`load_checkpoint` is the checkpoint loader that also names the model
a mismatching checkpoint looks like.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

from . import checkpoint, configs
from .backbone import StagedNet, UnifiedNet
from .checkpoint import Checkpoint, CheckpointError, LoadReport, adapt_state_dict
from .configs import PAPER_FAMILIES, SCALES, AnyCfg, DWNetCfg, Family, ModelCfg, STViTCfg
from .converters import to_tokenmixers
from .models import DWNet, STViT

__all__ = ["SCALES", "FAMILIES", "create_model", "list_models", "model_cfg", "register_family", "register_variant",
           "register_model_cfg", "default_recipe", "check_model_name", "guess_architecture", "reported_top1",
           "family_of", "scale_of", "paper_models", "is_registered", "is_builtin", "display_name", "load_checkpoint",
           "register"]

FAMILIES: dict[str, Family] = {}
_MODEL_CFGS: dict[str, AnyCfg] = {}  # model name -> architecture
_MODEL_FAMILY: dict[str, str] = {}  # model name -> family name
_MODEL_SCALE: dict[str, str] = {}  # model name -> micro / tiny / small / base (where it has one)
REPORTED_TOP1: dict[str, float] = dict(configs.TIMM_TOP1)  # model name -> ImageNet-1k top-1 of the official weights
default_cfgs: dict[str, Any] = {}  # read by timm's register_model

# config type -> (model class, name of its first conv for timm's pretrained_cfg)
ARCHITECTURES: dict[type, tuple[type[StagedNet], str]] = {
    ModelCfg: (UnifiedNet, "stem.conv1"),
    DWNetCfg: (DWNet, "stem.proj"),
    STViTCfg: (STViT, "stem.0.conv"),
}


def pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained config of a model (ImageNet-1k, 224, crop 0.875, bicubic); ``kwargs`` override."""
    return {
        **dict(
            url="",
            num_classes=1000,
            input_size=(3, 224, 224),
            pool_size=(7, 7),
            min_input_size=(3, 32, 32),
            fixed_input_size=False,
            crop_pct=0.875,
            interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="stem.conv1",
            classifier="head.fc",
            license="apache-2.0",
        ),
        **kwargs,
    }


def _filter_pretrained(state_dict: dict[str, torch.Tensor], model: StagedNet) -> dict[str, torch.Tensor]:
    """timm's local-dir / hub path: convert and adapt the weights like ``load_checkpoint`` does."""
    state_dict, _ = to_tokenmixers(state_dict)
    state_dict, _, mismatched = adapt_state_dict(state_dict, model)
    if mismatched:
        raise CheckpointError("pretrained weights do not fit the model: " + "; ".join(mismatched[:5]))
    return state_dict


def _build(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Build a registered model through timm (``features_only``, hub weights); weight files load through ours.

    ``device`` and ``dtype`` are accepted as timm's own models accept them: the model is built on the
    device (``"meta"`` allocates nothing) and cast to the dtype.
    """
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build_on_device(name, pretrained, **kwargs)
    return model.to(dtype) if dtype is not None else model


def _build_on_device(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    model_cls = ARCHITECTURES[type(_MODEL_CFGS[name])][0]
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    if file is None:
        return build_model_with_cfg(model_cls, name, pretrained, model_cfg=_MODEL_CFGS[name],
                                    pretrained_filter_fn=_filter_pretrained,
                                    feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)
    # a weights file (timm's pretrained_cfg_overlay=dict(file=...)): read safely, converted and checked by
    # load_checkpoint, before any features_only wrapping
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs.pop("feature_cls", None)
    model = build_model_with_cfg(model_cls, name, False, model_cfg=_MODEL_CFGS[name], **kwargs)
    load_checkpoint(model, file)
    return FeatureGetterNet(model, out_indices=out_indices) if features_only else model


def register_model_cfg(
    name: str, cfg: AnyCfg, family: str = "", top1: Optional[float] = None, scale: Optional[str] = None,
    **pretrained: Any,
) -> None:
    """Register ``name`` in timm (and ``tokenmixers.create_model``) as a model built from ``cfg``.

    ``cfg`` is a :class:`ModelCfg` (unified backbone) or a published architecture's config
    (:class:`DWNetCfg`, :class:`STViTCfg`); ``top1`` is the ImageNet-1k accuracy reported for the
    official weights; ``scale`` the budget it belongs to (micro, tiny, small, base); ``pretrained``
    overrides timm's pretrained_cfg fields.
    """
    if type(cfg) not in ARCHITECTURES:
        raise TypeError(f"unknown config type {type(cfg).__name__}; accepted: {', '.join(t.__name__ for t in ARCHITECTURES)}")
    model_cls, first_conv = ARCHITECTURES[type(cfg)]
    replacing = name in _MODEL_CFGS  # e.g. a user's model placed at its budget: a new config, on purpose
    _MODEL_CFGS[name] = cfg
    _MODEL_FAMILY[name] = family
    if scale is not None:
        _MODEL_SCALE[name] = scale
    if top1 is not None:
        REPORTED_TOP1[name] = top1
        pretrained.setdefault("notes", (f"ImageNet-1k top-1 {top1}% reported for the official weights",))
    default_cfgs.update(generate_default_cfgs({name: pretrained_cfg(first_conv=first_conv, **pretrained)}))

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> StagedNet:
        return _build(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {model_cls.__name__} with the {cfg.mixer!r} mixer."
    with warnings.catch_warnings():
        if replacing:
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
        register_model(entrypoint)
    _signature.cache_clear()


def register(family: Family) -> Family:
    """Register every model of a family (configs already made, e.g. fitted) as ``unified_<name>_<scale>``."""
    FAMILIES[family.name] = family
    for scale, name, cfg in zip(family.configs, family.model_names(), family.configs.values()):
        register_model_cfg(name, cfg, family=family.name, top1=family.paper_top1.get(scale), scale=scale)
    return family


def register_family(
    name: str,
    mixer: str,
    scales: Optional[Mapping[str, Mapping[str, Any]]] = None,
    source: str = "",
    paper_top1: Optional[Mapping[str, float]] = None,
    recipe: str = "transformer",
    **common: Any,
) -> Family:
    """Register ``unified_<name>_<scale>`` for every scale (default: the Halo/Swin skeleton).

    ``common`` and the per-scale mappings are :class:`ModelCfg` fields, e.g. ``norm_eps=1e-6``.
    """
    return register(configs.family(name, mixer, scales, source=source, paper_top1=paper_top1, recipe=recipe, **common))


def register_variant(name: str, base: str, **overrides: Any) -> None:
    """Register ``name`` as a copy of model ``base`` with some config fields changed (ablations)."""
    register_model_cfg(name, model_cfg(base).replace(**overrides), family=_MODEL_FAMILY[base],
                       scale=_MODEL_SCALE.get(base))


def reported_top1(name: str) -> Optional[float]:
    """ImageNet-1k top-1 reported for a model's official weights (ours, or timm's Twins), if known."""
    return REPORTED_TOP1.get(name)


def default_recipe(model: str) -> str:
    """The paper's recipe for a model: ``cnn`` for the convolution families (batch 4096), else ``transformer``."""
    family = FAMILIES.get(_MODEL_FAMILY.get(model, ""))
    return family.recipe if family else "transformer"


def list_models(pattern: str = "*") -> list[str]:
    """Registered unified model names matching a glob pattern, in zoo order."""
    return [n for n in _MODEL_CFGS if fnmatch.fnmatch(n, pattern)]


def is_registered(name: str) -> bool:
    """Whether ``name`` is one of tokenmixers' models (not just any timm model)."""
    return name in _MODEL_CFGS


def is_builtin(name: str) -> bool:
    """Whether a model ships with tokenmixers (not registered at run time, e.g. by a user's plug-in)."""
    return name in _BUILTIN


def family_of(name: str) -> Optional[str]:
    """The family (mixer line) a registered model belongs to, e.g. ``halo``; None for other models."""
    return _MODEL_FAMILY.get(name)


def scale_of(name: str) -> Optional[str]:
    """The budget a model belongs to (micro, tiny, small, base), None when it has none."""
    return _MODEL_SCALE.get(name)


def paper_models(scale: str) -> list[str]:
    """The paper's five models at a scale (Halo, PVT, Swin, ConvNeXt, DCNv3), in the paper's order."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    families = {f.name for f in PAPER_FAMILIES}
    return [n for n in _MODEL_CFGS if _MODEL_FAMILY[n] in families and _MODEL_SCALE.get(n) == scale
            and n in FAMILIES[_MODEL_FAMILY[n]].model_names()]


def display_name(name: str) -> str:
    """A model's name as plots and tables show it (the ``unified_`` prefix dropped)."""
    return name.removeprefix("unified_") if name in _MODEL_CFGS else name


def model_cfg(name: str) -> AnyCfg:
    """The architecture of a registered model."""
    try:
        return _MODEL_CFGS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; try tokenmixers.list_models() (e.g. {list_models()[:3]})") from None


def check_model_name(name: str) -> None:
    """``KeyError`` with close matches unless ``name`` is a tokenmixers or timm model."""
    if name not in _MODEL_CFGS and not timm.is_model(name):
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `tokenmixers list`"
        raise KeyError(f"unknown model {name!r}{hint}")


def create_model(name: Union[str, ModelCfg], pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Create a registered model (same as ``timm.create_model``), or a unified model from a :class:`ModelCfg`.

    An unknown name raises a ``KeyError`` with close matches.
    """
    if isinstance(name, ModelCfg):
        if pretrained:
            raise ValueError("a model built from a config has no pretrained weights; load them with load_checkpoint")
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = UnifiedNet(name, **kwargs)
        model.pretrained_cfg = pretrained_cfg(architecture=None)
        return model.to(dtype) if dtype is not None else model
    check_model_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_checkpoint(model: torch.nn.Module, source: Union[str, Path, Checkpoint, Mapping[str, Any]],
                    **kwargs: Any) -> LoadReport:
    """:func:`tokenmixers.checkpoint.load_checkpoint` that names the model a mismatching checkpoint looks like."""
    return checkpoint.load_checkpoint(model, source, guess=guess_architecture, **kwargs)


# -- which model a checkpoint belongs to -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _signature(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of a registered model, built on the meta device."""
    with torch.device("meta"):
        model = create_model(name)
    return frozenset((k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop unit dimensions: 1x1 conv vs Linear weights and layer-scale layouts compare equal."""
    return tuple(d for d in shape if d != 1)


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".*", key)


def guess_architecture(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered model whose parameter names and shapes a (converted) state dict matches best.

    First the family (key patterns of one model per family), then the model within it (shapes).
    """

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / max(len(a | b), 1)

    ours = {(k, _squeeze(tuple(v.shape))) for k, v in state_dict.items() if not k.startswith("head.fc.")}
    our_patterns = {_pattern(k) for k, _ in ours}
    names = list_models()
    first = {family: next(n for n in names if _MODEL_FAMILY[n] == family)
             for family in dict.fromkeys(_MODEL_FAMILY.values())}
    family = max(first, key=lambda f: jaccard(our_patterns, {_pattern(k) for k, _ in _signature(first[f])}))
    best, best_score = None, 0.0
    for name in (n for n in names if _MODEL_FAMILY[n] == family):
        theirs = {(k, _squeeze(s)) for k, s in _signature(name) if not k.startswith("head.fc.")}
        score = jaccard(ours, theirs)
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.8 else None


for _family in configs.FAMILIES:
    register(_family)
for _name, (_family_name, _cfg) in configs.VARIANTS.items():
    register_model_cfg(_name, _cfg, family=_family_name, scale=next((s for s in SCALES if f"_{s}" in _name), None))
for _name, _published in configs.PUBLISHED.items():
    register_model_cfg(
        _name, _published.cfg, family=_published.family, top1=_published.top1, paper_name=_published.source,
        origin_url=_published.url, scale=next((s for s in SCALES if _name.endswith(f"_{s}")), None),
    )

_BUILTIN = frozenset(configs.builtin_models())
