"""Our own weights format: the timm / Hugging Face hub layout, written and read by timm itself.

``save_pretrained`` writes ``model.safetensors`` and ``config.json`` (architecture, every
:class:`ModelCfg` field as ``model_args``, num_classes, the class names as ``label_names``, and
timm's ``pretrained_cfg`` with the input size, crop and interpolation the weights were trained
and evaluated at) with timm's ``save_config_for_hf`` and safetensors; ``load_pretrained`` is
``timm.create_model("local-dir:<folder>", pretrained=True)``, so a folder is equally readable by
timm alone. Files appear atomically: a crash never leaves a half-written folder behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import safetensors.torch
import timm
from timm.models._hub import save_config_for_hf
from torch import nn

from .files import atomic_write_text
from .zoo import is_registered

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PathLike = Union[str, Path]


def save_pretrained(model: nn.Module, directory: PathLike, *, input_size: Optional[int] = None,
                    crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                    class_names: Optional[Sequence[str]] = None, data: Optional[str] = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (timm / HF hub layout).

    ``input_size``, ``crop_pct`` and ``interpolation`` (default: the model's pretrained_cfg) say how
    images are prepared for these weights, ``class_names`` name the outputs and ``data`` is what they
    were trained on: all travel with the weights, and ``tokenmixers eval`` reads them.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or cfg.get("architecture") not in timm.list_models():
        raise ValueError(
            f"save_pretrained needs a model created by name (tokenmixers.create_model / timm.create_model), so that "
            f"it can be re-created by name; {type(model).__name__} was built directly. Register its config first "
            "(tokenmixers.zoo.register_model_cfg(name, cfg)) and create it by that name."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; choose another destination")
    directory.mkdir(parents=True, exist_ok=True)
    model_args = model.cfg.to_dict() if hasattr(model, "cfg") else None  # every architecture field, explicitly
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        data_config = {k: v for k, v in (("input_size", (3, input_size, input_size) if input_size else None),
                                          ("crop_pct", crop_pct), ("interpolation", interpolation)) if v is not None}
        model_config = {"label_names": list(class_names)} if class_names else None
        save_config_for_hf(model, str(staging / CONFIG_NAME), model_config=model_config, model_args=model_args,
                           data_config=data_config or None)
        # safetensors stores tensors contiguously; the convolution kernels are kept channels-last in the model
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(weights, str(staging / WEIGHTS_NAME))
        config = json.loads((staging / CONFIG_NAME).read_text())
        config["tokenmixers_version"] = _version()
        if data is not None:
            config["training_data"] = data
        atomic_write_text(staging / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first: a config never points at missing weights
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_pretrained(path: PathLike, **overrides: Any) -> nn.Module:
    """Recreate a model saved by :func:`save_pretrained` (``overrides`` change constructor arguments)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a save_pretrained folder: {path / CONFIG_NAME} is missing")
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a save_pretrained folder: {path / WEIGHTS_NAME} is missing")
    arch = json.loads((path / CONFIG_NAME).read_text()).get("architecture")
    if not is_registered(arch) and not timm.is_model(arch):
        raise KeyError(f"{path} holds a {arch!r} model, which is not registered; import the module that registers it")
    return timm.create_model(f"local-dir:{path}", pretrained=True, **overrides)


def _version() -> str:
    """The installed tokenmixers version."""
    try:
        return version("tokenmixers")
    except PackageNotFoundError:
        return "unknown"
