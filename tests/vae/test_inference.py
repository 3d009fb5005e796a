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


def test_anomaly_threshold_is_the_quantile():
    values = torch.arange(1001, dtype=torch.float64)  # 0 .. 1000
    assert vae.anomaly_threshold(values, 0.01) == pytest.approx(10.0)
    assert vae.anomaly_threshold(values, 0.5) == pytest.approx(500.0)
    ll = torch.randn(5000, generator=_gen(3))
    threshold = vae.anomaly_threshold(ll, 0.05)
    assert float((ll < threshold).double().mean()) == pytest.approx(0.05, abs=1e-3)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(vae.ConfigError, match="embed.anomaly_quantile"):
            vae.anomaly_threshold(ll, bad)


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
