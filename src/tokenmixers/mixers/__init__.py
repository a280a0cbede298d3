"""Spatial token mixers and the one contract they share.

The mixer contract
------------------
A mixer is a subclass of :class:`TokenMixer`, registered by name with :func:`register_mixer`,
built as ``Mixer(dim, num_heads=..., block_index=..., **options)``. Its ``forward`` maps a
channels-last tensor ``(B, H, W, C)`` to a tensor of the same shape.

* **Layout: channels-last ``(B, H, W, C)`` in and out.** Every block norm is a LayerNorm over
  channels and every projection a Linear; both act on the last dim, so blocks never permute.
  A mixer that needs NCHW (a depth-wise conv, ``grid_sample``) takes ``x.permute(0, 3, 1, 2)``,
  which is a free view with channels-last strides.
* **Any size: H, W >= 1.** A mixer that works on windows pads internally, masks the padding so
  that it never acts as a real token, and crops its output back to ``H x W``.
* **Position in the network:** a mixer knows only ``block_index``, the index of its block within
  its stage, which is what alternating designs (shifted windows, LSA/GSA) need. Per-stage
  options (e.g. PVT's ``sr_ratio``) arrive as ordinary keyword options.
* **Initialisation:** after construction the backbone re-initialises every ``nn.Linear`` and
  ``nn.Conv2d`` (trunc-normal std 0.02, zero bias), as the official models do; a mixer
  initialises only its other parameters (relative-position tables, embeddings).
* **Weight decay:** :meth:`TokenMixer.no_weight_decay` names the mixer's parameters that must not
  be decayed (position tables).
* **Budget knobs:** :attr:`TokenMixer.knobs` may name options the budget fitter is allowed to change,
  with the values it may try (``{"kernel_size": (3, 5, 7)}``; ``mlp_ratio`` names the block's MLP
  ratio). A mixer that declares none is fitted to the paper's budgets by width and depth alone.

The backbone never inspects which mixer it holds.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

__all__ = ["TokenMixer", "register_mixer", "get_mixer", "create_mixer", "list_mixers", "mixer_options"]


class TokenMixer(nn.Module):
    """Base class of every spatial token mixer: ``(B, H, W, C) -> (B, H, W, C)``."""

    # options the budget fitter may change and the values it may try ("mlp_ratio": the block's MLP ratio)
    knobs: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, dim: int, num_heads: int = 1, block_index: int = 0) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.block_index = block_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Mix tokens spatially: ``(B, H, W, C) -> (B, H, W, C)``."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters excluded from weight decay."""
        return set()


_MIXERS: dict[str, type[TokenMixer]] = {}
M = TypeVar("M", bound=type[TokenMixer])


def register_mixer(name: str) -> Callable[[M], M]:
    """Class decorator that registers a :class:`TokenMixer` subclass under ``name``."""

    def wrap(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
            raise TypeError(f"mixer {name!r} must subclass tokenmixers.mixers.TokenMixer")
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise KeyError(f"a different mixer is already registered as {name!r}")
        _MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return wrap


def list_mixers() -> list[str]:
    """Names of all registered mixers, sorted."""
    return sorted(_MIXERS)


def get_mixer(name: str) -> type[TokenMixer]:
    """The mixer class registered as ``name``; ``KeyError`` naming the known mixers otherwise."""
    try:
        return _MIXERS[name]
    except KeyError:
        raise KeyError(f"unknown mixer {name!r}; registered mixers: {', '.join(list_mixers())}") from None


def mixer_options(name: str) -> dict[str, Any]:
    """The keyword options a mixer accepts, with their defaults."""
    params = inspect.signature(get_mixer(name).__init__).parameters
    fixed = {"self", "dim", "num_heads", "block_index"}
    return {
        p.name: p.default
        for p in params.values()
        if p.name not in fixed and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def create_mixer(name: str, dim: int, num_heads: int = 1, block_index: int = 0, **options: Any) -> TokenMixer:
    """Build mixer ``name``; unknown options raise a ``ValueError`` listing the accepted ones."""
    cls = get_mixer(name)
    accepted = mixer_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for mixer {name!r}; "
            f"accepted options: {', '.join(accepted) or '(none)'}"
        )
    return cls(dim, num_heads=num_heads, block_index=block_index, **options)


# Built-in mixers register themselves on import.
# focal, gated_cnn, pool and ss2d were published after the paper and have no model families yet
from . import (  # noqa: E402,F401
    dcnv3,
    dwconv,
    dyn_dwconv,
    focal,
    gated_cnn,
    halo,
    idyn_dwconv,
    pool,
    sra,
    ss2d,
    stvit,
    swin,
    twins,
)
