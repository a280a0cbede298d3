"""Fair by construction: a mixer placed at the paper's four budgets.

The paper compares mixers at matched budgets: at each scale its five models have about the same
parameters and MACs. :func:`budget` is that envelope — the min..max of the five models' exact
parameters and of their MACs at 224² (``macs_paper``, the paper's convention) — and :func:`fit_budget`
places any mixer inside it, keeping the paper's design:

* the knobs: the depth of the third stage, the depth of the other three (moved together, so the
  pattern stays), the width (stage widths stay multiples of the head dimension, in the starting
  design's proportions, e.g. C, 2C, 4C, 8C), and the mixer's own options where it declares them
  (:attr:`TokenMixer.knobs`, e.g. a kernel size or the block's ``mlp_ratio``);
* the start: the mixer's registered configuration at that scale (a paper model's published one),
  else the paper's Halo/Swin skeleton of the scale;
* the rule: change as few knobs of the start as possible — none if it is already inside — depths
  before widths and options (the paper scales its models by depth first), and among the settings
  that change that many, take the one closest to the middle of the envelope.

Costs are counted on the meta device (shapes only) from one model per width and option setting:
every block's parameters and MACs are measured once and the depths are summed, so a search visits
thousands of designs in seconds. When no setting within three changed knobs lands inside, the
result says so and is the closest one found.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import yaml

from . import configs, zoo
from .backbone import UnifiedNet
from .configs import SCALES, Family, ModelCfg
from .costs import costs_by_block
from .files import atomic_write_text
from .mixers import TokenMixer, get_mixer, mixer_options

MAX_CHANGES = 3
DEPTH_KNOBS = ("depth3", "outer_depth")


@dataclass(frozen=True)
class Budget:
    """A scale's envelope: the min..max of the paper's five models' parameters and MACs at 224²."""

    scale: str
    params: tuple[int, int]
    macs: tuple[int, int]

    def inside(self, params: int, macs: int) -> bool:
        """Whether a model's parameters and MACs both lie in the envelope."""
        return self.params[0] <= params <= self.params[1] and self.macs[0] <= macs <= self.macs[1]

    def outside(self, params: int, macs: int) -> float:
        """How far outside the envelope a model lies, in envelope widths (0 inside)."""
        def beyond(x: int, low_high: tuple[int, int]) -> float:
            low, high = low_high
            return max(low - x, x - high, 0) / (high - low)
        return math.hypot(beyond(params, self.params), beyond(macs, self.macs))

    def off_middle(self, params: int, macs: int) -> float:
        """Distance from the middle of the envelope, in envelope widths."""
        def off(x: int, low_high: tuple[int, int]) -> float:
            low, high = low_high
            return (x - (low + high) / 2) / (high - low)
        return math.hypot(off(params, self.params), off(macs, self.macs))

    def __str__(self) -> str:
        return (f"{self.scale}: {self.params[0] / 1e6:.2f}-{self.params[1] / 1e6:.2f}M params, "
                f"{self.macs[0] / 1e9:.2f}-{self.macs[1] / 1e9:.2f}G MACs at 224")


def budget(scale: str) -> Budget:
    """The envelope of the paper's five models at ``scale`` (micro, tiny, small, base), as the zoo lists it."""
    if scale not in configs.BUDGETS:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    return Budget(scale, *configs.BUDGETS[scale])


def measure_budget(scale: str) -> Budget:
    """The envelope measured from the paper's five models (what :data:`configs.BUDGETS` records)."""
    costs = [_total(zoo.model_cfg(name)) for name in zoo.paper_models(scale)]
    params, macs = [p for p, _ in costs], [m for _, m in costs]
    return Budget(scale, (min(params), max(params)), (min(macs), max(macs)))


@dataclass(frozen=True)
class Fitted:
    """Where a mixer landed at a scale: its configuration, costs, the budget and what was changed."""

    cfg: ModelCfg
    params: int
    macs: int
    budget: Budget
    changed: dict[str, Any] = field(default_factory=dict)

    @property
    def inside(self) -> bool:
        """Whether parameters and MACs both lie in the budget's envelope."""
        return self.budget.inside(self.params, self.macs)

    def __str__(self) -> str:
        where = "inside" if self.inside else "OUTSIDE (the closest setting found)"
        changed = ", ".join(f"{k}={v}" for k, v in self.changed.items()) or "nothing (the start is inside)"
        return (f"{self.budget.scale}: depths={self.cfg.depths} dims={self.cfg.dims} heads={self.cfg.heads} "
                f"mlp_ratios={self.cfg.mlp_ratios} mixer_args={dict(self.cfg.mixer_args)}: "
                f"{self.params / 1e6:.2f}M params, {self.macs / 1e9:.2f}G MACs, {where} the envelope "
                f"{self.budget.params[0] / 1e6:.2f}-{self.budget.params[1] / 1e6:.2f}M / "
                f"{self.budget.macs[0] / 1e9:.2f}-{self.budget.macs[1] / 1e9:.2f}G; changed: {changed}")


# -- costs --------------------------------------------------------------------------------------------------

_PROBE_DEPTH = 4  # blocks 0 and 1 may differ (position encodings); from block 2 on, designs alternate by 2
Cost = tuple[int, int]  # (parameters, MACs at 224 in the paper's convention)


class _Design:
    """The costs of one width and option setting, for any depths: measured once on the meta device."""

    def __init__(self, cfg: ModelCfg) -> None:
        # block 1 is special only when it carries the position encoding; otherwise block 3 costs what block 1 does
        depth = _PROBE_DEPTH if cfg.pos_embed is not None and cfg.pos_embed_blocks == 1 else _PROBE_DEPTH - 1
        with torch.device("meta"):
            parts = costs_by_block(UnifiedNet(cfg.replace(depths=(depth,) * len(cfg.depths))))
        self.rest: Cost = parts.get("rest", (0, 0))
        self.blocks = [[parts.get((s, b - 2 if b >= depth else b), (0, 0))
                        for b in range(_PROBE_DEPTH)] for s in range(len(cfg.depths))]
        self.stage_costs: list[list[Cost]] = [[(0, 0)] for _ in cfg.depths]  # stage s at depth d: [s][d]

    def stage(self, s: int, depth: int) -> Cost:
        """The blocks of stage ``s`` at ``depth``."""
        costs = self.stage_costs[s]
        while len(costs) <= depth:
            b = len(costs) - 1
            p, m = self.blocks[s][b if b < 2 else 2 + b % 2]
            costs.append((costs[-1][0] + p, costs[-1][1] + m))
        return costs[depth]

    def total(self, depths: Sequence[int]) -> Cost:
        """Parameters and MACs of the design at these depths."""
        params, macs = self.rest
        for s, depth in enumerate(depths):
            p, m = self.stage(s, depth)
            params, macs = params + p, macs + m
        return params, macs


_DESIGNS: dict[str, _Design] = {}


def _design(cfg: ModelCfg) -> _Design:
    """The measured costs of a design (cached by everything but its depths)."""
    key = repr(cfg.replace(depths=(1,) * len(cfg.depths)).to_dict())
    if key not in _DESIGNS:
        _DESIGNS[key] = _Design(cfg)
    return _DESIGNS[key]


def _total(cfg: ModelCfg) -> Cost:
    """Parameters and MACs (paper convention, 224²) of a configuration."""
    return _design(cfg).total(cfg.depths)


# -- the search -----------------------------------------------------------------------------------------------


def skeleton(mixer: str, scale: str) -> ModelCfg:
    """The paper's Halo/Swin skeleton of a scale with another mixer: where a new mixer's search starts."""
    return ModelCfg(mixer, (1,), (1,)).replace(**configs.SKELETON[scale], norm_eps=1e-6)


def start_cfg(mixer: str, scale: str) -> ModelCfg:
    """Where a search starts: the mixer's registered configuration at ``scale``, else the paper's skeleton."""
    for family in zoo.FAMILIES.values():
        cfg = family.configs.get(scale)
        if cfg is not None and cfg.mixer == mixer:
            return cfg
    return skeleton(mixer, scale)


def _with_width(cfg: ModelCfg, k: int) -> ModelCfg:
    """The design with ``k`` heads in the first stage, every stage's head dimension and head proportions kept."""
    heads = cfg.heads or tuple(max(d // 32, 1) for d in cfg.dims)
    head_dims = [d // h for d, h in zip(cfg.dims, heads)]
    new_heads = tuple(max(round(k * h / heads[0]), 1) for h in heads)
    dims = tuple(h * hd for h, hd in zip(new_heads, head_dims))
    return cfg.replace(dims=dims, heads=None if cfg.heads is None else new_heads)


def _knobs(cfg: ModelCfg, mixer: type[TokenMixer]) -> dict[str, list[Any]]:
    """Every knob with the values a search may give it (the start's value first)."""
    heads = cfg.heads or tuple(max(d // 32, 1) for d in cfg.dims)
    deep = cfg.depths[-2]  # the third stage carries the depth; the others keep their pattern, moved together
    knobs: dict[str, list[Any]] = {
        "depth3": [deep] + [d for d in range(1, max(3 * deep, 32) + 1) if d != deep],
        "outer_depth": [0] + [d for d in (-2, -1, 1, 2, 3) if min(cfg.depths) + d >= 1],
    }
    knobs["width"] = [heads[0]] + [k for k in range(max(1, heads[0] - 3), heads[0] + 4) if k != heads[0]]
    accepted = mixer_options(mixer.mixer_name)
    for name, values in mixer.knobs.items():
        if name == "mlp_ratio":
            current = cfg.mlp_ratios if isinstance(cfg.mlp_ratios, (int, float)) else None
        elif name in accepted:
            current = cfg.mixer_args.get(name, accepted[name])
        else:
            raise ValueError(f"mixer {mixer.mixer_name!r} declares the knob {name!r}, which is not one of its options "
                             f"({', '.join(accepted) or 'none'}) nor 'mlp_ratio'")
        knobs[name] = [current] + [v for v in values if v != current]
    return knobs


def _depths(depths: Sequence[int], setting: dict[str, Any]) -> list[int]:
    """The stage depths of a setting: the third stage's own, the others moved by ``outer_depth``."""
    outer = setting.get("outer_depth", 0)
    out = [d + outer for d in depths]
    out[-2] = setting.get("depth3", depths[-2])
    return out


def _structure(cfg: ModelCfg, setting: dict[str, Any]) -> ModelCfg:
    """The start design with its width and option knobs set (depths unchanged)."""
    mixer_args = {**cfg.mixer_args, **{k: v for k, v in setting.items() if k not in ("width", "mlp_ratio")}}
    out = cfg.replace(mixer_args=mixer_args)
    if setting.get("mlp_ratio") is not None:
        out = out.replace(mlp_ratios=setting["mlp_ratio"])
    return _with_width(out, setting["width"]) if "width" in setting else out


def search(mixer: Union[str, type[TokenMixer]], scale: str, start: Optional[ModelCfg] = None,
           max_changes: int = MAX_CHANGES) -> Fitted:
    """Fit a mixer at one scale (see the module docstring); the result says whether it landed inside."""
    target = budget(scale)
    name = mixer if isinstance(mixer, str) else getattr(mixer, "mixer_name", None)
    if name is None:
        raise ValueError(f"{mixer!r} is not a registered mixer: decorate its class with @register_mixer(name)")
    cls = get_mixer(name)
    start = (start or start_cfg(name, scale)).replace(mixer=name)
    knobs = _knobs(start, cls)
    closest: Optional[tuple[float, dict[str, Any], Cost]] = None
    for changes in range(max_changes + 1):
        for structural_changes in range(changes + 1):  # depth before width and options: cheaper, and the paper's way
            found = []
            for names in itertools.combinations(knobs, changes):
                if sum(n not in DEPTH_KNOBS for n in names) != structural_changes:
                    continue
                for values in itertools.product(*(knobs[n][1:] for n in names)):
                    setting = dict(zip(names, values))
                    structural = {k: v for k, v in setting.items() if k not in DEPTH_KNOBS}
                    cost = _design(_structure(start, structural)).total(_depths(start.depths, setting))
                    if target.inside(*cost):
                        found.append((target.off_middle(*cost), setting, cost))
                    elif closest is None or target.outside(*cost) < closest[0]:
                        closest = (target.outside(*cost), setting, cost)
            if found:
                return _fitted(start, target, *min(found, key=lambda f: f[0])[1:])
    return _fitted(start, target, *closest[1:])


def _fitted(start: ModelCfg, target: Budget, setting: dict[str, Any], cost: Cost) -> Fitted:
    """The result of a search: the start with a setting of its knobs."""
    structural = {k: v for k, v in setting.items() if k not in DEPTH_KNOBS}
    cfg = _structure(start, structural).replace(depths=tuple(_depths(start.depths, setting)))
    return Fitted(cfg, cost[0], cost[1], target, setting)


def fit_budget(mixer: Union[str, type[TokenMixer]], scale: str) -> ModelCfg:
    """The configuration of a mixer at a scale's budget (registered name or mixer class); see :func:`search`."""
    return search(mixer, scale).cfg


def fit_family(name: str, mixer: Union[str, type[TokenMixer]], scales: Sequence[str] = SCALES,
               recipe: str = "transformer") -> tuple[Family, dict[str, Fitted]]:
    """Fit a mixer at each scale and register the models as ``unified_<name>_<scale>``; returns the family and fits."""
    fits = {scale: search(mixer, scale) for scale in scales}
    family = Family(name, {scale: f.cfg for scale, f in fits.items()}, "fitted to the paper's budgets", {}, recipe)
    zoo.register(family)
    return family, fits


def save_family(family: Family, path: Union[str, Path]) -> Path:
    """Write a family's configurations as YAML (``tokenmixers --import FILE.yaml`` registers them again)."""
    data = {"family": family.name, "recipe": family.recipe, "source": family.source,
            "scales": {scale: cfg.to_dict() for scale, cfg in family.configs.items()}}
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_family(path: Union[str, Path]) -> Family:
    """Register the family a :func:`save_family` YAML file describes; its mixer must be registered already."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
        configs_ = {scale: ModelCfg(**cfg) for scale, cfg in data["scales"].items()}
        family = Family(data["family"], configs_, data.get("source", ""), {}, data.get("recipe", "transformer"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a family file written by `tokenmixers fit --out` ({err})") from None
    for cfg in configs_.values():
        get_mixer(cfg.mixer)  # a clear error naming the known mixers when the plug-in was not imported
    return zoo.register(family)


__all__ = ["Budget", "budget", "measure_budget", "Fitted", "search", "fit_budget", "fit_family", "start_cfg", "skeleton", "save_family",
           "load_family"]
