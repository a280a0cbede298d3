"""The comparison report: statistics against known values, the built-in Fashion-MNIST subset, and an
end-to-end comparison of two micro models on real data."""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image

from tokenmixers.analysis import load_images
from tokenmixers.compare import compare, default_models
from tokenmixers.data import FASHION_CLASSES, build_dataset
from tokenmixers.stats import accuracy, mcnemar_exact, paired_difference, wilson_interval
from tokenmixers_cli import main

# -- statistics ---------------------------------------------------------------------------------------

Z = NormalDist().inv_cdf(0.975)  # 1.959964, from the standard library (the code under test uses scipy)


def _wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval in closed form: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre, half = p + Z**2 / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return (centre - half) / (1 + Z**2 / n), (centre + half) / (1 + Z**2 / n)


def _mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value by counting: 2 P(X <= min) for X ~ binomial(only_a + only_b, 1/2)."""
    n = only_a + only_b
    tail = Fraction(sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)), 2**n)
    return float(min(2 * tail, 1))



@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_newcombe(k: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_rejects_impossible_counts() -> None:
    for k, n in ((5, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="0 <= successes <= n"):
            wilson_interval(k, n)


def test_mcnemar_exact_known_values() -> None:
    # two-sided binomial(b + c, 1/2): 2 * P(X <= min(b, c)), at most 1
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_one_run_uses_wilson_and_mcnemar() -> None:
    a = np.array([1] * 80 + [0] * 20, dtype=bool)
    b = a.copy()
    b[:10] = False  # B misses 10 images A gets right ...
    b[90:92] = True  # ... and gets 2 right that A misses
    acc = accuracy(a)
    assert (acc.mean, acc.std, acc.runs) == (80.0, 0.0, [80.0])
    # Wilson 95 % interval of 80 / 100 (closed form, z = 1.959964): 71.117 % to 86.663 %
    assert (acc.low, acc.high) == pytest.approx((71.11708, 86.66331), abs=1e-4)
    assert (acc.low, acc.high) == pytest.approx(tuple(100 * x for x in _wilson(80, 100)), abs=1e-9)
    diff = paired_difference(a, b)
    assert (diff.only_a, diff.only_b, diff.test) == (10, 2, "exact McNemar")
    assert diff.delta == pytest.approx(8.0)
    # two-sided binomial(12, 1/2) test of 10 vs 2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2**12 = 158 / 4096
    assert diff.p_value == pytest.approx(158 / 4096, rel=1e-12)
    # paired interval: per-image differences are +1 (10 images), -1 (2), 0 (88); sample variance / n
    half = 1.959964 * math.sqrt((12 - 100 * 0.08**2) / 99 / 100)
    assert (diff.low, diff.high) == pytest.approx((100 * (0.08 - half), 100 * (0.08 + half)), abs=1e-4)
    same = paired_difference(a, a)
    assert (same.delta, same.p_value) == (0.0, 1.0)


def test_several_runs_add_seed_spread() -> None:
    a = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)  # runs at 75 % and 50 %
    b = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)  # 25 % twice
    acc = accuracy(a)
    assert (acc.mean, acc.runs) == (62.5, [75.0, 50.0])
    assert acc.std == pytest.approx(100 * math.sqrt(0.03125))
    # seed variance of the mean 0.03125 / 2; per-image means (1, 1, .5, 0): variance 0.6875 / 3, over 4 images
    half = 1.959964 * math.sqrt(0.03125 / 2 + 0.6875 / 3 / 4)
    assert (acc.low, acc.high) == pytest.approx((100 * max(0.625 - half, 0), 100 * min(0.625 + half, 1)), abs=1e-4)
    diff = paired_difference(a, b)
    # per-image differences (0, 1, .5, 0): variance 0.6875 / 3; B has no seed spread
    se = math.sqrt(0.03125 / 2 + 0.6875 / 3 / 4)
    assert diff.delta == pytest.approx(37.5)
    assert diff.p_value == pytest.approx(math.erfc(0.375 / se / math.sqrt(2)))
    assert (diff.low, diff.high) == pytest.approx((100 * (0.375 - 1.959964 * se), 100 * (0.375 + 1.959964 * se)), abs=1e-4)
    assert (diff.only_a, diff.only_b, diff.test) == (2, 0, "z-test (seeds and images)")


def test_paired_difference_needs_the_same_images() -> None:
    with pytest.raises(ValueError, match="different numbers of images"):
        paired_difference(np.ones(10, bool), np.ones(12, bool))


# -- the built-in Fashion-MNIST subset ----------------------------------------------------------------


def test_fashion_subset_ships_balanced_with_its_licence() -> None:
    train, val = build_dataset("fashion", "train"), build_dataset("fashion", "val")
    assert (len(train), len(val), train.classes) == (5_000, 5_000, list(FASHION_CLASSES))
    for dataset in (train, val):
        assert np.bincount([s.label for s in dataset.samples]).tolist() == [len(dataset) // 10] * 10
    image, label = train[0]
    assert (image.size, image.mode, label) == ((32, 32), "RGB", train.samples[0].label)
    pixels = np.asarray(image)
    assert pixels[:2].max() == 0 and pixels[2:30, 2:30].max() > 0  # the 28x28 photo inside a 2-pixel black border
    assert build_dataset("fashion", "val", image_size=48)[0][0].size == (48, 48)
    assert len(load_images("fashion", limit=7)) == 7
    licence = (Path(__import__("tokenmixers").__file__).parent / "datasets" / "LICENSE").read_text()
    assert "Zalando SE" in licence and "MIT" in licence


def test_default_comparison_is_the_papers_five_mixers() -> None:
    assert default_models() == [f"unified_{f}_micro" for f in ("halo", "pvt", "swin", "convnext", "dcn_v3")]


# -- end to end ---------------------------------------------------------------------------------------

TINY = {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 16, "threads": 1, "log_every": 1}


def test_compare_reports_intervals_and_noise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = ["unified_convnext_micro", "unified_pvt_micro"]
    result = compare(models, recipe="digits", overrides=TINY, output=tmp_path, bench_size=32, bench_batch=2)
    report = Path(result["report"]).read_text()
    assert "95 % interval" in report and "Wilson" in report and "exact McNemar" in report
    assert "Within noise of the best" in report and "Best vs worst" in report
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == set(models)
    assert json.loads((tmp_path / "results.json").read_text()) == result["rows"]
    # the numbers, recomputed independently from each model's saved predictions on the 364 validation images
    correct = {}
    for name, r in rows.items():
        predictions = np.load(tmp_path / name / "seed0" / "predictions.npz")
        top5, labels = predictions["top5"], predictions["labels"]
        assert top5.shape == (364, 5) and len(labels) == 364
        correct[name] = top5[:, 0] == labels
        k, k5 = int(correct[name].sum()), int((top5 == labels[:, None]).any(1).sum())
        low, high = _wilson(k, 364)
        assert (r["top1"], r["top1_low"], r["top1_high"]) == pytest.approx((100 * k / 364, 100 * low, 100 * high), abs=1e-9)
        assert (r["top5"], r["top5_low"], r["top5_high"]) == pytest.approx(
            (100 * k5 / 364, *(100 * x for x in _wilson(k5, 364))), abs=1e-9)
        assert f"| {r['top1']:.2f} | {100 * low:.2f} to {100 * high:.2f} |" in report
        assert r["top1"] == pytest.approx(r["runs"][0]["ema_top1"])  # the EMA weights, as training measured them
    (pair,) = result["pairs"]
    assert json.loads((tmp_path / "pairs.json").read_text()) == result["pairs"]
    only_a = int((correct[pair["a"]] & ~correct[pair["b"]]).sum())
    only_b = int((~correct[pair["a"]] & correct[pair["b"]]).sum())
    assert (pair["only_a"], pair["only_b"], pair["test"]) == (only_a, only_b, "exact McNemar")
    assert pair["p_value"] == pytest.approx(_mcnemar(only_a, only_b), rel=1e-9)
    # paired (Wald) interval: per-image differences +1 (only_a images), -1 (only_b), 0 (the rest)
    delta = (only_a - only_b) / 364
    half = Z * math.sqrt((only_a + only_b - 364 * delta**2) / 363 / 364)
    assert (pair["delta"], pair["delta_low"], pair["delta_high"]) == pytest.approx(
        (100 * delta, 100 * (delta - half), 100 * (delta + half)), abs=1e-9)
    assert f"| {only_a} / {only_b} | {pair['p_value']:.2g} |" in report
    assert "| 75.1 |" in report and "| 72.8 |" in report  # the paper's ImageNet top-1 beside ours
    # every model against the paper's budget of its scale (both paper models are inside it, unchanged)
    assert all(r["inside_budget"] is True and r["fitted"] is None for r in rows.values())
    assert rows["unified_pvt_micro"]["macs_paper_224_g"] == pytest.approx(0.573022304)
    assert "| 4.30-4.45M params, 0.57-0.65G MACs at 224 | yes |" in report
    for name in ("accuracy.png", "accuracy_vs_macs.png", "training_curves.png"):
        with Image.open(tmp_path / name) as plot:  # a complete, decodable PNG
            assert plot.format == "PNG" and min(plot.size) > 100
            plot.load()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3

    # a second seed through the CLI: seed 0 is reused, seed 1 trained; mean ± std and per-seed values
    main(["compare", *models, "--recipe", "digits", "--seeds", "2", "--output", str(tmp_path), "--bench-size", "32",
          "--bench-batch", "2", *(f"{k}={v}" for k, v in TINY.items())])
    out = capsys.readouterr().out
    assert all(f"{m}, seed 0: already trained" in out and f"{m}, seed 1: training" in out for m in models)
    for r in json.loads((tmp_path / "results.json").read_text()):
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        # per-seed top-1 from each seed's saved predictions; the row is their mean and sample std
        per_seed = []
        for seed in (0, 1):
            predictions = np.load(tmp_path / r["model"] / f"seed{seed}" / "predictions.npz")
            per_seed.append(100 * float((predictions["top5"][:, 0] == predictions["labels"]).mean()))
        assert [run["top1"] for run in r["runs"]] == pytest.approx(per_seed, abs=1e-9)
        assert r["top1"] == pytest.approx(sum(per_seed) / 2, abs=1e-9)
        assert r["top1_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2), abs=1e-9)
    assert json.loads((tmp_path / "pairs.json").read_text())[0]["test"] == "z-test (seeds and images)"
    assert "top-1 per seed" in (tmp_path / "report.md").read_text()


def test_compare_rejects_bad_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        compare(["unified_convnext_micro"], recipe="digits", output=tmp_path, seeds=0)
