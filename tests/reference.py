"""Test references shared by several test modules: official-format weights and derivatives by finite differences.

Official-format weights come from the reference recipe, rebuilt from the key names alone.

Both reference sets (``tests/data/stm_eval`` and ``../shared/reference/related-systems``) draw every
tensor from a generator seeded with ``crc32(salt + key)``; see the READMEs there. The paper models'
weights (classification and detection) are shared here by the parity tests and ``conftest.py``.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

STM_EVAL = Path(__file__).parent / "data" / "stm_eval"
CLASSIFICATION_ONLY = re.compile(r"^(conv_head|head|stage_norms)\.")


def official_state_dict(
    entries: Iterable[tuple[str, Sequence[int]]],
    dtype: torch.dtype = torch.float64,
    salt: str = "",
    scale_words: Sequence[str] = ("gamma",),
) -> dict[str, torch.Tensor]:
    """The reference recipe for ``(key, shape)`` entries; ``scale_words`` mark layer scales (``1 + 0.1*randn``)."""
    state = {}
    for key, shape in entries:
        g = torch.Generator().manual_seed(zlib.crc32((salt + key).encode("utf-8")))
        shape = tuple(shape)
        if key.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        else:
            r = torch.randn(shape, generator=g, dtype=torch.float64)
            if key.endswith("running_mean"):
                t = 0.1 * r
            elif any(word in key.rsplit(".", 1)[-1] for word in scale_words):
                t = 1 + 0.1 * r
            elif len(shape) <= 1:
                t = 1 + 0.1 * r if key.endswith("weight") else 0.1 * r
            else:
                t = r / math.sqrt(math.prod(shape[1:]))
        state[key] = t.to(dtype)
    return state


def relative_difference(ours: torch.Tensor, reference: np.ndarray) -> float:
    """``max|ours - reference| / max|reference|``."""
    return float((ours.double() - torch.from_numpy(reference)).abs().max() / np.abs(reference).max())


@lru_cache(maxsize=None)
def paper_entries() -> dict[str, list]:
    """``{model: [(official key, shape), ...]}`` of the 20 paper models (``tests/data/stm_eval/entries.json``)."""
    return json.loads((STM_EVAL / "entries.json").read_text())


def paper_state_dict(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The official-format weights of a paper model by the reference recipe, re-created from the keys alone."""
    return official_state_dict(paper_entries()[name], dtype)


def paper_detection_state_dict(name: str, weights: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The official detection backbone's weights as an mmdet checkpoint holds them (``backbone.<official key>``).

    They are the classification model's official weights (``weights``, if already built) without the
    head and stage norms, plus the out norms, all from the same recipe.
    """
    weights = paper_state_dict(name) if weights is None else weights
    state = {k: v for k, v in weights.items() if not CLASSIFICATION_ONLY.match(k)}
    dims = [shape[0] for key, shape in paper_entries()[name] if re.fullmatch(r"stage_norms\.\d\.weight", key)]
    state.update(official_state_dict([(f"out_norm_{i}.{p}", (dim,)) for i, dim in enumerate(dims) for p in ("weight", "bias")]))
    return {f"backbone.{k}": v for k, v in state.items()}


def derivatives(mixer: torch.nn.Module, x: torch.Tensor, eps: float = 1e-6) -> dict[str, tuple[float, float]]:
    """``{input: (autograd, central difference)}`` of ``sum(u * mixer(x))`` along a random direction of the
    input ``"x"`` and of each parameter in turn (float64; one backward pass, two forward passes per input)."""
    names = [n for n, _ in mixer.named_parameters()]
    inputs = [x.detach().requires_grad_(x.requires_grad)] + [p.detach().clone().requires_grad_() for p in mixer.parameters()]

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mixer, dict(zip(names, tensors[1:])), (tensors[0],))

    out = f(*inputs)
    u = torch.randn_like(out)
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, u, allow_unused=True))
    result = {}
    for i, (name, t) in enumerate(zip(["x", *names], inputs)):
        if not t.requires_grad:
            continue
        grad, v = next(grads), torch.randn_like(t)
        with torch.no_grad():
            plus = f(*inputs[:i], t + eps * v, *inputs[i + 1 :])
            minus = f(*inputs[:i], t - eps * v, *inputs[i + 1 :])
        result[name] = (0.0 if grad is None else float((grad * v).sum()), float(((plus - minus) * u).sum() / (2 * eps)))
    return result
