"""DWNet's dynamic convs, Twins' LSA/GSA and STViT's super tokens: references, masks, budgets, ablations."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenmixers
import tokenmixers.mixers.stvit as stvit_module
import tokenmixers.mixers.twins as twins_module
from tokenmixers.bench import count_macs
from tokenmixers.mixers import create_mixer, list_mixers

from .conftest import garbage_pad_to_multiple, randomised

NEW_FAMILIES = ("dyn_dwconv", "idyn_dwconv", "twins", "stvit")
# the DWConv models of the paper: parameters and all-products MACs at 224
DWCONV_BUDGET = {"micro": (4_439_624, 0.648e9), "tiny": (31_912_360, 4.997e9), "small": (54_393_640, 9.388e9),
                 "base": (95_865_576, 16.621e9)}


# -- DWNet ----------------------------------------------------------------------------------------------


def test_dynamic_dwconv_equals_per_sample_convolutions() -> None:
    m = randomised(create_mixer("dyn_dwconv", 16, reduction=4))
    x = torch.randn(3, 9, 11, 16, dtype=torch.float64)
    kernels = m.kernels(m.in_proj(x)).view(3, 16, 1, 7, 7)
    inner = m.in_proj(x).permute(0, 3, 1, 2)
    expected = torch.stack([F.conv2d(inner[b : b + 1], kernels[b], padding=3, groups=16)[0] for b in range(3)])
    expected = m.out_proj(expected.permute(0, 2, 3, 1) + m.bias)
    assert torch.allclose(m(x), expected, atol=1e-10)


def test_inhomogeneous_dwconv_equals_unfold_reference() -> None:
    m = randomised(create_mixer("idyn_dwconv", 16, num_heads=4, kernel_size=5))
    x = torch.randn(2, 6, 9, 16, dtype=torch.float64)
    inner = m.in_proj(x)
    weight = m.kernels(inner)  # B H W G 25
    cols = F.unfold(inner.permute(0, 3, 1, 2), 5, padding=2).view(2, 4, 4, 25, 6, 9)  # B G Cg k H W
    expected = (cols * weight.permute(0, 3, 4, 1, 2)[:, :, None]).sum(3).reshape(2, 16, 6, 9).permute(0, 2, 3, 1)
    assert torch.allclose(m(x), m.out_proj(expected), atol=1e-10)
    # the custom backward matches autograd's
    p = torch.randn(2, 8, 9, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 7, 2, 9, dtype=torch.float64, requires_grad=True)
    from tokenmixers.mixers.idyn_dwconv import _PixelKernels

    assert torch.autograd.gradcheck(lambda a, b: _PixelKernels.apply(a, b, 3), (p, w))


# -- Twins ----------------------------------------------------------------------------------------------


def _twins_pair(block_index: int, sr: int = 2) -> tuple[torch.nn.Module, torch.nn.Module]:
    from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

    ours = randomised(create_mixer("twins", 32, num_heads=4, block_index=block_index, sr_ratio=sr)).float()
    if block_index % 2 == 0:
        theirs = LocallyGroupedAttn(32, num_heads=4, ws=7)
        with torch.no_grad():
            theirs.qkv.weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
            theirs.qkv.bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
            theirs.proj.load_state_dict(ours.proj.state_dict())
    else:
        theirs = GlobalSubSampleAttn(32, num_heads=4, sr_ratio=sr)
        theirs.load_state_dict({k: v for k, v in ours.state_dict().items()})
    return ours, theirs.eval()


@pytest.mark.parametrize("block_index, size", [(0, (14, 21)), (1, (14, 14)), (1, (12, 8))])
def test_twins_matches_timm(block_index: int, size: tuple[int, int]) -> None:
    ours, theirs = _twins_pair(block_index)
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        expected = theirs(x.flatten(1, 2), size).view_as(x)
        assert torch.allclose(ours(x), expected, atol=1e-5)


def naive_lsa(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each query attends to the real pixels of its 7x7 window."""
    _, H, W, C = x.shape
    heads, d, ws = m.num_heads, m.head_dim, m.window_size
    q = m.q(x)[0].view(H, W, heads, d)
    k, v = m.kv(x)[0].view(H, W, 2, heads, d).unbind(2)
    out = torch.zeros(H, W, heads, d, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            keys = [(r, c) for r in range(H) for c in range(W) if r // ws == i // ws and c // ws == j // ws]
            for h in range(heads):
                logits = torch.stack([q[i, j, h] @ k[r, c, h] * d**-0.5 for r, c in keys])
                out[i, j, h] = sum(w * v[r, c, h] for w, (r, c) in zip(logits.softmax(0), keys))
    return m.proj(out.reshape(1, H, W, C))


@pytest.mark.parametrize("size", [(7, 7), (7, 10), (10, 7), (10, 12), (5, 3), (15, 8)])
def test_twins_lsa_mask_for_every_padding(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # no padding, right only, bottom only, both, a map smaller than a window, two windows down
    m = randomised(create_mixer("twins", 8, num_heads=2, block_index=0))
    x = torch.randn(1, *size, 8, dtype=torch.float64)
    expected = naive_lsa(m, x)
    assert torch.allclose(m(x), expected, atol=1e-10)

    monkeypatch.setattr(twins_module, "pad_to_multiple", garbage_pad_to_multiple)
    assert torch.allclose(m(x), expected, atol=1e-10)


def test_twins_alternates_and_has_position_encoding() -> None:
    model = timm.create_model("unified_twins_micro")
    blocks = model.stages[2].blocks
    assert [b.mixer.local for b in blocks[:4]] == [True, False, True, False]
    assert not hasattr(blocks[0].mixer, "sr") and blocks[1].mixer.sr.stride == (2, 2)
    assert [type(b.pos).__name__ for b in blocks[:3]] == ["Identity", "ConvPosEmbed", "Identity"]  # after block 0
    assert all(d % 2 == 0 for d in tokenmixers.model_cfg("unified_twins_micro").depths)


# -- STViT ----------------------------------------------------------------------------------------------


def naive_sta(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Super-token attention written cell by cell (divisible sizes)."""
    B, H, W, C = x.shape
    h, w = m.cell
    hh, ww = H // h, W // w
    cells = {(a, b): x[0, a * h : (a + 1) * h, b * w : (b + 1) * w].reshape(h * w, C) for a in range(hh) for b in range(ww)}
    zero = torch.zeros(C, dtype=x.dtype)

    def nbrs(tokens: dict, a: int, b: int) -> list:
        return [(a + dy - 1, b + dx - 1) for dy in range(3) for dx in range(3)]

    tokens = {key: p.mean(0) for key, p in cells.items()}
    for _ in range(m.n_iter):
        assoc = {}
        for (a, b), p in cells.items():
            cand = torch.stack([tokens.get(n, zero) for n in nbrs(tokens, a, b)])
            assoc[(a, b)] = (p @ cand.T * C**-0.5).softmax(-1)  # pixels x 9
        sums = {key: torch.zeros(C, dtype=x.dtype) for key in cells}
        mass = {key: torch.zeros((), dtype=x.dtype) for key in cells}
        for (a, b), p in cells.items():
            for n_i, n in enumerate(nbrs(tokens, a, b)):
                if n in cells:
                    sums[n] = sums[n] + assoc[(a, b)][:, n_i] @ p
                    mass[n] = mass[n] + assoc[(a, b)][:, n_i].sum()
        tokens = {key: sums[key] / (mass[key] + 1e-12) for key in cells}
    order = sorted(cells)
    refined = m.attention(torch.stack([tokens[key] for key in order])[None])[0]
    refined = dict(zip(order, refined))
    out = torch.zeros(H, W, C, dtype=x.dtype)
    for a, b in cells:
        cand = torch.stack([refined.get(n, zero) for n in nbrs(tokens, a, b)])
        out[a * h : (a + 1) * h, b * w : (b + 1) * w] = (assoc[(a, b)] @ cand).view(h, w, C)
    return out[None]


@pytest.mark.parametrize("n_iter", [1, 2])
def test_stvit_matches_cell_by_cell_reference(n_iter: int) -> None:
    m = randomised(create_mixer("stvit", 8, num_heads=2, cell_size=(2, 3), n_iter=n_iter))
    x = torch.randn(1, 6, 9, 8, dtype=torch.float64)
    assert torch.allclose(m(x), naive_sta(m, x), atol=1e-10)


def test_stvit_cell_one_is_global_attention() -> None:
    m = randomised(create_mixer("stvit", 8, num_heads=2, cell_size=1))
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    assert torch.allclose(m(x), m.attention(x.reshape(2, 35, 8)).view_as(x), atol=1e-12)


def test_stvit_padding_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    m = randomised(create_mixer("stvit", 8, num_heads=2, cell_size=4))
    x = torch.randn(2, 9, 10, 8, dtype=torch.float64)
    expected = m(x)
    real_pad = F.pad

    def garbage_pad(t: torch.Tensor, pad: tuple, *args, **kwargs) -> torch.Tensor:
        if t.dim() == 4 and pad[2] == pad[4] == 0:  # the pixel map (the token grid is padded on all sides)
            return real_pad(t, pad, value=50.0)
        return real_pad(t, pad, *args, **kwargs)

    monkeypatch.setattr(stvit_module.F, "pad", garbage_pad)
    assert torch.allclose(m(x), expected, atol=1e-10)


def test_stvit_association_gradient_option() -> None:
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        m = create_mixer("stvit", 8, num_heads=2, cell_size=4, grad_association=flag)
        x.grad = None
        m(x).square().sum().backward()
        grads.append(x.grad.clone())
    assert not torch.allclose(grads[0], grads[1])  # the association's gradient changes the input gradient


# -- zoo entries, budgets, ablations, errors -----------------------------------------------------------


def test_new_mixers_are_registered() -> None:
    assert set(NEW_FAMILIES) <= set(list_mixers())
    for family in NEW_FAMILIES:
        for scale in tokenmixers.SCALES:
            assert timm.is_model(f"unified_{family}_{scale}")


@pytest.mark.parametrize("scale", tokenmixers.SCALES)
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_budget_matches_dwconv(family: str, scale: str) -> None:
    params, macs = DWCONV_BUDGET[scale]
    with torch.device("meta"):
        model = timm.create_model(f"unified_{family}_{scale}")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / params - 1) <= 0.03, n
    if scale in ("micro", "tiny"):  # the larger models are checked by `tokenmixers bench` (README table)
        measured = count_macs(model)["macs"]  # counted on the meta device: shapes only, no arithmetic
        assert abs(measured / macs - 1) <= 0.10, measured


def test_table_vii_ablations() -> None:
    expected = {"unified_halo_small_switch": 9.45e9, "unified_halo_small_1px": 9.32e9, "unified_halo_small_shift": 9.75e9}
    for name, macs in expected.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert abs(count_macs(model)["macs"] / macs - 1) <= 0.03, name
    with torch.device("meta"):
        shift = timm.create_model("unified_halo_small_shift").stages[0].blocks[0].mixer
        switch = timm.create_model("unified_halo_small_switch").stages[0].blocks
    assert shift.query_offset == 0 and (switch[0].mixer.window, switch[1].mixer.window) == (7, 13)


def test_table_vi_variants() -> None:
    for family in ("halo", "pvt", "swin", "convnext", "dcn_v3"):
        with torch.device("meta"):
            b, c, d = (timm.create_model(f"unified_{family}_small_{v}") for v in "bcd")
        assert isinstance(b.head.norm, torch.nn.LayerNorm) and isinstance(b.stages[0].norm, torch.nn.LayerNorm)
        assert isinstance(c.head.norm, torch.nn.LayerNorm) and isinstance(c.stages[0].norm, torch.nn.Identity)
        assert d.stages[0].blocks[0].convnext_style
    with torch.device("meta"):
        convnext_d = timm.create_model("unified_convnext_small_d").stages[0].blocks[0].mixer
    assert isinstance(convnext_d.in_proj, torch.nn.Identity)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("stvit", {"cell_size": 0}, "cell_size must be a positive int"),
        ("stvit", {"n_iter": 0}, "n_iter must be >= 1"),
        ("twins", {"window_size": 0}, "window_size must be >= 1"),
        ("dyn_dwconv", {"reduction": 64}, r"reduction must be in \[1, dim=32\]"),
        ("idyn_dwconv", {"kernel_size": 4}, "kernel_size must be a positive odd number"),
        ("idyn_dwconv", {"num_heads": 5}, "divisible by num_heads 5"),
    ],
)
def test_bad_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_mixer(name, 32, **options)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_models_any_size_and_backward(family: str) -> None:
    model = timm.create_model(f"unified_{family}_micro", num_classes=4)
    for size in [(32, 32), (65, 97)]:
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dynamic_dwconv_single_sample_training_fails_clearly() -> None:
    m = create_mixer("dyn_dwconv", 16)
    x = torch.randn(1, 9, 9, 16)
    with pytest.raises(ValueError, match="at least 2 samples per process"):
        m(x)
    assert m.eval()(x).shape == x.shape
