"""Small shape helpers shared by the windowed mixers and models (all tensors channels-last)."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsLastBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the channels of ``(B, H, W, C)`` tokens (an NCHW view, no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule``: conv (no bias when normed) -> BatchNorm -> ReLU; ``norm``/``act`` off for the FPN neck."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's init of every unit
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)``."""
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


def _pair(window: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (window, window) if isinstance(window, int) else (window[0], window[1])


def pad_to_multiple(x: torch.Tensor, window: Union[int, tuple[int, int]]) -> torch.Tensor:
    """Zero-pad ``(B, H, W, C)`` at the bottom and right so that H, W divide the window size."""
    wh, ww = _pair(window)
    _, H, W, _ = x.shape
    pad_h, pad_w = -H % wh, -W % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(x: torch.Tensor, window: Union[int, tuple[int, int]]) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W divisible by the window -> ``(B, nH * nW, wh * ww, C)``."""
    wh, ww = _pair(window)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_merge(x: torch.Tensor, window: Union[int, tuple[int, int]], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nH * nW, wh * ww, C) -> (B, H, W, C)``."""
    wh, ww = _pair(window)
    B, _, _, C = x.shape
    x = x.view(B, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q @ k^T / sqrt(d) + bias) @ v`` over the last two dims; ``bias`` broadcasts against the logits.

    When the bias is trained on CPU, PyTorch's fused attention cannot give it a gradient and falls back to a
    reference path that scales q and k separately and keeps both copies for the backward pass (7 % more peak
    training memory than the official models); written out, only the softmax is kept.
    """
    if q.device.type != "cpu" or not (torch.is_grad_enabled() and bias.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = torch.add(bias, q @ k.transpose(-2, -1), alpha=q.shape[-1] ** -0.5)
    return logits.softmax(-1) @ v


def check_batch_statistics(training: bool, values_per_channel: int, where: str) -> None:
    """BatchNorm in training needs more than one value per channel; say what to do instead of torch's
    "Expected more than 1 value per channel"."""
    if training and values_per_channel < 2:
        raise ValueError(
            f"{where} uses BatchNorm over the batch, so training needs more than one value per channel: use at least "
            "2 samples per process (batch_size >= 2) or, for a single image, call model.eval()"
        )


def masked_value(dtype: torch.dtype) -> float:
    """The additive logit used for masked keys: the most negative finite value of ``dtype``."""
    return torch.finfo(dtype).min


def num_windows(size: int, window: int) -> int:
    """How many windows of ``window`` cover ``size`` once it is padded to a multiple."""
    return math.ceil(size / window)


F_ = TypeVar("F_", bound=Callable[..., Any])


def size_cache(fn: F_) -> F_:
    """Memoise a pure function of sizes/devices/dtypes that builds constant tensors (masks, indices).

    The cache is bypassed while ``torch.compile``/``torch.export`` trace (their fake tensors must not
    be stored) and for the meta device. Entries are built outside inference mode: an inference tensor
    cached by an evaluation under ``torch.inference_mode`` could not be used by a later training step.
    """
    cache: dict[tuple, Any] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        if torch.compiler.is_compiling() or any(isinstance(a, torch.device) and a.type == "meta" for a in args):
            return fn(*args)
        if args not in cache:
            if len(cache) >= 128:
                cache.clear()
            with torch.inference_mode(False):
                cache[args] = fn(*args)
        return cache[args]

    return wrapper  # type: ignore[return-value]


@size_cache
def window_mask(
    H: int, W: int, wh: int, ww: int, shift_h: int, shift_w: int, device: torch.device, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    """Additive mask ``(nWindows, 1, wh*ww, wh*ww)`` for a (shifted) padded map, or None if unneeded.

    ``H x W`` is the real map, padded at the bottom/right to multiples of ``wh x ww`` and rolled by
    ``(-shift_h, -shift_w)``. Tokens may attend to each other only if they come from the same region
    of the rolled map (the Swin shift mask) and are both real or both padding.
    """
    Hp, Wp = num_windows(H, wh) * wh, num_windows(W, ww) * ww
    if (Hp, Wp, shift_h, shift_w) == (H, W, 0, 0):
        return None

    def regions(size: int, window: int, shift: int) -> torch.Tensor:
        r = torch.zeros(size, dtype=torch.long)
        if shift:
            r[size - window : size - shift] = 1
            r[size - shift :] = 2
        return r

    region = regions(Hp, wh, shift_h)[:, None] * 3 + regions(Wp, ww, shift_w)[None, :]
    pad = torch.zeros(Hp, Wp, dtype=torch.long)
    pad[H:, :] = 1
    pad[:, W:] = 1
    group = region * 2 + torch.roll(pad, (-shift_h, -shift_w), (0, 1))
    group = window_partition(group[None, :, :, None], (wh, ww))[0, :, :, 0]  # nW, N
    different = group[:, :, None] != group[:, None, :]
    mask = torch.zeros(different.shape, dtype=dtype).masked_fill(different, masked_value(dtype))
    return mask.unsqueeze(1).to(device)
