"""2-D selective scan (SS2D), the token mixer of VMamba (Liu et al., 2024), in pure PyTorch.

``in_proj: C -> 2 * d_inner`` (no bias) gives ``x`` and ``z``; ``x`` goes through a 3x3 depth-wise
convolution (with bias) and SiLU. The ``H * W`` tokens are read in four orders (row-major, column-major
and both reversed); direction ``k`` has its own ``x_proj`` (``d_inner -> dt_rank + 2 * d_state``, no
bias) giving ``dt_low, B_t, C_t``, its ``dt_proj`` (``dt_rank -> d_inner`` with bias; ``dt_t =
softplus(dt_proj(dt_low))``), ``A = -exp(A_log)`` (``d_inner x d_state``) and ``D``, and runs

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t,        y_t = C_t . h_t + D x_t

(per channel ``d``: ``h_t[d]`` is a ``d_state`` vector). The four outputs are put back on the grid and
summed, normalised (``out_norm``, a LayerNorm over ``d_inner``), gated by ``SiLU(z)`` and projected
back (``out_proj: d_inner -> C``, no bias). Defaults are VMamba's SS2D class (forward type "v2":
``d_state=16``, ``ssm_ratio=2``, ``dt_rank=ceil(C / 16)``, ``d_conv=3``) and its initialisation
(S4D-real ``A_log = log(1..d_state)``, ``D = 1``, ``softplus(dt bias)`` log-uniform in [1e-3, 0.1]).

The scan (:func:`selective_scan`) is exact up to rounding and takes ``2 * chunk + n_chunks`` Python steps
instead of ``H * W``. The sequence is cut into ``n_chunks`` chunks of at most ``chunk_size`` steps; a loop
over the steps of a chunk advances all chunks at once from a zero state, a loop over chunks hands each
chunk's exact final state to the next (decayed by ``exp(A * sum of the chunk's dt)``), and a second loop
over the steps adds that incoming state, decayed step by step. Every exponent is ``dt * A <= 0``, so
nothing overflows however strong the decay. States ``(L, d_inner, d_state)`` are the bulk of the memory,
so the backward is written out (the adjoint recurrence is the same scan run backwards) and recomputes
the states instead of keeping them, one group of sequences at a time. The scan runs in float32 under
autocast, as VMamba's kernels do.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import TokenMixer, register_mixer

DIRECTIONS = 4
# sequences are scanned together while their states fit this many elements: on CPU, 4 MiB (float32) groups
# stay in cache (larger ones measured slower); elsewhere (GPU) larger groups mean fewer kernel launches
GROUP_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 27}


def _without_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast switched off on ``device`` (nothing to switch off on the meta device)."""
    available = torch.amp.is_autocast_available(device.type)
    return torch.autocast(device.type, enabled=False) if available else nullcontext()


def _chunked(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(S, L, F) -> (S, n, chunk, F)``, zero-padded at the end to ``n * chunk`` steps."""
    S, L, feat = t.shape
    n = -(-L // chunk)
    return F.pad(t, (0, 0, 0, n * chunk - L)).view(S, n, chunk, feat)


def _time_flip(t: torch.Tensor) -> torch.Tensor:
    """Reverse the step order of a chunked ``(S, n, chunk, ...)`` tensor."""
    return t.flatten(1, 2).flip(1).view(t.shape)


def _decays(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``exp(dt_t A)``: ``(S, n, chunk, D)`` and ``(S, D, N)`` -> ``(S, n, chunk, D, N)``."""
    return (dt.unsqueeze(-1) * A[:, None, None]).exp_()


def _scan_(x: torch.Tensor, decay: torch.Tensor, dt: torch.Tensor, A: torch.Tensor) -> None:
    """In place, ``x_t <- decay_t x_{t-1} + x_t`` along the steps of chunked ``(S, n, chunk, D, N)`` tensors.

    ``decay = exp(dt A)``; ``dt`` (S, n, chunk, D) and ``A`` (S, D, N) give each chunk's whole decay.
    """
    n, chunk = x.shape[1:3]
    for t in range(1, chunk):  # every chunk from a zero state, all chunks at once
        x[:, :, t].addcmul_(decay[:, :, t], x[:, :, t - 1])
    if n == 1:
        return
    whole = (dt.sum(2).unsqueeze(-1) * A[:, None]).exp_()  # (S, n, D, N): decay across each chunk
    carry = torch.zeros_like(x[:, :, 0])  # (S, n, D, N): the exact state entering each chunk
    for c in range(1, n):
        carry[:, c] = x[:, c - 1, -1] + whole[:, c - 1] * carry[:, c - 1]
    for t in range(chunk):  # the incoming state, decayed up to each step
        carry.mul_(decay[:, :, t])
        x[:, :, t].add_(carry)


def _forward(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``y_t = C_t . h_t`` for one group of sequences (see :func:`selective_scan`)."""
    dt_, u_, B_, C_ = (_chunked(t, chunk) for t in (dt, u, B, C))
    h = (dt_ * u_).unsqueeze(-1) * B_.unsqueeze(-2)  # (S, n, chunk, D, N): dt_t B_t u_t
    if h.device.type != "meta":  # on meta (cost counting) the element-wise steps change no shape, count no product
        _scan_(h, _decays(dt_, A), dt_, A)
    return torch.einsum("sctdn,sctn->sctd", h, C_).flatten(1, 2)[:, : u.shape[1]]


def _backward(
    gy: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``(u, dt, A, B, C)`` for one group, from the recomputed states and the adjoint scan.

    With ``g_t = dL/dh_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` (the same scan, run backwards):
    ``dL/du_t = dt_t (g_t . B_t)``, ``dL/dB_t = sum_d g_t dt_t u_t``, ``dL/dC_t = sum_d gy_t h_t`` and, through
    ``s_t = g_t h_{t-1} exp(dt_t A)``, ``dL/ddt_t = sum_n s_t A + u_t (g_t . B_t)``, ``dL/dA = sum_t s_t dt_t``.
    """
    L = u.shape[1]
    dt_, u_, B_, C_, gy_ = (_chunked(t, chunk) for t in (dt, u, B, C, gy))
    h = (dt_ * u_).unsqueeze(-1) * B_.unsqueeze(-2)
    decay = _decays(dt_, A)
    _scan_(h, decay, dt_, A)
    # the adjoint recurrence in reversed step order: step s decays by exp(dt_{t+1} A) with t = Lp - 1 - s,
    # which is the forward decay of step Lp - s (step 0 starts from zero, its decay is never used)
    dt_next = F.pad(dt_.flatten(1, 2)[:, 1:], (0, 0, 0, 1)).view(dt_.shape)  # padded steps have dt = 0
    back_decay = _time_flip(decay).flatten(1, 2).roll(1, 1).view(decay.shape)
    g = _time_flip(gy_).unsqueeze(-1) * _time_flip(C_).unsqueeze(-2)
    _scan_(g, back_decay, _time_flip(dt_next), A)
    del back_decay
    g = _time_flip(g)
    h, decay, g = (t.flatten(1, 2) for t in (h, decay, g))  # (S, Lp, D, N)
    dt_, u_, B_, C_, gy_ = (t.flatten(1, 2) for t in (dt_, u_, B_, C_, gy_))
    s = g[:, 1:] * h[:, :-1]  # h_{-1} = 0: step 0 has no decay term
    s *= decay[:, 1:]
    gB = torch.einsum("sldn,sln->sld", g, B_)
    grad_dt = u_ * gB
    grad_dt[:, 1:] += torch.einsum("sldn,sdn->sld", s, A)
    grad_A = (s * dt_[:, 1:, :, None]).sum(1)  # twice as fast as the einsum on CPU
    grad_B = torch.einsum("sldn,sld->sln", g, dt_ * u_)
    grad_C = torch.einsum("sldn,sld->sln", h, gy_)
    return (dt_ * gB)[:, :L], grad_dt[:, :L], grad_A, grad_B[:, :L], grad_C[:, :L]


class _SelectiveScan(torch.autograd.Function):
    """The scan with a written-out backward that keeps only its inputs (see :func:`selective_scan`)."""

    @staticmethod
    def forward(
        ctx: Any, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """``(S, L, D)`` outputs, one group of sequences at a time."""
        ctx.save_for_backward(u, dt, A, B, C)
        ctx.chunk = chunk
        group = _group(u, A.shape[-1], chunk)
        parts = [_forward(*(t[i : i + group] for t in (u, dt, A, B, C)), chunk) for i in range(0, u.shape[0], group)]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients of ``u, dt, A, B, C``."""
        u, dt, A, B, C = ctx.saved_tensors
        group = _group(u, A.shape[-1], ctx.chunk)
        parts = [
            _backward(*(t[i : i + group] for t in (gy, u, dt, A, B, C)), ctx.chunk) for i in range(0, u.shape[0], group)
        ]
        return (*(torch.cat(p) for p in zip(*parts)), None)


def _group(u: torch.Tensor, d_state: int, chunk: int) -> int:
    """How many of the ``(S, L, D)`` sequences ``u`` are scanned together."""
    _, L, D = u.shape
    budget = GROUP_ELEMENTS["cpu" if u.device.type == "cpu" else "other"]
    return max(1, budget // (-(-L // chunk) * chunk * D * d_state))


def selective_scan(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """``y_t = C_t . h_t`` with ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``h_{-1} = 0`` (no ``D`` term).

    Shapes: ``u, dt``: (S, L, D) with ``dt > 0``; ``A``: (S, D, N) (one matrix per sequence; <= 0);
    ``B, C``: (S, L, N). Returns (S, L, D). Chunks have at most ``chunk_size`` steps and are as even as
    possible (``L = 196`` runs as 4 chunks of 49).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    L = u.shape[1]
    n_chunks = max(1, math.ceil(L / chunk_size))
    return _SelectiveScan.apply(u, dt, A, B, C, max(1, math.ceil(L / n_chunks)))


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """The four scan orders: ``(B, H, W, D) -> (B, 4, H*W, D)``: row-major, column-major, both reversed."""
    rows = x.flatten(1, 2)
    cols = x.transpose(1, 2).flatten(1, 2)
    return torch.stack([rows, cols, rows.flip(1), cols.flip(1)], dim=1)


def cross_merge(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Sum of the four directions back on the grid: ``(B, 4, H*W, D) -> (B, H, W, D)``."""
    rows = y[:, 0] + y[:, 2].flip(1)
    cols = y[:, 1] + y[:, 3].flip(1)
    return rows.unflatten(1, (H, W)) + cols.unflatten(1, (W, H)).transpose(1, 2)


@register_mixer("ss2d")
class SS2D(TokenMixer):
    """VMamba's 2-D selective scan: four directional selective state-space scans over the map.

    Args:
        d_state: state size ``N`` per channel.
        ssm_ratio: ``d_inner / C``.
        dt_rank: rank of the ``dt`` projection; ``"auto"``: ``ceil(C / 16)``.
        d_conv: odd side of the depth-wise convolution before the scan.
        conv_bias: bias of that convolution.
        bias: biases of ``in_proj`` and ``out_proj`` (VMamba: none).
        chunk_size: most steps per scan chunk (speed only; results equal up to rounding).
    """

    knobs = {"ssm_ratio": (1.0, 2.0), "d_state": (1, 16)}
    DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4  # VMamba's dt initialisation

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        block_index: int = 0,
        *,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, num_heads, block_index)
        d_inner = int(ssm_ratio * dim)
        dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        if d_state < 1 or d_inner < 1 or not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(
                "need d_state >= 1, int(ssm_ratio * dim) >= 1 and dt_rank >= 1 or 'auto', "
                f"got {d_state}, {d_inner}, {dt_rank!r}"
            )
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be a positive odd number, got {d_conv}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.d_inner, self.d_state, self.dt_rank, self.chunk_size = d_inner, d_state, dt_rank, chunk_size
        K = DIRECTIONS

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        # per-direction projections as stacked parameters (VMamba's names and layout), not Linear modules:
        # the backbone's trunc-normal re-initialisation must not replace their special init
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VMamba's initialisation of the scan parameters (the Linear/Conv2d layers are the backbone's)."""
        nn.init.uniform_(self.x_proj_weight, -self.d_inner**-0.5, self.d_inner**-0.5)  # nn.Linear's default
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        log_lo, log_hi = math.log(self.DT_MIN), math.log(self.DT_MAX)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (log_hi - log_lo) + log_lo).clamp(min=self.DT_FLOOR)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(bias) = dt
        A = torch.arange(1, self.d_state + 1, dtype=self.A_logs.dtype, device=self.A_logs.device)
        self.A_logs.copy_(A.log().expand_as(self.A_logs))  # S4D-real: A = -(1, 2, ..., d_state)
        self.Ds.fill_(1.0)

    def no_weight_decay(self) -> set[str]:
        """``A_log`` and ``D`` are not decayed (as in VMamba)."""
        return {"A_logs", "Ds"}

    def paper_macs(self, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
        """MACs of the per-direction projections (``x_proj``, ``dt_proj``), weights that are not Linear modules.

        The paper's convention counts projections with weights and leaves out data-dependent products
        (attention's QK^T and AV there, the scan here); ``tokenmixers.costs`` calls this.
        """
        tokens = out.numel() // out.shape[-1]  # B * H * W
        per_direction = self.d_inner * (self.dt_rank + 2 * self.d_state) + self.dt_rank * self.d_inner
        return DIRECTIONS * tokens * per_direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        B, H, W, _ = x.shape
        K, D, N, R = DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, D) each
        u = self.act(self.conv2d(u.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        xs = cross_scan(u)  # (B, K, L, D)
        dt_low, Bs, Cs = torch.einsum("bkld,kcd->bklc", xs, self.x_proj_weight).split((R, N, N), dim=-1)
        dts = torch.einsum("bklr,kdr->bkld", dt_low, self.dt_projs_weight)

        # the scan in float32 (float64 stays float64), outside autocast, as VMamba's kernels do
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with _without_autocast(x.device):
            us = xs.to(dtype)
            dts = F.softplus(dts.to(dtype) + self.dt_projs_bias.to(dtype)[:, None])
            A = -torch.exp(self.A_logs.to(dtype)).view(K, D, N)
            y = selective_scan(
                us.flatten(0, 1),
                dts.flatten(0, 1),
                A.expand(B, K, D, N).flatten(0, 1),
                Bs.to(dtype).flatten(0, 1),
                Cs.to(dtype).flatten(0, 1),
                self.chunk_size,
            ).view(B, K, H * W, D)
            y = cross_merge(y + self.Ds.to(dtype).view(K, 1, D) * us, H, W)  # (B, H, W, D)
        return self.out_proj(self.out_norm(y.to(x.dtype)) * self.act(z))
