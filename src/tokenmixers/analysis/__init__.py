"""What mixers learn: effective receptive fields and invariance to translation, rotation and scale.

Both analyses are plain functions of a model and images; they work for any model exposing timm's
``forward_intermediates`` (ERF) or a classifier ``forward`` (invariance) — tokenmixers' models and
timm's alike. The CLI (``tokenmixers erf`` / ``tokenmixers invariance``) is a thin layer on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from ..data import IMAGE_EXTENSIONS, DataError, ImageDataset, Sample, build_dataset


def load_images(source: str, split: str = "val", limit: Optional[int] = None) -> ImageDataset:
    """Images (PIL, no transform) from ``digits``, a dataset root (list files or class folders) or
    any folder of image files (unlabelled, label -1); the first ``limit`` images if given."""
    if source == "digits":
        dataset = build_dataset("digits", split)
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
    import torch
    from timm.layers import LayerScale

    from ..checkpoint import checkpoint_classes, load_checkpoint
    from ..zoo import create_model

    torch.manual_seed(seed)
    classes = checkpoint_classes(checkpoint) if checkpoint else None  # keep a trained classifier, as eval does
    model = create_model(name, **({"num_classes": classes} if classes else {}))
    if checkpoint:
        load_checkpoint(model, checkpoint)
        return model, str(checkpoint)
    if layer_scale is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LayerScale):
                    module.gamma.fill_(layer_scale)
        return model, f"random weights, layer scale {layer_scale:g}"
    return model, "random weights"
