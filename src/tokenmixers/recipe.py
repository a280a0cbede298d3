"""Training recipes: YAML files shipped with the package, ``extends`` chains and overrides.

A recipe is a flat mapping of settings. ``defaults.yaml`` lists every setting with its default;
``transformer.yaml`` and ``cnn.yaml`` are the paper's two recipes (Table III) and ``digits.yaml``
is the quick CPU recipe of the demo. Any key can be overridden as ``key=value`` (value in YAML
syntax, checked against the default's type).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
# settings whose value may be null although the default is not
NULLABLE = {"auto_augment", "backbone_weights", "color_jitter", "drop_path", "num_classes", "resume", "init_weights", "data", "workers"}
CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "mixup_mode": ("batch", "pair", "elem"),
    "remode": ("pixel", "rand", "const"),
    "compile_backend": ("inductor", "aot_eager", "eager", "cudagraphs"),
}
# (lowest, highest) allowed value of numeric settings; None: unbounded
BOUNDS = {
    "epochs": (1, None), "batch_size": (1, None), "accum_steps": (1, None), "lr": (0, None), "lr_batch": (1, None),
    "warmup_epochs": (0, None), "warmup_lr": (0, None), "min_lr": (0, None), "weight_decay": (0, None),
    "clip_grad": (0, None), "label_smoothing": (0, 0.999), "drop_path": (0, 0.999), "ema_decay": (0, 1),
    "input_size": (32, None), "crop_pct": (0.01, None), "hflip": (0, 1), "reprob": (0, 1), "recount": (1, None),
    "mixup": (0, None), "cutmix": (0, None), "mixup_prob": (0, 1), "mixup_switch_prob": (0, 1), "workers": (0, None),
    "threads": (0, None), "eval_every": (1, None), "log_every": (1, None), "ckpt_every_steps": (0, None),
    "ckpt_every_epochs": (1, None),
    "keep_checkpoints": (1, None), "max_steps_per_epoch": (0, None), "num_classes": (1, None),
}


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read(name_or_path: Union[str, Path]) -> dict[str, Any]:
    """One recipe file, by shipped name or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name_or_path!r} not found; shipped recipes: {', '.join(list_recipes())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ValueError(f"recipe {path} is not valid YAML{line}: {getattr(err, 'problem', None) or err}; "
                         "fix the file (settings are `key: value` lines)") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of settings")
    return data


def load_recipe(name_or_path: Union[str, Path] = "transformer") -> dict[str, Any]:
    """A complete config: the recipe over the recipes it ``extends``, down to ``defaults``."""
    chain, seen = [], set()
    current: Union[str, Path, None] = name_or_path
    while current is not None:
        if str(current) in seen:
            raise ValueError(f"recipe {name_or_path!r} extends itself through {current!r}")
        seen.add(str(current))
        data = _read(current)
        chain.append(data)
        current = data.pop("extends", None)
    config: dict[str, Any] = {}
    for data in reversed(chain):
        unknown = set(data) - set(config) if config else set()
        if unknown:
            raise ValueError(f"recipe {name_or_path!r} sets unknown key(s) {sorted(unknown)}")
        config.update(data)
    return config


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["epochs=5", "opt_betas=[0.9, 0.99]"]`` -> ``{"epochs": 5, "opt_betas": [0.9, 0.99]}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. epochs=30)")
        try:
            out[key.strip().replace("-", "_")] = _parse_value(value)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); "
                             "write lists as [a, b] and quote text with spaces") from None
    return out


def _parse_value(text: str) -> Any:
    """YAML value syntax, plus numbers YAML 1.1 leaves as strings (``2e-3``)."""
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` updated with ``overrides``; unknown keys and wrong types raise ``ValueError``."""
    out = dict(config)
    for key, value in overrides.items():
        if key not in out:
            raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(sorted(out))}")
        default = out[key]
        if value is None:
            if default is not None and key not in NULLABLE:
                raise ValueError(f"setting {key!r} cannot be null")
        elif default is not None and not _same_type(default, value):
            raise ValueError(f"setting {key!r} expects {type(default).__name__} (like {default!r}), got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"setting {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        out[key] = value
    return out


def _same_type(default: Any, value: Any) -> bool:
    """Ints are accepted for floats; everything else must match exactly (bool is not an int here)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_bounds(config: Mapping[str, Any]) -> None:
    """Numeric settings must lie in their range (:data:`BOUNDS`); raise ``ValueError`` naming the first that does not."""
    for key, (low, high) in BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"setting {key!r} must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"between {low} and {high}"
            raise ValueError(f"setting {key!r} must be {allowed}, got {value}; set another value in the recipe "
                             f"or as the override {key}=...")


def build_config(recipe: Union[str, Path] = "transformer", overrides: Union[Mapping[str, Any], Sequence[str], None] = None) -> dict[str, Any]:
    """Load a recipe and apply overrides (a mapping or ``key=value`` strings); check types and ranges."""
    config = load_recipe(recipe)
    if overrides:
        parsed = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        config = apply_overrides(config, parsed)
    check_bounds(config)
    return config
