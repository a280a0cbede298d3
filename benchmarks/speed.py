"""CPU speed of the micro and tiny models: eager vs channels-last vs torch.compile, 1 and 2 threads.

Compares with the official STM-Evaluation implementation measured on the same kind of machine
(2-core Xeon, fp32, 224x224, micro batch 32 / tiny batch 8, median of 7 after 2 warm-ups;
training: micro batch 16, forward + cross-entropy + backward + AdamW step). Shared CPUs are noisy,
so models are timed round-robin (every model once per round) and the dense fp32 matmul peak is
probed before and after: the "share of peak" column compares work rates independent of load.

    python benchmarks/speed.py                      # everything (about 20 minutes on 2 cores)
    python benchmarks/speed.py --modes eager --threads 2 --scales micro

Prints markdown tables and writes benchmarks/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import tokenmixers
from tokenmixers.bench import count_macs
from tokenmixers.files import atomic_write_text

FAMILIES = ("halo", "pvt", "swin", "convnext", "dcn_v3")
BATCH = {"micro": 32, "tiny": 8}
# Official implementation, median over 5 runs (img/s, share of the matmul peak); training micro batch 16.
OFFICIAL_INFER = {
    "unified_halo_micro": (17.4, 0.135), "unified_pvt_micro": (49.3, 0.236), "unified_swin_micro": (31.2, 0.179),
    "unified_convnext_micro": (51.1, 0.270), "unified_dcn_v3_micro": (18.3, 0.100),
    "unified_halo_tiny": (5.7, 0.250), "unified_pvt_tiny": (11.1, 0.433), "unified_swin_tiny": (8.7, 0.353),
    "unified_convnext_tiny": (12.6, 0.493), "unified_dcn_v3_tiny": (5.0, 0.195),
}
OFFICIAL_TRAIN = {
    "unified_halo_micro": (7.6, 0.158), "unified_pvt_micro": (20.6, 0.320), "unified_swin_micro": (14.3, 0.255),
    "unified_convnext_micro": (12.2, 0.200), "unified_dcn_v3_micro": (7.5, 0.119),
}


def matmul_peak(n: int = 2048, reps: int = 9) -> float:
    """Dense fp32 matmul GFLOP/s (median) with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def round_robin(fns: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaving the functions every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def inference_fns(names: list[str], mode: str) -> dict[str, Callable[[], None]]:
    """One inference closure per model for ``mode`` in eager / channels_last / compile."""
    fns = {}
    for name in names:
        model = tokenmixers.create_model(name).eval()
        x = torch.randn(BATCH[name.rsplit("_", 1)[1]], 3, 224, 224)
        if mode == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        fn = torch.compile(model, dynamic=False) if mode == "compile" else model

        def run(fn: Callable = fn, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                fn(x)

        fns[name] = run
    return fns


def train_fns(names: list[str]) -> dict[str, Callable[[], None]]:
    """One training-step closure per model (batch 16, as the official measurement)."""
    fns = {}
    for name in names:
        model = tokenmixers.create_model(name).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        x, y = torch.randn(16, 3, 224, 224), torch.randint(0, 1000, (16,))

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    return fns


def main() -> None:
    """Run the measurements, print tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=["micro", "tiny"], choices=list(BATCH))
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last", "compile"],
                        choices=["eager", "channels_last", "compile"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()

    names = [f"unified_{f}_{s}" for s in args.scales for f in FAMILIES]
    results: dict[str, Any] = {"torch": torch.__version__, "infer": {}, "train": {}, "peak_gflops": {}}
    macs = {n: count_macs(tokenmixers.create_model(n))["macs"] for n in names}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in args.modes:
            key = f"{mode}/{threads}t"
            peak_before = matmul_peak()
            for scale in args.scales:
                group = [n for n in names if n.endswith(scale)]
                secs = round_robin(inference_fns(group, mode), warmup=2, iters=args.iters)
                for n, s in secs.items():
                    results["infer"].setdefault(n, {})[key] = BATCH[scale] / s
            results["peak_gflops"][key] = (peak_before + matmul_peak()) / 2
            print(f"done {key}", flush=True)
    if not args.no_train and "micro" in args.scales:
        torch.set_num_threads(2)
        peak = matmul_peak()
        secs = round_robin(train_fns([n for n in names if n.endswith("micro")]), warmup=2, iters=args.iters)
        peak = (peak + matmul_peak()) / 2
        results["peak_gflops"]["train/2t"] = peak
        for n, s in secs.items():
            results["train"][n] = {"img_s": 16 / s, "share_of_peak": 16 / s * 3 * 2 * macs[n] / (peak * 1e9)}

    keys = list(next(iter(results["infer"].values())))
    print("\n## Inference, img/s (224x224; micro batch 32, tiny batch 8)\n")
    header = "| model | " + " | ".join(keys) + " | official 2t | speed-up | share of peak: ours / official |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    ref_key = "eager/2t" if "eager/2t" in keys else keys[-1]
    for n, row in results["infer"].items():
        off_ips, off_share = OFFICIAL_INFER[n]
        share = row[ref_key] * 2 * macs[n] / (results["peak_gflops"][ref_key] * 1e9)
        row["share_of_peak"] = share
        cells = " | ".join(f"{row[k]:.1f}" for k in keys)
        print(f"| {n} | {cells} | {off_ips:.1f} | {row[ref_key] / off_ips:.2f}x | {share:.3f} / {off_share:.3f} |")
    print("\nmatmul peak (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["peak_gflops"].items()))
    if results["train"]:
        print("\n## Training step, micro batch 16, 2 threads\n\n| model | img/s | official | speed-up | share of peak: ours / official |\n|---|---|---|---|---|")
        for n, r in results["train"].items():
            off_ips, off_share = OFFICIAL_TRAIN[n]
            print(f"| {n} | {r['img_s']:.1f} | {off_ips:.1f} | {r['img_s'] / off_ips:.2f}x | {r['share_of_peak']:.3f} / {off_share:.3f} |")
    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
