"""Mixers published after the paper: PoolFormer's pooling, FocalNet's focal modulation, VMamba's SS2D and
MambaOut's Gated CNN, each against a naive reference written from the paper's equations."""
from __future__ import annotations

import math

import pytest
import torch

import tokenmixers
import tokenmixers.mixers.ss2d as ss2d_module
from tokenmixers.bench import count_macs
from tokenmixers.configs import BUILTIN_MIXERS
from tokenmixers.mixers import create_mixer, get_mixer, list_mixers, mixer_options
from tokenmixers.mixers.ss2d import selective_scan

from .conftest import randomised
from .reference import derivatives

NEW_MIXERS = ("pool", "focal", "ss2d", "gated_cnn")
SIZES = [(1, 1), (5, 7), (13, 9)]


# -- the equations, written out (float64, one sample (H, W, C) at a time) -------------------------------


def gelu(t: torch.Tensor) -> torch.Tensor:
    """Exact GELU: ``t * Phi(t)``."""
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def silu(t: torch.Tensor) -> torch.Tensor:
    """``t * sigmoid(t)``."""
    return t / (1 + torch.exp(-t))


def linear(t: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``t W^T + b``."""
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def layer_norm(t: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """Normalise the last dim (biased variance), then scale and shift."""
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out[i, j, c] = sum_ab w[c, a, b] x[i + a - k//2, j + b - k//2, c] (+ b[c])``, zero outside the map."""
    H, W, _ = x.shape
    k = weight.shape[-1]
    out = torch.zeros_like(x)
    for a in range(k):
        for b in range(k):
            di, dj = a - k // 2, b - k // 2
            rows, cols = range(max(0, -di), min(H, H - di)), range(max(0, -dj), min(W, W - dj))
            if len(rows) and len(cols):
                src = x[rows.start + di : rows.stop + di, cols.start + dj : cols.stop + dj]
                out[rows.start : rows.stop, cols.start : cols.stop] += weight[:, 0, a, b] * src
    return out if bias is None else out + bias


def naive_pool(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of the in-map pixels of the window, minus the pixel."""
    H, W, _ = x.shape
    r = m.pool_size // 2
    out = torch.empty_like(x)
    for i in range(H):
        for j in range(W):
            window = x[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[i, j] = window.mean((0, 1)) - x[i, j]
    return out


def naive_focal(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FocalNet eq. (focal modulation): gated sum of L depth-wise levels and a global level, then q * h(.)."""
    C, L = m.dim, m.focal_level
    proj = linear(x, m.f)
    q, ctx, gates = proj[..., :C], proj[..., C : 2 * C], proj[..., 2 * C :]
    ctx_all = 0
    for level in range(L):
        ctx = gelu(depthwise(ctx, m.focal_layers[level].weight, None))
        ctx_all = ctx_all + ctx * gates[..., level : level + 1]
    ctx_all = ctx_all + gelu(ctx.mean((0, 1))) * gates[..., L:]
    if m.normalize_modulator:
        ctx_all = ctx_all / (L + 1)
    return linear(q * linear(ctx_all, m.h), m.proj)


def naive_gated_cnn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MambaOut: ``fc2(GELU(g) * [i, dwconv(c)])``, c the last ``conv_channels`` of the value half."""
    hidden, rest, conv = m.split_sizes
    y = linear(x, m.fc1)
    g, i, c = y[..., :hidden], y[..., hidden : hidden + rest], y[..., hidden + rest :]
    return linear(gelu(g) * torch.cat([i, depthwise(c, m.conv.weight, m.conv.bias)], -1), m.fc2)


def naive_ss2d(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """VMamba's SS2D: one selective scan per direction, step by step over an explicit list of pixels."""
    H, W, _ = x.shape
    D, N, R = m.d_inner, m.d_state, m.dt_rank
    xz = linear(x, m.in_proj)
    u, z = xz[..., :D], xz[..., D:]
    u = silu(depthwise(u, m.conv2d.weight, m.conv2d.bias))
    rows = [(i, j) for i in range(H) for j in range(W)]
    cols = [(i, j) for j in range(W) for i in range(H)]
    y = torch.zeros(H, W, D, dtype=x.dtype)
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        A = -torch.exp(m.A_logs.view(4, D, N)[k])
        h = torch.zeros(D, N, dtype=x.dtype)
        for i, j in order:
            proj = m.x_proj_weight[k] @ u[i, j]
            dt = torch.log1p(torch.exp(m.dt_projs_weight[k] @ proj[:R] + m.dt_projs_bias[k]))  # softplus
            B, C = proj[R : R + N], proj[R + N :]
            h = torch.exp(dt[:, None] * A) * h + (dt * u[i, j])[:, None] * B[None, :]
            y[i, j] += h @ C + m.Ds.view(4, D)[k] * u[i, j]
    return linear(layer_norm(y, m.out_norm) * silu(z), m.out_proj)


NAIVE = {"pool": naive_pool, "focal": naive_focal, "ss2d": naive_ss2d, "gated_cnn": naive_gated_cnn}
OPTIONS = {
    "pool": [{}, {"pool_size": 5}],
    "focal": [{}, {"focal_level": 3, "normalize_modulator": True}, {"focal_window": 5, "focal_factor": 4}],
    "ss2d": [{}, {"d_state": 3, "ssm_ratio": 1.5, "dt_rank": 2, "chunk_size": 4}],
    "gated_cnn": [{}, {"kernel_size": 3, "conv_ratio": 0.5, "expansion_ratio": 2.0}],
}
CASES = [(name, options) for name in NEW_MIXERS for options in OPTIONS[name]]
TINY_OPTIONS = {"ss2d": {"chunk_size": 4}}  # a tiny case with several chunks


@pytest.mark.parametrize("name, options", CASES)
def test_matches_naive_reference(name: str, options: dict) -> None:
    m = randomised(create_mixer(name, 8, **options))
    for size in SIZES:
        x = torch.randn(2, *size, 8, dtype=torch.float64)
        expected = torch.stack([NAIVE[name](m, sample) for sample in x])
        # measured max |difference| <= 1e-14 (outputs are O(1))
        torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-10)


# -- the mixer contract ----------------------------------------------------------------------------------


def test_registered_and_listed_for_the_command_line() -> None:
    assert set(NEW_MIXERS) <= set(BUILTIN_MIXERS) <= set(list_mixers())  # other tests may register more


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_knobs_are_options_with_buildable_values(name: str) -> None:
    knobs = get_mixer(name).knobs
    assert knobs
    for option, values in knobs.items():
        assert option == "mlp_ratio" or option in mixer_options(name), option
        if option != "mlp_ratio":
            for value in values:
                assert create_mixer(name, 32, **{option: value})(torch.randn(1, 5, 7, 32)).shape == (1, 5, 7, 32)


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_layout_contract_and_precisions(name: str) -> None:
    m = randomised(create_mixer(name, 16))
    x = torch.randn(3, 11, 6, 16, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(m(x[1:2]), out[1:2], rtol=0, atol=1e-12)  # samples never mix
    # float32 and bf16 autocast (SS2D's scan stays float32) follow float64
    m32 = m.float()
    scale = out.abs().max()
    assert (m32(x.float()).double() - out).abs().max() <= 1e-5 * scale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m32(x.float())
    assert low.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(low).all()
    assert (low.double() - out).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_gradients_match_finite_differences(name: str) -> None:
    m = randomised(create_mixer(name, 8, **TINY_OPTIONS.get(name, {}))).train()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
    result = derivatives(m, x)
    assert set(result) == {"x", *(n for n, _ in m.named_parameters())}
    for key, (autograd, numerical) in result.items():
        assert autograd == pytest.approx(numerical, rel=1e-5, abs=1e-7), key
        assert abs(numerical) > 1e-3, f"{key} does not change the output"


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_unified_model_any_size_forward_backward(name: str) -> None:
    cfg = tokenmixers.ModelCfg(name, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), heads=(1, 2, 4, 8))
    model = tokenmixers.UnifiedNet(cfg, num_classes=5)
    out = model(torch.randn(2, 3, 37, 53))  # stage maps 9x13 ... 1x1
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    with torch.device("meta"):  # what the budget fitter does: shapes only
        macs = count_macs(tokenmixers.UnifiedNet(cfg))
    assert macs["macs_paper"] > 0 and macs["macs"] > 0


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_unknown_option_is_clear(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown option.*'bogus'.*for mixer '{name}'; accepted options"):
        create_mixer(name, 32, bogus=1)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("pool", {"pool_size": 4}, "pool_size must be a positive odd number"),
        ("focal", {"focal_level": 0}, "focal_level must be >= 1"),
        ("focal", {"focal_factor": 1}, r"give kernels \[3, 4\]; every kernel must be a positive odd number"),
        ("gated_cnn", {"kernel_size": 6}, "kernel_size must be a positive odd number"),
        ("gated_cnn", {"conv_ratio": 3.0}, "need 1 <= conv channels <= hidden channels"),
        ("ss2d", {"d_conv": 2}, "d_conv must be a positive odd number"),
        ("ss2d", {"d_state": 0}, "need d_state >= 1"),
        ("ss2d", {"chunk_size": 0}, "chunk_size must be >= 1"),
    ],
)
def test_bad_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_mixer(name, 32, **options)


# -- published shapes and defaults --------------------------------------------------------------------------


def test_pool_has_no_parameters() -> None:
    m = create_mixer("pool", 8)
    assert not list(m.parameters())
    assert torch.equal(m(torch.randn(2, 1, 1, 8)), torch.zeros(2, 1, 1, 8))  # a lone pixel is its own average


def test_focal_defaults_are_focalnet_srf() -> None:
    m = create_mixer("focal", 96)
    assert m.kernel_sizes == [3, 5] and m.f.out_features == 2 * 96 + 3 and m.f.bias is not None
    assert create_mixer("focal", 96, focal_level=3).kernel_sizes == [3, 5, 7]  # "lrf"
    assert all(conv.bias is None for conv in m.focal_layers)


def test_gated_cnn_splits_as_mambaout() -> None:
    m = create_mixer("gated_cnn", 96)
    assert m.split_sizes == (256, 160, 96)  # hidden = int(8/3 * 96): g, i, c
    hidden, conv = 256, 96
    expected = (96 * 2 * hidden + 2 * hidden) + (conv * 49 + conv) + (hidden * 96 + 96)
    assert sum(p.numel() for p in m.parameters()) == expected


def test_ss2d_initialisation_and_shapes() -> None:
    m = create_mixer("ss2d", 96)
    D, N, R = 192, 16, 6  # d_inner = 2C, d_state 16, dt_rank = ceil(96 / 16)
    assert (m.d_inner, m.d_state, m.dt_rank) == (D, N, R)
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv2d.bias is not None
    assert m.x_proj_weight.shape == (4, R + 2 * N, D) and m.dt_projs_weight.shape == (4, D, R)
    assert torch.allclose(-torch.exp(m.A_logs), -torch.arange(1.0, N + 1).expand(4 * D, N))  # S4D-real
    assert torch.equal(m.Ds, torch.ones(4 * D))
    dt = torch.nn.functional.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.no_weight_decay() == {"A_logs", "Ds"}


# -- SS2D's chunked scan against the sequential recurrence ---------------------------------------------------


def naive_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t``, one step at a time."""
    h = torch.zeros(*A.shape, dtype=u.dtype)  # (S, D, N)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def _scan_inputs(L: int, dt_scale: float = 1.0, S: int = 3, D: int = 4, N: int = 3) -> list[torch.Tensor]:
    """Random float64 scan inputs that require grad: ``u, dt, A, B, C``."""
    return [
        t.requires_grad_()
        for t in (
            torch.randn(S, L, D, dtype=torch.float64),
            dt_scale * torch.nn.functional.softplus(torch.randn(S, L, D, dtype=torch.float64)),
            -3 * torch.rand(S, D, N, dtype=torch.float64),
            torch.randn(S, L, N, dtype=torch.float64),
            torch.randn(S, L, N, dtype=torch.float64),
        )
    ]


@pytest.mark.parametrize("L, chunk", [(1, 4), (7, 1), (7, 3), (50, 8), (63, 7), (64, 16), (65, 16), (130, 64)])
def test_chunked_scan_and_its_backward_match_the_recurrence(L: int, chunk: int) -> None:
    inputs = _scan_inputs(L)
    ours, expected = selective_scan(*inputs, chunk_size=chunk), naive_scan(*inputs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)  # measured <= 1e-14
    w = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, w), torch.autograd.grad(expected, inputs, w)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * max(1.0, b.abs().max().item()))


def test_scan_never_overflows_on_strong_decays(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _scan_inputs(200, dt_scale=40.0)  # |dt * A| up to ~500 per step, 10^4 and more per chunk
    monkeypatch.setattr(ss2d_module, "GROUP_ELEMENTS", {"cpu": 1})  # and one sequence at a time
    ours, expected = selective_scan(*inputs, chunk_size=64), naive_scan(*inputs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(ours.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    for a, b in zip(grads, torch.autograd.grad(expected.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_scan_groups_of_sequences_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _scan_inputs(37, S=5)
    w = torch.randn(5, 37, 4, dtype=torch.float64)
    results = []
    for elements in (1, 2 * 40 * 4 * 3, 10**9):  # groups of 1, 2 (and a ragged last one), 5 sequences
        monkeypatch.setattr(ss2d_module, "GROUP_ELEMENTS", {"cpu": elements})
        y = selective_scan(*inputs, chunk_size=8)  # 5 chunks of 8 steps (40 with padding)
        results.append([y, *torch.autograd.grad(y, inputs, w)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
