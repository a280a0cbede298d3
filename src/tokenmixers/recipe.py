"""Recipes: typed, validated settings read from YAML files with ``extends`` chains and ``key=value`` overrides.

A task's settings are a frozen dataclass, a :class:`Settings` subclass that names every key with its
type and default. The run engine's keys (:class:`tokenmixers.runs.RunSettings`) are shared by every
task; a task's settings extend them with the task's own keys. A recipe file is a flat YAML mapping of
some of those keys, optionally ``extends: <recipe>``. Overrides are ``key=value`` strings (the value in
YAML syntax) or a mapping. Everything is checked when it is read: an unknown key fails naming the
closest valid one, a value of the wrong type names the type expected, a number outside its range names
the range.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

S = TypeVar("S", bound="Settings")
Overrides = Union[Mapping[str, Any], Sequence[str], None]


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the key or file and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every task's settings: reading from a mapping with checks, ``replace`` and a YAML-safe ``to_dict``."""

    # (lowest, highest) allowed value of numeric settings, None for unbounded; merged over the class hierarchy
    BOUNDS: ClassVar[dict[str, tuple[Optional[float], Optional[float]]]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        """Every setting's name, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def bounds(cls) -> dict[str, tuple[Optional[float], Optional[float]]]:
        """The ranges of numeric settings, a subclass's over its bases'."""
        merged: dict[str, tuple[Optional[float], Optional[float]]] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("BOUNDS", {}))
        return merged

    @classmethod
    def check_keys(cls, keys: Sequence[str], where: str) -> None:
        """Refuse unknown keys, naming the closest valid one."""
        known = cls.keys()
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(known)}"
                raise RecipeError(f"{where}: unknown setting {key!r}{hint}")

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any], where: str = "settings") -> S:
        """Settings from a mapping of some keys (the rest keep their defaults), every value checked."""
        cls.check_keys(list(values), where)
        hints = typing.get_type_hints(cls)
        settings = cls(**{key: _convert(key, value, hints[key], where) for key, value in values.items()})
        settings._check_bounds(where)
        return settings

    def replace(self: S, **changes: Any) -> S:
        """A copy with some settings changed, checked like any other."""
        return type(self).from_dict({**self.to_dict(), **changes}, where="replace")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), ready for YAML or JSON."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def _check_bounds(self, where: str) -> None:
        for key, (low, high) in self.bounds().items():
            value = getattr(self, key, None)
            if value is None:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                allowed = f">= {low}" if high is None else f"between {low} and {high}"
                raise RecipeError(f"{where}: setting {key!r} must be {allowed}, got {value}; set another value in "
                                  f"the recipe or as the override {key}=...")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _describe(hint: Any) -> str:
    """A type hint as a reader would say it: ``int``, ``list of float``, ``one of a, b``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        inner = args[0] if args[-1] is Ellipsis or len(set(args)) == 1 else args
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(inner) if not isinstance(inner, tuple) else inner}"
    return getattr(hint, "__name__", str(hint))


def _convert(key: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against (and, for lists and ints given as floats, converted to) the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> RecipeError:
        return RecipeError(f"{where}: setting {key!r} expects {_describe(hint)}, got {value!r}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(key, value, option, where)
            except RecipeError:
                continue
        raise wrong()
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: setting {key!r} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value):
            raise wrong()
        return tuple(_convert(key, v, h, where) for v, h in zip(value, items))
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise wrong()
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"setting {key!r}: unsupported type {hint!r}")


# -- recipe files ---------------------------------------------------------------------------------------


def list_recipes(folder: Path) -> list[str]:
    """Names of the recipes shipped in a folder."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _resolve(name_or_path: Union[str, Path], folder: Path) -> Path:
    """A shipped recipe name (looked up in ``folder``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(name_or_path)!r} not found; shipped recipes: "
                                f"{', '.join(list_recipes(folder))}, or give a YAML file")
    return path


def _read(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path} is not valid YAML{line}: {getattr(err, 'problem', None) or err}; fix the "
                          "file (settings are `key: value` lines)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of settings (`key: value` lines)")
    return data


def read_recipe(cls: type[Settings], recipe: Union[str, Path, None], folder: Path) -> dict[str, Any]:
    """The values a recipe sets, over the recipes it ``extends`` (names resolve beside the file, else in ``folder``)."""
    chain: list[dict[str, Any]] = []
    seen: set[Path] = set()
    current, here = recipe, folder
    while current is not None:
        try:
            path = _resolve(current, here)
        except FileNotFoundError:
            path = _resolve(current, folder)
        if path.resolve() in seen:
            raise RecipeError(f"recipe {recipe!r} extends itself through {path}")
        seen.add(path.resolve())
        data = _read(path)
        current, here = data.pop("extends", None), path.parent
        cls.check_keys(list(data), f"recipe {path}")
        chain.append(data)
    values: dict[str, Any] = {}
    for data in reversed(chain):
        values.update(data)
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["epochs=5", "opt_betas=[0.9, 0.99]"]`` -> ``{"epochs": 5, "opt_betas": [0.9, 0.99]}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key=value (e.g. epochs=30)")
        try:
            out[key.strip().replace("-", "_")] = _parse_value(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); "
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


def load_settings(cls: type[S], recipe: Union[str, Path, None], overrides: Overrides, folder: Path) -> S:
    """A task's settings: its defaults, then the recipe (a name in ``folder`` or a path), then the overrides."""
    values = read_recipe(cls, recipe, folder) if recipe is not None else {}
    if overrides:
        parsed = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        cls.from_dict(parsed, where="override")  # names an override's own mistakes as the override's
        values.update(parsed)
    return cls.from_dict(values, where=f"recipe {recipe}" if recipe is not None else "settings")


__all__ = ["Settings", "RecipeError", "list_recipes", "read_recipe", "parse_overrides", "load_settings"]
