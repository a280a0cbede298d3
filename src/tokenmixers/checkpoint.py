"""Loading and saving weights, safely.

* Reading never executes code: torch files go through ``torch.load(weights_only=True)``;
  safetensors is preferred. Training checkpoints that also pickle other objects (a yacs config, an
  ``argparse.Namespace``) are read by a restricted unpickler that rebuilds only tensors and plain
  containers and keeps every other object as inert data, never importing its class; a pickle that
  would *call* anything outside that list is refused with the name of what it would call.
* Official checkpoints are converted (see :mod:`tokenmixers.converters`) and adapted where the
  official loader adapts too: relative-position tables, Halo relative logits and PVT position
  embeddings are resized, and the classifier is sliced by a label map or re-initialised when the
  number of classes differs.
* Loading is all-or-nothing: every key and shape is checked before the first tensor is copied,
  so on any error the model keeps its previous weights.
* A file is read and converted once (:func:`read_checkpoint`): the :class:`Checkpoint` it returns
  (weights, EMA weights, source layout, stored settings, classes) is what callers pass down.
* This module knows no model list: a caller that does (the zoo) passes the function that names the
  model a mismatching checkpoint looks like; our own format (``save_pretrained``) lives in
  :mod:`tokenmixers.hub`.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import nn

from .converters import to_tokenmixers

WEIGHTS_NAME = "model.safetensors"
StateDict = dict[str, torch.Tensor]
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# names the registered model a state dict looks like (for error messages)
Guess = Callable[[StateDict], Optional[str]]


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    path: str
    source: str
    entry: Optional[str]
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.path} ({self.source} layout{', entry ' + repr(self.entry) if self.entry else ''})"]
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.missing:
            lines.append(f"  kept the model's own values for: {group_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored: {group_keys(self.unexpected)}")
        return "\n".join(lines)


# -- reading ---------------------------------------------------------------------------------------

# What a tensor checkpoint may rebuild: tensors, parameters, plain containers, dtypes and numpy arrays.
_REBUILDERS = frozenset({
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
    "_codecs.encode", "torch.Size", "torch.serialization._get_layout", "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
})


class _RefusedCall(pickle.UnpicklingError):
    """The pickle calls a global that the safe loader does not rebuild."""


class _Inert:
    """Stands in for an object whose class the safe loader never imports; keeps its pickled state as data."""

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # reached only when the pickle *calls* the global
        raise _RefusedCall(self.global_name)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["pickled_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (yacs CfgNode) pickle their items
        self.__dict__.setdefault("pickled_items", {})[key] = value

    def append(self, value: Any) -> None:
        """List subclasses pickle their items."""
        self.__dict__.setdefault("pickled_list", []).append(value)

    def extend(self, values: Any) -> None:
        """List subclasses pickle their items."""
        self.__dict__.setdefault("pickled_list", []).extend(values)


class _SkippingUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; every other global becomes an :class:`_Inert` placeholder class."""

    skipped: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _REBUILDERS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        self.skipped.add(full)
        return type(name, (_Inert,), {"global_name": full, "__module__": __name__})


def _load_skipping(path: Path) -> tuple[Any, set[str]]:
    """``torch.load`` through :class:`_SkippingUnpickler`; returns the object and the globals it skipped."""
    skipped: set[str] = set()
    unpickler = type("Unpickler", (_SkippingUnpickler,), {"skipped": skipped})
    module = types.ModuleType("tokenmixers_skipping_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: unpickler(f, **kw).load()  # type: ignore[attr-defined]
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    return obj, skipped


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, else the skipping unpickler; errors say what is wrong with the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler raises many types on damaged input or unknown globals
        first_error = err
    try:
        obj, skipped = _load_skipping(path)
    except _RefusedCall as call:
        raise CheckpointError(
            f"{path} was refused by the safe loader: unpickling it would import {call} and call it, which could "
            "execute code. tokenmixers never unpickles arbitrary objects. If you trust the file, re-save only its "
            "tensors elsewhere (e.g. torch.save(ckpt['model'], 'weights.pth')) or convert it to safetensors."
        ) from None
    except Exception:
        err = first_error
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: the file is truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
        ) from None
    logging.getLogger(__name__).info("%s: kept these objects as inert data, never imported: %s", path, sorted(skipped))
    return obj


def _read_safetensors(path: Path) -> StateDict:
    """Read a safetensors file with a clear error for a damaged one."""
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file; it is truncated or corrupt ({err})") from None


def _read_file(path: Path) -> Any:
    """A safetensors or torch file's contents (a state dict, or a training checkpoint's mapping)."""
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: 8-byte little-endian header length, then a JSON header
    is_safetensors = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    if path.suffix == ".safetensors" or is_safetensors:
        return _read_safetensors(path)
    return safe_torch_load(path)


def _pick_entry(obj: Mapping[str, Any], entry: str, where: str) -> tuple[StateDict, Optional[str]]:
    """Select the state dict of a (training) checkpoint and strip DDP's ``module.`` prefix."""
    wanted = {"auto": ["model", "state_dict"], "ema": ["model_ema", "state_dict_ema"]}.get(entry, [entry])
    chosen = next((k for k in wanted if isinstance(obj.get(k), Mapping)), None)
    if chosen is None and entry != "auto":
        raise CheckpointError(f"{where} has no {entry!r} entry; its top-level keys are {sorted(obj)[:10]}")
    state_dict = obj[chosen] if chosen else obj
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{where} contains no tensors (top-level keys: {sorted(obj)[:10]})")
    return {k.removeprefix("module."): v for k, v in tensors.items()}, chosen


def _convert(state_dict: StateDict, where: str) -> tuple[StateDict, str]:
    """A state dict in tokenmixers' layout and the name of the layout it came in."""
    try:
        return to_tokenmixers(state_dict)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {where} cannot be converted: {err}") from None


@dataclass
class Checkpoint:
    """A weights file read and converted once; pass it down instead of its path.

    Attributes:
        path: where it was read from (``"<state dict>"`` for an in-memory one).
        state_dict: the chosen entry's weights in tokenmixers' layout.
        source: the layout they came in (``tokenmixers``, ``stm-eval``, ``mmdet``, ``mmseg``, ``dwnet``, ``stvit``).
        entry: which entry of a training checkpoint holds them (``model``, ``state_dict``, ...), if any.
        ema: the EMA weights, converted, when the file has them.
        run: the settings of the tokenmixers run that wrote it (empty for any other file).
        model_config: how the saved model was built: a weights folder's ``config.json``, a detector's or
            segmentor's config.
    """

    path: str
    state_dict: StateDict
    source: str = "tokenmixers"
    entry: Optional[str] = None
    ema: Optional[StateDict] = None
    run: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    ema_entry: Optional[str] = None

    @property
    def model_name(self) -> Optional[str]:
        """The model it was saved from, when the file says (a run's model, a folder's architecture)."""
        return self.run.get("model") or self.model_config.get("model") or self.model_config.get("architecture")

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of its classifier (or object classes of a detector), None when it has no classifier."""
        detector = self.state_dict.get("roi_heads.box_predictor.cls_score.weight",
                                       self.state_dict.get("roi_heads.bbox_head.0.fc_cls.weight"))  # or a cascade's
        if detector is not None:
            return int(detector.shape[0]) - 1  # the background is not a class
        segmentor = self.state_dict.get("decode_head.conv_seg.weight")
        if segmentor is not None:
            return int(segmentor.shape[0])
        classifier = self.state_dict.get("head.fc.weight")
        return int(classifier.shape[0]) if classifier is not None and classifier.ndim == 2 else None

    @property
    def class_names(self) -> Optional[list[str]]:
        """Names of the classes, when they were saved with the weights."""
        names = self.model_config.get("categories") or self.model_config.get("label_names")
        return list(names) if names else None

    def weights(self, entry: str = "auto") -> StateDict:
        """The weights of an entry: ``auto``/``model`` (the chosen one) or ``ema``."""
        if entry in ("auto", "model", self.entry) or (entry == "ema" and self.entry in ("model_ema", "state_dict_ema")):
            return self.state_dict
        if entry == "ema":
            if self.ema is None:
                raise CheckpointError(f"{self.path} has no EMA weights (no 'model_ema' or 'state_dict_ema' entry)")
            return self.ema
        raise CheckpointError(f"{self.path}: entry {entry!r} was not read; read the file with "
                              f"read_checkpoint(path, entry={entry!r})")

    def with_weights(self, state_dict: StateDict) -> "Checkpoint":
        """The same checkpoint holding other weights (e.g. a part of them), for loading."""
        return Checkpoint(self.path, state_dict, self.source, self.entry, None, self.run, self.model_config)

    def entry_of(self, entry: str) -> Optional[str]:
        """The top-level key that :meth:`weights` of ``entry`` come from."""
        main = entry in ("auto", "model", self.entry) or (entry == "ema" and self.entry in ("model_ema", "state_dict_ema"))
        return self.entry if main else self.ema_entry


def checkpoint_from_mapping(obj: Mapping[str, Any], entry: str = "auto", where: str = "<state dict>") -> Checkpoint:
    """A :class:`Checkpoint` of an in-memory state dict or training checkpoint."""
    raw, chosen = _pick_entry(obj, entry, where)
    state_dict, source = _convert(raw, where)
    ema, ema_entry = None, None
    if entry != "ema" and any(isinstance(obj.get(k), Mapping) for k in ("model_ema", "state_dict_ema")):
        raw_ema, ema_entry = _pick_entry(obj, "ema", where)
        ema = _convert(raw_ema, where)[0]
    run = obj.get("config") if isinstance(obj.get("config"), Mapping) and "version" in obj else {}
    built = next((obj[k] for k in ("detector", "segmentor") if isinstance(obj.get(k), Mapping)), {})
    model_config = dict(built)
    if isinstance(obj.get("class_names"), (list, tuple)):
        model_config["label_names"] = list(obj["class_names"])
    meta = obj.get("meta")
    if isinstance(meta, Mapping) and isinstance(meta.get("CLASSES"), (list, tuple)):  # mmseg / mmdet checkpoints
        model_config.setdefault("label_names", [str(c) for c in meta["CLASSES"]])
    return Checkpoint(where, state_dict, source, chosen, ema, dict(run), model_config, ema_entry)


def read_checkpoint(path: PathLike, entry: str = "auto") -> Checkpoint:
    """Read a checkpoint file or weights folder once: weights converted, EMA and stored settings kept.

    Args:
        path: ``.safetensors``, a torch checkpoint (``.pth``/``.pt``/``.bin``) or a folder with
            ``model.safetensors`` and ``config.json`` (ours: classifiers and detectors).
        entry: which state dict of a training checkpoint: ``"auto"`` (``model``, else
            ``state_dict``, else a bare state dict), ``"model"``, ``"ema"`` (``model_ema`` or
            ``state_dict_ema``) or any other top-level key.
    """
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except ValueError as err:
                raise CheckpointError(f"{config_file} is not valid JSON ({err}); re-save the folder") from None
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = _read_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    checkpoint = checkpoint_from_mapping(obj, entry, str(path.parent if config else path))
    if config:
        checkpoint.model_config = config
    return checkpoint


def as_checkpoint(source: Union[PathLike, "Checkpoint", Mapping[str, Any]], entry: str = "auto") -> "Checkpoint":
    """A :class:`Checkpoint` as it is, or read from a file / folder, or made from an in-memory state dict."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return checkpoint_from_mapping(source, entry)
    return read_checkpoint(source, entry)


# -- comparing and adapting --------------------------------------------------------------------------


def group_keys(keys: Sequence[str], limit: int = 6) -> str:
    """Summarise many keys as patterns with counts, e.g. ``stages.*.blocks.*.mixer.q.weight (x15)``."""
    counts = Counter(re.sub(r"\.\d+(?=\.)", ".*", k) for k in keys)
    parts = [f"{pattern} (x{n})" if n > 1 else pattern for pattern, n in counts.most_common(limit)]
    if len(counts) > limit:
        parts.append(f"... {len(counts) - limit} more patterns")
    return f"{len(keys)} entries: " + ", ".join(parts)


def _squeezed_equal(a: torch.Size, b: torch.Size) -> bool:
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _resize_table(value: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of a Swin bias table ``(S*S, heads)`` to ``(size, heads)``."""
    s, t = int(value.shape[0] ** 0.5), int(size**0.5)
    grid = value.T.reshape(1, value.shape[1], s, s).float()
    return F.interpolate(grid, size=(t, t), mode="bicubic").reshape(value.shape[1], size).T.to(value.dtype)


def _resize_rel(value: torch.Tensor, size: int) -> torch.Tensor:
    """Linear resize of a Halo relative-logit table ``(2w-1, d)`` to ``(size, d)``."""
    out = F.interpolate(value.T[None].float(), size=size, mode="linear", align_corners=True)
    return out[0].T.to(value.dtype)


def _resize_pos(value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a PVT position embedding ``(1, C, h, w)``."""
    return F.interpolate(value.float(), size=size, mode="bilinear", align_corners=True).to(value.dtype)


def _read_label_map(label_map: Union[PathLike, Sequence[int]]) -> list[int]:
    """A label map file has one source class index per line (the official format)."""
    if isinstance(label_map, (str, Path)):
        lines = Path(label_map).read_text().split()
        try:
            return [int(v) for v in lines]
        except ValueError:
            raise CheckpointError(f"label map {label_map} must hold one integer class index per line") from None
    return [int(v) for v in label_map]


def model_layer_names(model: nn.Module) -> tuple[str, str]:
    """The classifier and first conv of a model, from its timm ``pretrained_cfg`` (default: the unified backbone's)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier") or "head.fc", cfg.get("first_conv") or "stem.conv1"


def adapt_state_dict(
    state_dict: StateDict, model: nn.Module, label_map: Optional[Union[PathLike, Sequence[int]]] = None
) -> tuple[StateDict, list[str], list[str]]:
    """Fit a converted state dict to ``model``; return it, the adaptations made and unfixable mismatches.

    The classifier and the first conv are found by their names in the model's ``pretrained_cfg``.
    """
    target = model.state_dict()
    classifier, first_conv = model_layer_names(model)
    out: StateDict = {}
    adapted: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        if key not in target:
            out[key] = value
            continue
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif value.numel() == target[key].numel() and _squeezed_equal(value.shape, want):
            out[key] = value.reshape(want)
        elif key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want[1]:
            out[key] = _resize_table(value, want[0])
            adapted.append(f"{key}: bicubic {tuple(value.shape)} -> {tuple(want)}")
        elif key.endswith(("height_rel", "width_rel")) and value.ndim == 2 and value.shape[1] == want[1]:
            out[key] = _resize_rel(value, want[0])
            adapted.append(f"{key}: linear {tuple(value.shape)} -> {tuple(want)}")
        elif key.endswith("pos_embed") and value.ndim == 4 and value.shape[:2] == want[:2]:
            out[key] = _resize_pos(value, tuple(want[2:]))
            adapted.append(f"{key}: bilinear {tuple(value.shape)} -> {tuple(want)}")
        elif key.startswith(classifier + ".") and value.shape[1:] == want[1:]:
            if label_map is not None:
                rows = _read_label_map(label_map)
                if len(rows) != want[0] or max(rows) >= value.shape[0] or min(rows) < 0:
                    raise CheckpointError(
                        f"label map has {len(rows)} entries (indices up to {max(rows)}) but the model has "
                        f"{want[0]} classes and the checkpoint {value.shape[0]}"
                    )
                out[key] = value[rows]
                adapted.append(f"{key}: rows selected by the label map ({value.shape[0]} -> {want[0]} classes)")
            elif key.endswith("weight"):
                adapted.append(
                    f"{classifier}: checkpoint has {value.shape[0]} classes, model {want[0]}: classifier re-initialised"
                )
        elif key == first_conv + ".weight" and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            out[key] = adapt_input_conv(want[1], value)
            adapted.append(f"{key}: input channels {value.shape[1]} -> {want[1]}")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if not any(k.startswith(classifier + ".") for k in target):
        dropped = [k for k in out if k.startswith(classifier + ".")]
        for k in dropped:
            del out[k]
        if dropped:
            adapted.append(f"{classifier}: the model has no classifier, checkpoint classifier dropped")
    return out, adapted, mismatched


# -- loading ------------------------------------------------------------------------------------------


def load_checkpoint(
    model: nn.Module,
    source: Union[PathLike, Checkpoint, Mapping[str, Any]],
    *,
    entry: str = "auto",
    strict: bool = True,
    label_map: Optional[Union[PathLike, Sequence[int]]] = None,
    guess: Optional[Guess] = None,
) -> LoadReport:
    """Load weights into ``model``, all or nothing.

    Args:
        model: the model to load into.
        source: a :class:`Checkpoint` already read, a checkpoint file or weights folder, or an
            in-memory checkpoint / state dict (upstream layouts are converted automatically).
        entry: which state dict of a training checkpoint (see :func:`read_checkpoint`).
        strict: require every model parameter to be in the checkpoint and nothing else.
        label_map: file (one class index per line) or list selecting classifier rows.
        guess: names the model a mismatching state dict looks like, for the error message.

    Returns:
        A :class:`LoadReport`; raises :class:`CheckpointError` without touching the model otherwise.

    A model that knows how its checkpoints map onto it (a segmentor: whole, or a backbone's
    weights with fresh heads) defines ``load_from(checkpoint, entry=, strict=)``, which is used instead.
    """
    checkpoint = as_checkpoint(source, entry)
    if hasattr(model, "load_from") and label_map is None:
        return model.load_from(checkpoint, entry=entry, strict=strict)
    return load_state(model, checkpoint, entry=entry, strict=strict, label_map=label_map, guess=guess)


def load_state(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    entry: str = "auto",
    strict: bool = True,
    label_map: Optional[Union[PathLike, Sequence[int]]] = None,
    guess: Optional[Guess] = None,
) -> LoadReport:
    """Load a read checkpoint's weights into ``model`` by name, all or nothing (:func:`load_checkpoint`'s work)."""
    converted = checkpoint.weights(entry)
    target = model.state_dict()
    converted, part = _part_for(converted, target)
    fitted, adapted, mismatched = adapt_state_dict(converted, model, label_map)
    if part:
        adapted.insert(0, part)
    head = model_layer_names(model)[0] + "."
    reinit_head = any(a.startswith(head[:-1] + ":") for a in adapted)
    missing = [
        k
        for k in target
        if k not in converted and not k.endswith("num_batches_tracked") and not (reinit_head and k.startswith(head))
    ]
    unexpected = [k for k in converted if k not in target and not (k.startswith(head) and reinit_head)]
    if mismatched or (strict and (missing or unexpected)):
        looks_like = guess(converted) if guess is not None else None
        raise CheckpointError(_mismatch_message(checkpoint.path, model, looks_like, mismatched, missing, unexpected))
    model.load_state_dict({k: fitted.get(k, v) for k, v in target.items()}, strict=True)
    return LoadReport(checkpoint.path, checkpoint.source, checkpoint.entry_of(entry), adapted, missing, unexpected)


def _part_for(state_dict: StateDict, target: Mapping[str, Any]) -> tuple[StateDict, Optional[str]]:
    """The part of a checkpoint under the prefix that holds the model's keys (a detector's backbone), or all of it."""
    if any(k in target for k in state_dict):
        return state_dict, None
    prefixes = Counter(k[: i + 1] for k in state_dict for i, c in enumerate(k) if c == "." and k[i + 1 :] in target)
    if not prefixes:
        return state_dict, None
    prefix = prefixes.most_common(1)[0][0]
    part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return part, f"took the {prefix!r} part of the checkpoint ({len(part)} of {len(state_dict)} entries)"


def _mismatch_message(
    path: PathLike, model: nn.Module, guess: Optional[str], mismatched: list[str], missing: list[str],
    unexpected: list[str],
) -> str:
    """A grouped explanation of why a checkpoint does not fit, naming the architecture it looks like."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    lines = [f"checkpoint {path} does not fit {arch}; the model was left unchanged."]
    if guess and guess != arch:
        lines.append(f"This checkpoint looks like {guess}, not {arch}: create that model instead.")
    if mismatched:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        lines.append(f"Shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:5]) + more)
    if missing:
        lines.append(f"Missing from the checkpoint: {group_keys(missing)}")
    if unexpected:
        lines.append(f"Not in the model: {group_keys(unexpected)}")
    return "\n".join(lines)
