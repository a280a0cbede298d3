"""Official-format weights from the reference recipe, rebuilt from the key names alone.

Both reference sets (``tests/data/stm_eval`` and ``../shared/reference/related-systems``) draw every
tensor from a generator seeded with ``crc32(salt + key)``; see the READMEs there.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import numpy as np
import torch


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
