"""Parameters, MACs, throughput, latency and peak memory of any set of models.

The two MAC conventions (all products, and the paper's module-hook count) are :mod:`tokenmixers.costs`'.
"""
from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import timm
import torch
from torch import nn

from .costs import count_macs, count_params
from .files import atomic_write_csv, atomic_write_text
from .precision import autocast
from .zoo import create_model, list_models, reported_top1


@contextlib.contextmanager
def _peak_rss() -> Iterator[dict[str, Optional[int]]]:
    """Measure the peak resident memory of this process inside the block (Linux), in bytes."""
    result: dict[str, Optional[int]] = {"bytes": None}

    def read(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = read("VmRSS:")
    except OSError:
        base = None
    yield result
    peak = read("VmHWM:")
    if base is not None and peak is not None:
        result["bytes"] = peak - base


def _cpu_peak_bytes(run: Callable[[], None]) -> Optional[int]:
    """Peak extra resident memory of one call on CPU (Linux/glibc), or None where unmeasurable.

    glibc keeps freed memory for reuse, so the resident size only shows the peak when large
    blocks are mapped and unmapped individually: the mmap threshold is pinned low for the
    measured call and set back to glibc's largest dynamic value afterwards.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.malloc_trim(0)
    try:
        with _peak_rss() as rss:
            run()
    finally:
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    return rss["bytes"]


def measure_speed(
    model: nn.Module,
    batch_size: int = 32,
    input_size: tuple[int, int] = (224, 224),
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 2,
    iters: int = 7,
) -> dict[str, Any]:
    """Inference throughput (img/s), median latency per batch (ms) and peak extra memory of a forward (MB)."""
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, *input_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(model, dynamic=False) if compile else model  # one graph per input size
    cuda = torch.device(device).type == "cuda"

    def run() -> None:
        with torch.inference_mode(), autocast(device, precision):
            fn(x)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    latency = statistics.median(times)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak: Optional[int] = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_bytes(run)
    return {
        "throughput": batch_size / latency,
        "latency_ms": latency * 1e3,
        "peak_mem_mb": None if peak is None else peak / 2**20,
    }


def resolve_models(patterns: Sequence[str]) -> list[str]:
    """Expand model names and glob patterns (over ours, else timm's); ``KeyError`` for a pattern that matches nothing."""
    names: list[str] = []
    known = list_models()
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = [n for n in known if fnmatch.fnmatch(n, pattern)] or timm.list_models(pattern)
        else:
            matched = [pattern]
        if not matched:
            raise KeyError(f"no registered model matches {pattern!r}; see `tokenmixers list`")
        names += [n for n in matched if n not in names]
    return names


def benchmark(
    models: Sequence[str],
    input_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "fp32",
    threads: Optional[int] = None,
    channels_last: bool = False,
    compile: bool = False,
    speed: bool = True,
    iters: int = 7,
) -> list[dict[str, Any]]:
    """Benchmark each model; one row per model with params, MACs and (optionally) speed."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name in resolve_models(models):
        model = create_model(name)
        row: dict[str, Any] = {"model": name, "params_m": count_params(model) / 1e6}
        if reported_top1(name) is not None:
            row["top1_reported"] = reported_top1(name)
        macs = count_macs(model, input_size)
        row.update(macs_g=macs["macs"] / 1e9, macs_paper_g=macs["macs_paper"] / 1e9)
        if speed:
            row.update(measure_speed(model, batch_size, input_size, device, precision, channels_last, compile, iters=iters))
        row.update(input_size=f"{input_size[0]}x{input_size[1]}", batch_size=batch_size, device=device, precision=precision,
                   threads=torch.get_num_threads(), channels_last=channels_last, compile=compile)
        rows.append(row)
    return rows


_COLUMNS = [
    ("model", "model", "{}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("macs_g", "MACs (G)", "{:.2f}"),
    ("macs_paper_g", "MACs, paper conv. (G)", "{:.2f}"),
    ("throughput", "img/s", "{:.1f}"),
    ("latency_ms", "latency (ms)", "{:.1f}"),
    ("peak_mem_mb", "peak mem (MB)", "{:.0f}"),
    ("top1_reported", "top-1 reported (%)", "{:.1f}"),
]


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of benchmark rows (columns that no row has are left out)."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[dict[str, Any]], out_dir: os.PathLike, stem: str = "bench") -> list[Path]:
    """Write rows as JSON, CSV and markdown into ``out_dir``; return the paths."""
    out = Path(out_dir)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(list(rows), indent=2))
    atomic_write_csv(paths[1], rows)
    atomic_write_text(paths[2], to_markdown(rows) + "\n")
    return paths
