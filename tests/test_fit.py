"""Fitting mixers to the paper's budgets: the envelope, the arithmetic, the paper's own models, a user's mixer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tokenmixers
from tokenmixers import fit, zoo
from tokenmixers.compare import fit_user_models
from tokenmixers.configs import SCALES, ModelCfg
from tokenmixers.costs import count_macs, count_params
from tokenmixers.mixers import TokenMixer, register_mixer

from .conftest import PAPER_MODELS, cli


def _measured(model: str) -> tuple[int, int]:
    """Parameters and paper-convention MACs at 224 of a registered model, by building and running it (meta)."""
    built = tokenmixers.create_model(model, device="meta")
    return count_params(built), count_macs(built)["macs_paper"]


@pytest.mark.parametrize("scale", SCALES)
def test_the_budget_is_the_papers_envelope_and_its_mixers_land_on_their_configurations(scale: str) -> None:
    # the budget the zoo lists is measured from the five models (micro: by building and running them)
    assert fit.measure_budget(scale) == fit.budget(scale)
    if scale == "micro":
        costs = [_measured(m) for m in PAPER_MODELS if m.endswith(scale)]
        assert fit.budget(scale) == fit.Budget(scale, (min(c[0] for c in costs), max(c[0] for c in costs)),
                                               (min(c[1] for c in costs), max(c[1] for c in costs)))
        assert str(fit.budget(scale)) == "micro: 4.30-4.45M params, 0.57-0.65G MACs at 224"
    # each of the five, fitted, stays on its published configuration (its start, already inside)
    for model in (m for m in PAPER_MODELS if m.endswith(scale)):
        cfg = zoo.model_cfg(model)
        fitted = fit.search(cfg.mixer, scale)
        assert fitted.inside and fitted.changed == {} and fitted.cfg == cfg, model


@pytest.mark.parametrize("model", ["unified_pvt_tiny", "unified_twins_micro", "unified_halo_small_switch"])
def test_costs_summed_from_measured_blocks_equal_the_built_model(model: str) -> None:
    # first blocks with position encodings (PVT: block 0, Twins: block 1), alternating designs, per-stage options
    assert fit._total(zoo.model_cfg(model)) == _measured(model)
    deeper = zoo.model_cfg(model).replace(depths=(3, 5, 11, 2))
    built = tokenmixers.create_model(deeper, device="meta")
    assert fit._total(deeper) == (count_params(built), count_macs(built)["macs_paper"])


@register_mixer("test_heavy_pool")
class HeavyPool(TokenMixer):
    """Average pooling behind a projection: a mixer of the test's own, with one declared knob."""

    knobs = {"mlp_ratio": (2.0, 3.0, 4.0, 5.0, 6.0)}

    def __init__(self, dim: int, num_heads: int = 1, block_index: int = 0) -> None:
        super().__init__(dim, num_heads, block_index)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False)
        return self.proj(pooled.permute(0, 2, 3, 1))


def test_a_new_mixer_is_placed_inside_and_compare_places_a_users_family() -> None:
    # the skeleton costs 3.1M at micro: the search changes as few knobs as it can, depths first
    start = fit.start_cfg("test_heavy_pool", "micro")
    assert start == ModelCfg("test_heavy_pool", **{k: v for k, v in fit.configs.SKELETON["micro"].items()},
                             norm_eps=1e-6)
    fitted = fit.search(HeavyPool, "micro")
    assert fitted.inside and 0 < len(fitted.changed) <= fit.MAX_CHANGES
    assert set(fitted.changed) <= {"depth3", "outer_depth", "width", "mlp_ratio"}
    assert fit.fit_budget("test_heavy_pool", "micro") == fitted.cfg
    assert _total_of(fitted.cfg) == (fitted.params, fitted.macs)
    # a family registered as the skeleton (as a plug-in does) is placed at its budget by compare, then re-registered
    tokenmixers.register_family("test_heavy_pool", "test_heavy_pool", norm_eps=1e-6)
    assert not fit.budget("micro").inside(*_measured("unified_test_heavy_pool_micro"))
    placed = fit_user_models(["unified_test_heavy_pool_micro", "unified_convnext_micro"])
    assert list(placed) == ["unified_test_heavy_pool_micro"]  # the built-in model is left as it is
    assert zoo.model_cfg("unified_test_heavy_pool_micro") == fitted.cfg
    assert fit.budget("micro").inside(*_measured("unified_test_heavy_pool_micro"))


def _total_of(cfg: ModelCfg) -> tuple[int, int]:
    built = tokenmixers.create_model(cfg, device="meta")
    return count_params(built), count_macs(built)["macs_paper"]


def test_when_nothing_lands_inside_the_result_says_so() -> None:
    # no knob may change: the skeleton of a mixer far below the budget is returned, outside, as the closest found
    fitted = fit.search(HeavyPool, "tiny", max_changes=0)
    assert not fitted.inside and fitted.params < fit.budget("tiny").params[0]
    assert "OUTSIDE (the closest setting found)" in str(fitted)
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        fit.search(HeavyPool, "huge")


def test_fit_command_writes_a_family_that_import_registers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(capsys, "fit", "halo", "--scales", "micro", "--name", "halo_again",
                         "--out", str(tmp_path / "halo.yaml"))
    assert code == 0, err
    assert "micro: depths=(2, 2, 9, 2) dims=(32, 64, 128, 256)" in out and "inside the envelope" in out
    assert "changed: nothing (the start is inside)" in out and "registered unified_halo_again_micro" in out
    zoo.register(fit.Family("halo_again", {}, "", {}, "transformer"))  # forget the models it registered
    family = fit.load_family(tmp_path / "halo.yaml")
    assert family.configs["micro"] == zoo.model_cfg("unified_halo_micro")
    code, out, err = cli(capsys, "--import", str(tmp_path / "halo.yaml"), "list", "--params", "unified_halo_again_*")
    assert code == 0 and "unified_halo_again_micro" in out and "params=4.39M" in out, err
    (tmp_path / "bad.yaml").write_text("family: x\n")
    with pytest.raises(ValueError, match="is not a family file written by `tokenmixers fit --out`"):
        fit.load_family(tmp_path / "bad.yaml")


@pytest.mark.parametrize("mixer", ["pool", "focal", "ss2d", "gated_cnn"])
def test_the_mixers_published_after_the_paper_are_fitted_at_all_four_budgets(mixer: str) -> None:
    # the zoo's configurations of these families are the fitter's, from the skeleton, and inside every envelope
    for scale in SCALES:
        registered = zoo.model_cfg(f"unified_{mixer}_{scale}")
        found = fit.search(mixer, scale, start=fit.skeleton(mixer, scale))
        assert found.inside and found.cfg == registered, (scale, found)
