"""What a model costs: parameters and MACs, in total and per part of the unified backbone.

Two MAC conventions:

* ``macs``: every multiply-accumulate of convolutions, linear layers and matrix products,
  attention included (``torch.utils.flop_counter``; flops / 2).
* ``macs_paper``: the module-hook convention (mmcv/fvcore style) behind most numbers of the
  paper's Table IV: ``nn.Conv2d`` (with bias) and ``nn.Linear`` (without) modules, 2 per element of the
  LayerNorms inside blocks and of the head's BatchNorm, 1 per pooled element, ignoring functional products such as
  attention QK^T/AV. (The official stem, downsampling and stage norms were a LayerNorm subclass
  that this convention skipped, so they are skipped here too. The paper's Swin numbers use the
  full count instead, see the README.) A module that projects with weights of its own instead of
  Linear modules counts those products in a ``paper_macs(inputs, output)`` method (SS2D's
  per-direction projections): they are weights, not data-dependent products like attention's.

Both work on the meta device (shapes only, no arithmetic), which is how the budget fitter counts.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbone import Head

aten = torch.ops.aten


def _sdpa_cpu_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """FLOPs of a fused CPU attention call: QK^T and AV, 2 per multiply-accumulate."""
    batch = math.prod(q[:-2])
    return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])


_CUSTOM_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _paper_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
    """The paper convention's MACs of one module call (its own work, not its children's)."""
    if isinstance(module, nn.Conv2d):
        per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out.numel() * (per_out + (module.bias is not None))
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        return 2 * out.numel()
    if isinstance(module, Head) and module.global_pool == "avg":
        return inputs[0][..., :1].numel() * module.hidden_dim  # the average pool
    own = getattr(module, "paper_macs", None)  # projections a module computes with its own weights, not in modules
    return own(inputs, out) if own is not None else 0


_OUTER_NORM = re.compile(r"^stem\.norm|\.downsample\.norm$|^stages\.\d+\.norm$")


def count_macs(model: nn.Module, input_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> dict[str, int]:
    """MACs of one image in both conventions (see module docstring)."""
    x = torch.randn(1, in_chans, *input_size, device=next(model.parameters()).device)
    paper = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal paper
        paper += _paper_macs(module, inputs, out)

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if not _OUTER_NORM.search(n)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"macs": counter.get_total_flops() // 2, "macs_paper": paper}


_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def costs_by_block(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> dict[Any, tuple[int, int]]:
    """Parameters and paper-convention MACs of a unified model, split into its blocks and the rest.

    Keys are ``(stage, block)`` for the blocks' own costs and ``"rest"`` for the stem, downsampling,
    stage norms, position embeddings and head; values are ``(params, macs_paper)``.
    """
    def key(name: str) -> Any:
        found = _BLOCK.match(name + ".")
        return (int(found.group(1)), int(found.group(2))) if found else "rest"

    params: Counter = Counter()
    for name, p in model.named_parameters():
        params[key(name)] += p.numel()
    macs: Counter = Counter()

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            macs[key(name)] += _paper_macs(module, inputs, out)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not _OUTER_NORM.search(n)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, *input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (params[k], macs[k]) for k in set(params) | set(macs)}


__all__ = ["count_params", "count_macs", "costs_by_block"]
