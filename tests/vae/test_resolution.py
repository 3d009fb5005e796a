"""The recording resolution of a column floors its noise: no density spike on rounded values,
and a held-out row one grid step off costs nats, not a hundred thousand (closed forms)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import vae
from tests.vae.closed_form import ppca_heldout_loglik
from vae.table import recording_step

MODES = ("fixed", "shared", "per_feature", "heteroscedastic", "full", "lowrank")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_recording_step_is_the_grid_of_repeated_values():
    g = _gen(0)
    counts = torch.randint(0, 17, (500,), generator=g).double()
    assert recording_step(counts) == 1.0
    assert recording_step(torch.round(torch.randn(500, generator=g, dtype=torch.float64) * 300) / 100) == pytest.approx(0.01)
    levels = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64).log()[torch.randint(0, 3, (200,), generator=g)]
    assert recording_step(levels) == pytest.approx(math.log(2.0))  # levels off any grid: the closest two
    assert recording_step(torch.randn(500, generator=g, dtype=torch.float64)) == 0.0  # all distinct: none
    assert recording_step(torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.7], dtype=torch.float64)) == pytest.approx(0.4)  # float noise is one value


def _rounded_table(n: int = 400) -> torch.Tensor:
    """Pixel-like counts (a column that is 0 in most rows), a 0.01 grid, a continuous column."""
    g = _gen(1)
    pixel = torch.where(torch.rand(n, generator=g) < 0.8, 0.0, torch.randint(1, 17, (n,), generator=g).float())
    grid = torch.round(torch.randn(n, generator=g) * 50) / 100 + 3
    return torch.stack([pixel, grid, torch.randn(n, generator=g) * 7], dim=1)


def _collapsed(model: vae.VAE) -> vae.VAE:
    """Every noise parameter at its smallest: the std each column is left with is its floor."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "raw" in name:
                p.fill_(-30.0)
        dec = model.decoder
        if dec.mode == "heteroscedastic" or dec.by_z:  # the noise head's outputs: -30
            last = dec.net[-1]
            last.weight[dec.n_out :].zero_()
            last.bias[dec.n_out :].fill_(-30.0)
        if dec.by_z:
            dec.noise_gate.fill_(1.0)
        if dec.noise is not None and dec.mode == "full":
            dec.noise.lower.zero_()
        if dec.noise is not None and dec.mode == "lowrank":
            dec.noise.factor.zero_()
    return model


def _conditional_std(model: vae.VAE, z: torch.Tensor) -> torch.Tensor:
    """(B, D) std of each cell given z and the cells before it, in the table's units."""
    out = model.decode(z)
    if out.scale_tril is None:
        std = out.sigma.expand_as(out.loc)
    else:
        std = out.scale_tril.diagonal().expand_as(out.loc)
        if out.log_scale is not None:
            std = std * out.log_scale.exp()
    return std * model.scale


@pytest.mark.parametrize("mode", MODES)
def test_no_cell_is_claimed_more_precisely_than_it_was_recorded(mode):
    y = _rounded_table()
    cfg = vae.ModelConfig(latent_dim=2, hidden_dims=(8,), decoder_variance=mode, noise_rank=1, fixed_sigma=1e-3)
    for standardize in (True, False):
        spec = vae.describe_table(y, standardize=standardize)
        assert spec.resolution[0] == 1.0 and spec.resolution[1] == pytest.approx(0.01, rel=1e-4) and spec.resolution[2] == 0.0
        model = _collapsed(vae.VAE(spec, cfg, seed=0))
        with torch.no_grad():
            std = _conditional_std(model, torch.randn(64, 2, generator=_gen(2)))
        floor = torch.tensor([1.0, 0.01, 0.0]) / math.sqrt(12)
        assert bool((std >= floor * (1 - 1e-4)).all()), (mode, standardize, std.min(0).values)
        assert float(std[:, 0].min()) == pytest.approx(1 / math.sqrt(12), rel=1e-3)  # collapsed: at the floor
        # the continuous column keeps model.min_sigma (table units without standardization)
        assert float(std[:, 2].min()) < 0.01


@pytest.mark.parametrize("mode", ["per_feature", "full"])
def test_a_row_one_step_off_a_collapsed_column_costs_nats_not_a_hundred_thousand(mode):
    y = _rounded_table()
    cfg = vae.ModelConfig(latent_dim=2, hidden_dims=(), decoder_variance=mode, noise_by_z=False)
    spec = vae.describe_table(y)
    old = replace(spec, resolution=())  # as saved before the resolution was kept: min_sigma only
    scores, spikes = {}, {}
    for name, s in (("floored", spec), ("unfloored", old)):
        model = _collapsed(vae.VAE(s, cfg, seed=0))
        with torch.no_grad():  # the decoder predicts pixel 0 exactly, the other columns at their rows
            model.decoder.net[0].weight.zero_()
            model.decoder.net[0].bias.copy_((torch.tensor([0.0, 3.0, 0.0]) - model.loc) / model.scale)
        rows = torch.tensor([[1.0, 3.0, 0.0], [0.0, 3.0, 0.0]])  # one count off on the pixel; on it
        x, mask = model.standardize(rows)
        with torch.no_grad():
            cells = model.log_px_z(x, model.decode(torch.zeros(2, 2)), mask)
        scores[name], spikes[name] = float(cells[0, 0]), float(cells[1, 0])
    # log N(1; 0, 1/12) = -6 - log(sqrt(2 pi / 12)): one step off the floor's spike
    assert scores["floored"] == pytest.approx(-6.0 - 0.5 * math.log(2 * math.pi / 12), abs=1e-3)
    assert scores["unfloored"] < -1e4
    # and the spike itself: log p <= log(sqrt(12 / (2 pi))) - log h = 0.3235 (h = 1) at the recorded
    # value, where min_sigma alone lets it reach -log(1e-3 s) - 0.92
    assert spikes["floored"] == pytest.approx(0.5 * math.log(12 / (2 * math.pi)), abs=1e-3)
    assert spikes["unfloored"] > 4.0  # -log(1e-3 * 4.0) - 0.92 with the pixel's std 4.0


def test_a_model_saved_before_the_resolution_was_kept_has_no_floor_beyond_min_sigma():
    spec = vae.describe_table(_rounded_table())
    d = spec.to_dict()
    del d["resolution"]
    old = vae.TableSpec.from_dict(d)
    assert old.resolution == ()
    model = vae.VAE(old, vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=0)
    assert bool((model.decoder.sigma_floor == model.decoder.min_sigma).all())  # no column lifted
    assert torch.equal(model.decoder.sigma_floor, torch.full((3,), 1e-3))


def _dated_table(n: int = 600) -> torch.Tensor:
    """year, month, date = year + (month - 1) / 12 to 3 decimals (a function of the two), sales."""
    g = _gen(4)
    year = torch.randint(2000, 2016, (n,), generator=g).double()
    month = torch.randint(1, 13, (n,), generator=g).double()
    date = torch.round((year + (month - 1) / 12) * 1000) / 1000
    sales = 100 + 5 * (year - 2000) + torch.randn(n, generator=g, dtype=torch.float64) * 20
    return torch.stack([year, month, date, sales], dim=1)


def test_a_column_the_earlier_ones_determine_has_no_resolution_of_its_own(monkeypatch):
    g = _gen(5)
    a, b = (torch.randint(0, 10, (500,), generator=g).double() for _ in range(2))
    assert vae.describe_table(torch.stack([a, b, a + b], 1)).resolution == (1.0, 1.0, 0.0)
    assert vae.describe_table(torch.stack([a + b, a, b], 1)).resolution == (1.0, 1.0, 0.0)  # the last of a relation
    flipped = a + b
    flipped[7] += 1  # one row off the relation by a step: a reading again
    assert vae.describe_table(torch.stack([a, b, flipped], 1)).resolution == (1.0, 1.0, 1.0)
    spec = vae.describe_table(_dated_table())
    assert spec.resolution == (1.0, 1.0, 0.0, 0.0)  # date: 3 decimals, determined by year and month
    monkeypatch.setattr("vae.table._BLOCK_ROWS", 7)  # the same in blocks of rows, NaN rows left out
    holed = _dated_table()
    holed[3, 1] = torch.nan
    assert vae.describe_table(holed, missing="mask").resolution == (1.0, 1.0, 0.0, 0.0)
    assert vae.describe_table(torch.stack([a, b, flipped], 1)).resolution == (1.0, 1.0, 1.0)


def test_the_start_holds_a_determined_column_as_tight_as_the_fit_does():
    """date has distinct values 1/12 apart, but given year and month the closed-form fit (like
    the full-Gaussian baseline) knows it to 3 decimals: the start is that fit, not lifted to
    the grid, and it scores far above the same start floored at date's grid. (lowrank floors
    each column's independent noise d_j instead, the rounding error's own model: there year's
    and month's floors bound how tightly the factors can tie date to them.)"""
    y = _dated_table()
    cfg = vae.ModelConfig(latent_dim=1, hidden_dims=(8,), decoder_variance="full")
    spec = vae.describe_table(y)
    gridded = replace(spec, resolution=(1.0, 1.0, 1 / 12, 0.0))  # as if date were a reading on its grid
    scores = {}
    for name, s in (("spec", spec), ("no resolution", replace(spec, resolution=())), ("gridded", gridded)):
        model = vae.VAE(s, cfg, seed=0)
        vae.init_linear_gaussian(model, y)
        scores[name] = vae.evaluate(model, y, iw_samples=1).log_likelihood
    assert scores["spec"] == pytest.approx(scores["no resolution"], abs=1e-3)
    assert scores["gridded"] < scores["spec"] - 1.0


@pytest.mark.parametrize("standardize", [True, False])
def test_the_start_of_shared_noise_is_still_the_ppca_mle_on_rounded_columns(standardize):
    """shared: one std for every column, the column floors a clamp; the start sets that one std
    to the pPCA MLE's (the rounded columns' floors are far below it here)."""
    y = _rounded_table()
    model = vae.VAE(vae.describe_table(y, standardize=standardize),
                    vae.ModelConfig(latent_dim=2, hidden_dims=(8,), decoder_variance="shared"), seed=0)
    assert float(model.decoder.sigma_floor.max()) > 10 * model.decoder.min_sigma  # a floor is lifted
    vae.init_linear_gaussian(model, y)
    closed = ppca_heldout_loglik(y.double(), y.double(), 2, standardize=standardize)
    assert vae.evaluate(model, y, iw_samples=1, seed=0).log_likelihood == pytest.approx(closed, abs=2e-3)
