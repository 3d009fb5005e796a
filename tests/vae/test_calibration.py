"""The missing-cell adjustment of the anomaly score against a density known in closed form."""

from __future__ import annotations

import math

import torch

import vae
from vae.calibration import fit_missing_adjustment


def _independent_cells(y: torch.Tensor) -> vae.VAE:
    """A masked model whose p(y) is a product of Gaussians, one per column: the decoder ignores z
    and q(z|y) = p(z), so every importance weight is p(y_O) and IWAE is exact."""
    spec = vae.describe_table(y, missing="mask")
    model = vae.VAE(spec, vae.ModelConfig(latent_dim=1, hidden_dims=[], decoder_variance="per_feature"), seed=0)
    with torch.no_grad():
        for layer in (model.decoder.net[0], model.encoder.net[0]):
            layer.weight.zero_()
        model.encoder.net[0].bias.zero_()
        model.decoder.net[0].bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        model.decoder.raw_sigma.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
    return model.eval()


def test_with_independent_cells_b_is_each_cells_log_density_and_every_pattern_scores_alike():
    """log p(y_O) = sum_{j in O} log N(y_j; m_j, s_j^2) in the table's units: the fitted b_j are
    those terms (one row repeated: no other variation), and the adjusted score of that row is the
    same whichever cells are missing, so its flag does not depend on them."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5
    model = _independent_cells(y)
    out = model.decode(torch.zeros(1, 1))
    scale = torch.tensor(model.spec.scale, dtype=torch.float64)
    mean = (out.loc[0].double() * scale + torch.tensor(model.spec.loc, dtype=torch.float64))
    std = out.sigma.double().expand(4) * scale
    row = y[0].double()
    cells = -0.5 * ((row - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)

    rows = y[:1].repeat(64, 1)
    ll = vae.score_rows(model, rows, 10, 0, common_eps=True).log_likelihood
    torch.testing.assert_close(ll, cells.sum().expand(64), rtol=1e-5, atol=1e-4)
    adjustment = fit_missing_adjustment(model, rows, ll, 10, 0)
    torch.testing.assert_close(torch.tensor(adjustment.mean[1:], dtype=torch.float64), cells, rtol=1e-4, atol=1e-3)

    patterns = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    blanked = torch.where(patterns, y[:1], torch.nan)
    scores = vae.score_rows(model, blanked, 10, 0, common_eps=True).log_likelihood
    adjusted = adjustment.adjusted(scores, patterns)
    torch.testing.assert_close(adjusted, adjusted[:1].expand(4), rtol=0, atol=1e-3)


def test_rows_drawn_from_independent_cells_give_each_cells_entropy_and_a_spread_power_of_one_half():
    """Rows drawn from that model: E log N(y_j; m_j, s_j^2) = -1/2 log(2 pi e s_j^2), so b_j is that
    to its sampling error (each b_j rests on the ~1000 of 2048 rows whose copy masked j: 0.71 / sqrt(1000)
    = 0.022 nats; the bound is 4.5 of those); log p(y_O) has variance |O| / 2, so g is about 1/2 (0.52 to
    0.60 over three draws: the shape of a sum of |O| halved chi-squares changes a little with |O|)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5
    model = _independent_cells(y)
    rows = vae.sample(model, 4000, generator=torch.Generator().manual_seed(1))
    std = model.decode(torch.zeros(1, 1)).sigma.double().expand(4) * torch.tensor(model.spec.scale, dtype=torch.float64)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * std**2)
    ll = vae.score_rows(model, rows, 10, 0, common_eps=True).log_likelihood
    adjustment = fit_missing_adjustment(model, rows, ll, 10, 0)
    torch.testing.assert_close(torch.tensor(adjustment.mean[1:], dtype=torch.float64), -entropy, rtol=0, atol=0.1)
    assert abs(adjustment.spread_power - 0.5) < 0.15
