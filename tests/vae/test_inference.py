"""Embedding, reconstruction, sampling and scoring, checked on the pPCA-trained model."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import vae
from tests.vae.closed_form import affine_vae_marginal, ppca_mle


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_embed_shapes_and_row_order(ppca_plain):
    model, y = ppca_plain.model, ppca_plain.test[:1000]
    emb = vae.embed(model, y)
    assert emb.z.shape == (1000, 2) and emb.logvar is None
    post = model.encode(*model.standardize(y))
    torch.testing.assert_close(emb.z, post.mu.detach())
    # batching and order: small batches and reversed rows give the same rows back
    small = vae.embed(model, y.flip(0), batch_rows=7)
    torch.testing.assert_close(small.z.flip(0), emb.z)
    with_var = vae.embed(model, y, with_variance=True, batch_rows=300)
    assert with_var.logvar is not None and with_var.logvar.shape == (1000, 2)
    torch.testing.assert_close(with_var.logvar, post.logvar.detach())
    empty = vae.embed(model, y[:0], with_variance=True)
    assert empty.z.shape == (0, 2) and empty.logvar.shape == (0, 2)


def test_embed_sample_mode_draws_from_the_posterior(ppca_plain):
    model = ppca_plain.model
    n = 20_000
    row = ppca_plain.test[:1].expand(n, -1)
    draws = vae.embed(model, row, mode="sample", generator=_gen(0), with_variance=True)
    mu, var = vae.embed(model, row[:1]).z[0], draws.logvar[0].exp()
    assert ((draws.z.mean(0) - mu).abs() < 5 * (var / n).sqrt()).all()
    assert ((draws.z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()
    again = vae.embed(model, row, mode="sample", generator=_gen(0))
    torch.testing.assert_close(again.z, draws.z)  # the generator makes it reproducible


def test_reconstruct_is_the_ppca_projection(ppca_plain):
    """E[y | z = E[z|y]] of pPCA is W M^{-1} W^T (y - mean) + mean, invariant to W's rotation."""
    closed = ppca_mle(ppca_plain.train, ppca_plain.k)
    y = ppca_plain.test
    got = vae.reconstruct(ppca_plain.model, y).double()
    assert got.shape == y.shape
    expected = closed.posterior_mean_reconstruction(y)
    sigma = float(closed.sigma2.sqrt())  # noise sd per column, about 0.6 here
    assert float((got - expected).pow(2).mean().sqrt()) < 0.1 * sigma  # measured: 0.066 sigma
    # the rank-2 projection drops the noise of the 8 discarded directions, as the closed form does
    residual, closed_residual = ((v - y.double()).pow(2).mean().sqrt() for v in (got, expected))
    assert float(residual) == pytest.approx(float(closed_residual), rel=0.01)
    assert float(residual) > 0.8 * sigma * math.sqrt(8 / 10)


def test_sample_matches_the_models_marginal_and_the_ppca_closed_form(ppca_plain):
    model, n = ppca_plain.model, 40_000
    rows = vae.sample(model, n, generator=_gen(1), batch_rows=10_000).double()
    assert rows.shape == (n, 10)
    mean, cov = rows.mean(0), torch.cov(rows.T)
    # (1) the sampler draws from the trained model's own marginal N(v, C C^T + Psi), exactly
    own = affine_vae_marginal(model)
    sd = own.cov.diagonal().sqrt()
    assert ((mean - own.mean).abs() < 5 * sd / math.sqrt(n)).all()
    cov_se = ((torch.outer(sd**2, sd**2) + own.cov**2) / n).sqrt()  # se of a sample covariance
    assert ((cov - own.cov).abs() < 5 * cov_se).all()
    # (2) and that marginal is the pPCA MLE of the data: KL(MLE || samples) is the expected
    # log-likelihood per row lost by sampling from the model instead; bound it like the
    # likelihood tests (measured: about 0.01 nats; sampling alone adds about 0.001)
    closed = ppca_mle(ppca_plain.train, ppca_plain.k)
    lost = kl_divergence(MultivariateNormal(closed.mean, closed.cov), MultivariateNormal(mean, cov))
    assert float(lost) < 0.03
    # noise=False gives E[y|z] = C z + v: covariance C C^T of rank 2
    means = vae.sample(model, n, generator=_gen(2), noise=False).double()
    assert torch.linalg.matrix_rank(torch.cov(means.T), rtol=1e-4) == 2
    torch.testing.assert_close(torch.cov(means.T).diagonal() + own.noise.diagonal(), cov.diagonal(), rtol=0.05, atol=0)


@pytest.mark.parametrize("which", ["ppca_plain", "ppca_scaled"])
def test_traversals_move_along_one_latent_axis_in_original_units(which, request):
    model = request.getfixturevalue(which).model
    trav = vae.traversals(model, steps=5, radius=2.0)  # z_j = -2, -1, 0, 1, 2
    assert trav.shape == (2, 5, 10)
    center = model.mean_of(model.decode(torch.zeros(1, 2))).detach()[0]
    torch.testing.assert_close(trav[:, 2], center.expand(2, -1))
    # affine decoder: each unit step in z_j moves y by C[:, j], times the column scale
    step = (model.decoder.net[0].weight.detach() * model.scale[:, None]).T  # (K, D)
    torch.testing.assert_close(trav.diff(dim=1), step[:, None, :].expand(2, 4, 10), rtol=1e-3, atol=1e-3 * float(step.abs().max()))


def test_anomaly_threshold_at_plotting_positions():
    """A new row falls below the k-th least of n exchangeable scores with probability k / (n + 1):
    at q = k / (n + 1) the threshold is that score, linear in k between, the greatest above n."""
    values = torch.arange(1000, dtype=torch.float64).flip(0) * 2.0  # s_(k) = 2 (k - 1), n = 1000
    assert vae.anomaly_threshold(values, 10 / 1001) == pytest.approx(18.0)
    assert vae.anomaly_threshold(values, 1 / 1001) == pytest.approx(0.0)
    assert vae.anomaly_threshold(values, 10.25 / 1001) == pytest.approx(18.5)
    assert vae.anomaly_threshold(values, 0.5) == pytest.approx(2 * (500.5 - 1))
    assert vae.anomaly_threshold(values, 1000.5 / 1001) == pytest.approx(1998.0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(vae.ConfigError, match="embed.anomaly_quantile"):
            vae.anomaly_threshold(values, bad)


def test_anomaly_threshold_below_the_least_is_an_exponential_tail_by_hand():
    """q (n + 1) < 1: u = the (m + 1)-th least, sigma = the mean excess of the m least below it,
    threshold u - sigma * m * (((m + 1) / (q (n + 1))) ** (1 / m) - 1), m = min(10, n // 4) >= 3."""
    s = torch.tensor([5.0, -1.0, 0.0, -3.0, 2.0, 7.0, 1.0, -6.0, 3.0, 4.0, 6.0, 8.0, 9.0, 10.0, 11.0, 12.0])
    n, q, m = 16, 0.02, 4  # the four least: -6, -3, -1, 0; u = 1; mean excess (7 + 4 + 2 + 1) / 4 = 3.5
    expected = 1.0 - 3.5 * m * (((m + 1) / (q * (n + 1))) ** (1 / m) - 1)
    assert vae.anomaly_threshold(s, q) == pytest.approx(expected)
    assert vae.anomaly_threshold(s[:3], 0.01) == -1.0  # fewer than 4 scores: the least


def _mean_exceedance(draw, cdf, n: int, q: float, reps: int, seed: int) -> float:
    """The true share of new rows below the threshold (cdf at it), averaged over reps samples of n."""
    gen = torch.Generator().manual_seed(seed)
    return sum(cdf(vae.anomaly_threshold(draw(n, gen), q)) for _ in range(reps)) / reps


def _neg_exponential(n: int, gen: torch.Generator) -> torch.Tensor:
    return -torch.empty(n, dtype=torch.float64).exponential_(1.0, generator=gen)


def _laplace(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, dtype=torch.float64, generator=gen) - 0.5
    return -u.sign() * torch.log1p(-2 * u.abs())


def _laplace_cdf(t: float) -> float:
    return 0.5 * math.exp(t) if t < 0 else 1 - 0.5 * math.exp(-t)


@pytest.mark.parametrize(("draw", "cdf"), [(_neg_exponential, lambda t: math.exp(min(t, 0.0))),
                                           (_laplace, _laplace_cdf)], ids=["neg_exponential", "laplace"])
def test_anomaly_threshold_flags_the_quantile_of_new_rows_from_few(draw, cdf):
    """Scores with an exactly exponential lower tail, n = 50, q = 0.01 (below the least: q (n + 1)
    = 0.51): over 3000 samples the threshold's true exceedance P(new < threshold), in closed form,
    averages q (unbiased there; Monte Carlo error about 2 %); the empirical quantile averaged about
    1.5 / 51 = 2.9 q. At q = 5 / 51 (the 5th least) it is 5 / 51 whatever the distribution, and with
    n = 2000 one sample's threshold is near q."""
    q = 0.01
    assert 0.9 * q < _mean_exceedance(draw, cdf, 50, q, 3000, 0) < 1.1 * q
    assert 0.85 * 0.003 < _mean_exceedance(draw, cdf, 30, 0.003, 3000, 1) < 1.15 * 0.003  # q (n + 1) = 0.093
    assert _mean_exceedance(draw, cdf, 50, 5 / 51, 3000, 2) == pytest.approx(5 / 51, rel=0.05)
    assert _mean_exceedance(draw, cdf, 2000, q, 20, 3) == pytest.approx(q, rel=0.1)


def test_score_rows_agrees_with_evaluate(ppca_plain):
    model, y = ppca_plain.model, ppca_plain.test[:700]
    scores = vae.score_rows(model, y, iw_samples=50, seed=4, batch_rows=128)
    ev = vae.evaluate(model, y, iw_samples=50, seed=4, batch_rows=128)
    assert scores.log_likelihood.shape == (700,) and scores.recon_cells.shape == (700, 10)
    assert ev.n_rows == 700
    assert ev.log_likelihood == pytest.approx(float(scores.log_likelihood.mean()), abs=1e-9)
    assert ev.elbo == pytest.approx(float(scores.elbo.mean()), abs=1e-9)
    assert ev.reconstruction == pytest.approx(sum(ev.per_feature_reconstruction), abs=1e-6)
    # per-row scores do not depend on how rows are batched (beyond Monte Carlo error)
    other = vae.score_rows(model, y, iw_samples=50, seed=5, batch_rows=700)
    assert ((other.log_likelihood - scores.log_likelihood).abs() < 5 * (other.stderr + scores.stderr) + 1e-3).all()
    # a row far off the plane is the least likely
    outlier = y[:1] + 50.0
    assert float(vae.score_rows(model, outlier, iw_samples=50).log_likelihood) < float(scores.log_likelihood.min())
