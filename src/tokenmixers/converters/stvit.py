"""Converter for the official STViT classification checkpoints (hhb072/STViT).

The official names: the stem ``patch_embed.proj.<i>`` (a Sequential of conv, GELU, BN, four times),
``layers.<s>.blocks.<i>.*`` (``pos_embed.conv``, ``norm1.norm``, ``attn.stoken_refine.{qkv,proj}``,
``norm2``, ``mlp2.{fc1,conv.conv,fc2}``, ``gamma_1``/``gamma_2``), the downsampling at the *end* of
stage ``s`` as ``layers.<s>.downsample.proj.{0,1}``, and the head ``proj``, ``norm``, ``head``. This
module renames every entry onto :mod:`tokenmixers.models.stvit`; 1x1 conv weights and the
``(1, C, 1, 1)`` layer scales are reshaped by the loader.

The checkpoints also store the attention's fixed 3x3 identity kernels (``attn.unfold.weights``,
``attn.fold.weights``, a frozen ``nn.Parameter``) and ``num_batches_tracked``: both are dropped,
the kernels only after checking that they are the identity our neighbourhood gather assumes.
"""
from __future__ import annotations

import re

import torch

_IDENTITY_KERNELS = re.compile(r"\.attn\.(un)?fold\.weights$")
_RENAMES: tuple[tuple[str, object], ...] = (
    (r"^patch_embed\.proj\.(\d+)\.", lambda m: f"stem.{int(m.group(1)) // 3}.{('conv', 'act', 'norm')[int(m.group(1)) % 3]}."),
    (r"^layers\.(\d+)\.downsample\.proj\.0\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.conv."),
    (r"^layers\.(\d+)\.downsample\.proj\.1\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.norm."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.pos_embed\.conv\.", ".pos.proj."),
    (r"\.norm1\.norm\.", ".norm1."),
    (r"\.attn\.stoken_refine\.", ".mixer."),
    (r"\.mlp2\.conv\.conv\.", ".mlp.dwconv.proj."),
    (r"\.mlp2\.", ".mlp."),
    (r"\.gamma_1$", ".ls1.gamma"),
    (r"\.gamma_2$", ".ls2.gamma"),
    (r"^proj\.", "head.proj."),
    (r"^norm\.", "head.bn."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RENAMES)


def is_stvit(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the official STViT key names."""
    return any(".stoken_refine." in k or ".mlp2." in k for k in state_dict)


def rename(key: str) -> str:
    """Map one official key onto tokenmixers' name."""
    for pattern, repl in _COMPILED:
        key = pattern.sub(repl, key)  # type: ignore[arg-type]
    return key


def _check_identity(key: str, value: torch.Tensor) -> None:
    """The fixed unfold/fold kernels must be the 3x3 identity: tokenmixers gathers neighbours without them.

    An EMA copy may be a few ulps off (``d * 1 + (1 - d) * 1`` need not round to 1), hence the tolerance.
    """
    identity = torch.eye(9, dtype=value.dtype).view(9, 1, 3, 3)
    if value.shape != identity.shape or not torch.allclose(value, identity, rtol=0, atol=1e-4):
        raise ValueError(
            f"{key} should be the fixed 3x3 identity kernel of shape (9, 1, 3, 3) that the official STViT code "
            f"never trains, but it holds other values (shape {tuple(value.shape)}); this checkpoint was modified "
            "or comes from another model, and tokenmixers cannot reproduce it"
        )


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official STViT state dict, dropping the checked identity kernels and ``num_batches_tracked``."""
    out = {}
    for key, value in state_dict.items():
        if _IDENTITY_KERNELS.search(key):
            _check_identity(key, value)
        elif not key.endswith("num_batches_tracked"):
            out[rename(key)] = value
    return out
