"""timm's ImageNet transforms for a recipe, with RandAugment as the paper's pipeline ran it.

The paper trained with timm 0.6 and the Pillow of its time. RandAugment's ``PosterizeIncreasing``
keeps ``4 - int(m / 10 * 4)`` bits, so at the top magnitude (m = 10, which ``mstd0.5`` draws about
2 % of the time around m = 9) it keeps 0 bits. Pillow before 13 computed that as the mask
``~(2**8 - 1)``, i.e. a black image; Pillow 13 raises ``ValueError: bits must be between or equal to
1 and 8`` and the training run dies in a DataLoader worker. timm 1.0 passes the 0 through unchanged,
so :func:`build_transform` swaps the posterize function of timm's augmentation ops for one that
gives the black image the official pipeline produced. Every other operation and magnitude is timm's.
"""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image, ImageOps
from timm.data import create_transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits per channel; 0 bits gives black, as Pillow < 13 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> list[Any]:
    """The timm ``AugmentOp`` objects inside a (Compose of) RandAugment / AutoAugment / AugMix."""
    found = []
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for sub_policy in getattr(t, "policy", []):
            ops += list(sub_policy)
        found += [op for op in ops if hasattr(op, "aug_fn")]
    return found


def eval_transform(input_size: int, crop_pct: float, interpolation: str) -> Callable[[Image.Image], Any]:
    """timm's evaluation transform: resize to ``input_size / crop_pct``, centre crop, normalise."""
    return create_transform(input_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct)


def build_transform(cfg: Any, training: bool) -> Callable[[Image.Image], Any]:
    """timm's transform for a recipe's settings: RandomResizedCrop, flip, RandAugment, erasing (train) or eval's."""
    if not training:
        return eval_transform(cfg.input_size, cfg.crop_pct, cfg.interpolation)
    transform = create_transform(
        cfg.input_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform
