"""What mixers learn: effective receptive fields and invariance to translation, rotation and scale.

The analyses are plain functions of a model and images; they work for any model exposing timm's
``forward_intermediates`` (ERF), a classifier ``forward`` (invariance) or a detector (scale
invariance, :mod:`.scale_invariance`) — tokenmixers' models and timm's alike. The CLI
(``tokenmixers erf`` / ``invariance`` / ``detect invariance``) is a thin layer on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from timm.layers import LayerScale
from torch import nn

from ..checkpoint import read_checkpoint
from ..data import BUILTIN_DATA, IMAGE_EXTENSIONS, DataError, ImageDataset, Sample, build_dataset
from ..zoo import create_model, load_checkpoint


def load_images(source: str, split: str = "val", limit: Optional[int] = None) -> ImageDataset:
    """Images (PIL, no transform) from a built-in set (``fashion``, ``digits``), a dataset root (list
    files or class folders) or any folder of image files (unlabelled, label -1); the first ``limit``
    images if given."""
    if source in BUILTIN_DATA:
        dataset = build_dataset(source, split)
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        if (root / "meta" / f"{split}.txt").is_file() or (root / split).is_dir():
            dataset = build_dataset(str(root), split)
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            dataset = ImageDataset([Sample(p, -1) for p in files], [], name=str(root))
    if limit is not None:
        dataset.samples = dataset.samples[:limit]
    if not dataset.samples:
        raise DataError(f"no images in {source}")
    return dataset


def load_model(
    name: str, checkpoint: Optional[str] = None, layer_scale: Optional[float] = None, seed: int = 0
) -> tuple[nn.Module, str]:
    """A tokenmixers or timm model, with weights from a checkpoint (ours or official) if given.

    Random weights come from ``seed`` (the same on every process and every run). ``layer_scale``
    sets every layer-scale gamma of a randomly initialised model (at the usual 1e-6 the mixers of an
    untrained model barely contribute). Returns the model and a description of its weights
    (``"random weights"``, ``"random weights, layer scale 1"`` or the path).
    """
    torch.manual_seed(seed)
    weights = read_checkpoint(checkpoint) if checkpoint else None
    classes = weights.num_classes if weights is not None else None  # keep a trained classifier, as eval does
    model = create_model(name, **({"num_classes": classes} if classes else {}))
    if weights is not None:
        load_checkpoint(model, weights)
        return model, str(checkpoint)
    if layer_scale is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LayerScale):
                    module.gamma.fill_(layer_scale)
        return model, f"random weights, layer scale {layer_scale:g}"
    return model, "random weights"
