"""Our own weights format: the timm / Hugging Face hub layout, written and read by timm itself.

``save_pretrained`` writes ``model.safetensors`` and ``config.json`` (architecture, every
:class:`ModelCfg` field as ``model_args``, num_classes, pretrained_cfg) with timm's
``save_for_hf``; ``load_pretrained`` is ``timm.create_model("local-dir:<folder>", pretrained=True)``,
so a folder is equally readable by timm alone. Files appear atomically: a crash never leaves a
half-written folder behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Union

import timm
from timm.models import save_for_hf
from torch import nn

from .files import atomic_write_text
from .zoo import MODEL_CFGS

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PathLike = Union[str, Path]


def save_pretrained(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (timm / HF hub layout)."""
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
        save_for_hf(model, str(staging), model_args=model_args, safe_serialization=True)
        config = json.loads((staging / CONFIG_NAME).read_text())
        config["tokenmixers_version"] = _version()
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
    if arch not in MODEL_CFGS and not timm.is_model(arch):
        raise KeyError(f"{path} holds a {arch!r} model, which is not registered; import the module that registers it")
    return timm.create_model(f"local-dir:{path}", pretrained=True, **overrides)


def _version() -> str:
    """The installed tokenmixers version."""
    try:
        return version("tokenmixers")
    except PackageNotFoundError:
        return "unknown"
