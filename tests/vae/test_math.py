"""The model's math against closed forms and torch.distributions, on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

import vae
from tests.vae.closed_form import PPCA, affine_vae_marginal
from vae.elbo import kl_per_dim, kl_weight, loss_terms, reparameterize
from vae.model import Posterior

MODES = ("fixed", "shared", "per_feature", "heteroscedastic")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _posterior(b: int = 4, k: int = 3, seed: int = 0) -> Posterior:
    g = _gen(seed)
    return Posterior(torch.randn(b, k, generator=g, dtype=torch.float64),
                     torch.randn(b, k, generator=g, dtype=torch.float64) * 0.7)


def _table(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Real columns in very different units: mean 5, 100 and -3000, std 0.01, 10 and 1000."""
    g = _gen(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([0.01, 10.0, 1000.0]) + torch.tensor([5.0, 100.0, -3000.0])


def _model(y: torch.Tensor, **kwargs) -> vae.VAE:
    spec_keys = {"likelihood", "standardize", "missing"}
    spec = vae.describe_table(y, **{k: v for k, v in kwargs.items() if k in spec_keys})
    config = {k: v for k, v in kwargs.items() if k not in spec_keys - {"likelihood"}}
    torch.manual_seed(1)
    return vae.VAE(spec, vae.ModelConfig(**{"latent_dim": 2, "hidden_dims": (8,), **config}))


# ---- KL and reparameterization -------------------------------------------------------------


def test_kl_matches_torch_distributions():
    post = _posterior()
    q = Normal(post.mu, (0.5 * post.logvar).exp())
    expected = kl_divergence(q, Normal(torch.zeros_like(post.mu), torch.ones_like(post.mu)))
    torch.testing.assert_close(kl_per_dim(post), expected, rtol=1e-12, atol=1e-12)


def test_kl_matches_monte_carlo():
    post = _posterior(b=3, k=2)
    n = 200_000
    q = Normal(post.mu, (0.5 * post.logvar).exp())
    z = q.sample((n,))  # (n, B, K)
    log_ratio = q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)  # E_q[log q - log p] = KL
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    assert ((kl_per_dim(post) - estimate).abs() < 5 * stderr).all()


def test_reparameterize_gives_mean_and_covariance():
    mu = torch.tensor([[1.5, -2.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.01)]], dtype=torch.float64)
    n = 400_000
    z = reparameterize(Posterior(mu, logvar), n, _gen(3))
    assert z.shape == (n, 1, 3)
    z = z[:, 0]
    var = logvar[0].exp()
    # standard errors: mean sigma/sqrt(n); variance sigma^2 sqrt(2/n); covariance sigma_i sigma_j / sqrt(n)
    assert ((z.mean(0) - mu[0]).abs() < 5 * var.sqrt() / math.sqrt(n)).all()
    cov = torch.cov(z.T)
    sd = var.sqrt()
    tol = 5 * torch.outer(sd, sd) / math.sqrt(n) * (1 + math.sqrt(2) * torch.eye(3, dtype=torch.float64))
    assert ((cov - torch.diag(var)).abs() < tol).all()


def test_reparameterize_is_differentiable_in_mu_and_logvar():
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    reparameterize(Posterior(mu, logvar), 4, _gen()).sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    torch.testing.assert_close(mu.grad, torch.full((2, 3), 4.0))
    assert logvar.grad.abs().sum() > 0


# ---- the decoder's log-density in original units -------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gaussian_log_px_z_is_normal_log_prob_in_original_units(mode):
    y = _table()
    model = _model(y, decoder_variance=mode, fixed_sigma=0.7)
    if model.decoder.raw_sigma is not None:  # move the learned variance away from its start
        with torch.no_grad():
            model.decoder.raw_sigma.copy_(torch.randn(model.decoder.raw_sigma.shape, generator=_gen(2)))
    x, mask = model.standardize(y)
    assert mask is None
    z = torch.randn(5, y.shape[0], 2, generator=_gen(4))  # (M, B, K)
    out = model.decode(z)
    loc, scale = torch.tensor(model.spec.loc), torch.tensor(model.spec.scale)
    # the density of y itself: y = loc + scale * x_hat, so y ~ N(loc + scale m, (scale s)^2)
    expected = Normal(loc + scale * out.loc.double(), scale * out.sigma.double()).log_prob(y.double())
    got = model.log_px_z(x, out, mask)
    assert got.shape == (5, y.shape[0], 3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-4)
    if mode == "fixed":
        assert torch.all(out.sigma == 0.7)


def test_log_px_z_without_standardization_is_plain_normal():
    y = torch.randn(64, 2, generator=_gen(5)) * 3 + 1
    model = _model(y, standardize=False, decoder_variance="per_feature")
    with torch.no_grad():
        model.decoder.raw_sigma.copy_(torch.tensor([0.3, -1.0]))
    x, mask = model.standardize(y)  # the networks see standardized cells either way
    torch.testing.assert_close(x, (y - y.mean(0)) / y.std(0, unbiased=False), rtol=1e-5, atol=1e-5)
    out = model.decode(torch.randn(y.shape[0], 2, generator=_gen(6)))
    # the learned noise is in the table's units, in multiples of the RMS column std
    unit = model.scale.pow(2).mean().sqrt()
    raw_sigma = unit * torch.nn.functional.softplus(model.decoder.raw_sigma) + model.config.min_sigma
    torch.testing.assert_close(model.scale * out.sigma, raw_sigma)
    expected = Normal(model.loc + model.scale * out.loc, raw_sigma).log_prob(y)
    torch.testing.assert_close(model.log_px_z(x, out, mask), expected, rtol=1e-5, atol=1e-5)


def test_bernoulli_cells_match_torch_bernoulli():
    y = (torch.rand(40, 4, generator=_gen(7)) < 0.3).float()
    y[0] = 1.0  # no column may be constant
    y[1] = 0.0
    model = _model(y, likelihood="bernoulli")
    assert model.spec.kinds == ("bernoulli",) * 4
    assert model.spec.loc == (0.0,) * 4 and model.spec.scale == (1.0,) * 4
    x, mask = model.standardize(y)
    out = model.decode(torch.randn(3, y.shape[0], 2, generator=_gen(8)) * 3)
    expected = Bernoulli(logits=out.loc).log_prob(y)
    torch.testing.assert_close(model.log_px_z(x, out, mask), expected, rtol=1e-5, atol=1e-5)
    assert set(vae.sample(model, 200, generator=_gen(9)).unique().tolist()) <= {0.0, 1.0}


def test_auto_likelihood_picks_per_column():
    g = _gen(10)
    real = torch.randn(50, 2, generator=g) * torch.tensor([3.0, 0.1]) + 7.0
    binary = (torch.rand(50, 2, generator=g) < 0.5).float()
    y = torch.stack([real[:, 0], binary[:, 0], real[:, 1], binary[:, 1]], dim=1)
    model = _model(y, likelihood="auto", decoder_variance="per_feature")
    assert model.spec.kinds == ("gaussian", "bernoulli", "gaussian", "bernoulli")
    assert model.spec.loc[1] == 0.0 and model.spec.scale[3] == 1.0
    x, mask = model.standardize(y)
    torch.testing.assert_close(x[:, [1, 3]], binary)
    out = model.decode(torch.randn(y.shape[0], 2, generator=g))
    loc, scale = torch.tensor(model.spec.loc), torch.tensor(model.spec.scale)
    got = model.log_px_z(x, out, mask)
    gauss = Normal(loc + scale * out.loc, scale * out.sigma).log_prob(y)
    bern = Bernoulli(logits=out.loc[:, [1, 3]]).log_prob(binary)
    torch.testing.assert_close(got[:, [0, 2]], gauss[:, [0, 2]], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[:, [1, 3]], bern, rtol=1e-5, atol=1e-5)
    probs = model.mean_of(out)
    assert ((probs[:, [1, 3]] > 0) & (probs[:, [1, 3]] < 1)).all()


# ---- missing cells --------------------------------------------------------------------------


def test_mask_drops_unobserved_cells_and_feeds_the_mask_to_the_encoder():
    y = _table(n=32)
    y[3, 1] = float("nan")
    y[7, 0] = float("nan")
    model = _model(y, missing="mask", decoder_variance="per_feature")
    assert model.encoder.net[0].in_features == 2 * 3  # values and mask
    assert model.spec.loc[1] == pytest.approx(float(y[~y[:, 1].isnan(), 1].double().mean()), rel=1e-6)
    x, mask = model.standardize(y)
    assert mask is not None and mask[3, 1] == 0 and mask[7, 0] == 0 and mask.sum() == 32 * 3 - 2
    assert torch.isfinite(x).all()
    out = model.decode(torch.randn(y.shape[0], 2, generator=_gen(11)))
    cells = model.log_px_z(x, out, mask)
    assert cells[3, 1] == 0 and cells[7, 0] == 0
    loc, scale = torch.tensor(model.spec.loc), torch.tensor(model.spec.scale)
    observed = ~y.isnan()
    expected = Normal(loc + scale * out.loc, scale * out.sigma).log_prob(torch.where(observed, y, 0.0))
    torch.testing.assert_close(cells[observed], expected[observed], rtol=1e-5, atol=1e-4)
    # the encoder tells "missing" from "observed at the column mean" (both standardize to 0)
    at_mean = y[3:4].clone()
    at_mean[0, 1] = model.spec.loc[1]
    post_missing, post_observed = model.encode(*model.standardize(y[3:4])), model.encode(*model.standardize(at_mean))
    assert not torch.allclose(post_missing.mu, post_observed.mu)
    # the ELBO's reconstruction sums observed cells only: finite, with no NaN gradient
    terms = loss_terms(model, x, mask, 2, _gen(12))
    (-terms.elbo.mean()).backward()
    assert torch.isfinite(terms.recon).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_without_mask_the_encoder_sees_only_values():
    model = _model(_table(), decoder_variance="shared")
    assert model.encoder.net[0].in_features == 3


# ---- ELBO, IWAE and warm-up -----------------------------------------------------------------


def test_loss_terms_recon_is_expected_log_density_of_affine_decoder():
    """For m = C z + v and z ~ N(mu, diag var): E_q[(x - m)^2] = (x - C mu - v)^2 + sum_k C^2 var."""
    y = torch.randn(6, 4, generator=_gen(13))
    model = _model(y, standardize=False, hidden_dims=(), decoder_variance="per_feature", latent_dim=2)
    with torch.no_grad():
        model.decoder.raw_sigma.copy_(torch.tensor([0.1, -0.5, 0.4, 1.0]))
    x, mask = model.standardize(y)
    post = model.encode(x, mask)
    dec = model.decoder.net[0]
    c, v = dec.weight.detach().double(), dec.bias.detach().double()
    s = model.decode(post.mu).sigma.detach().double()
    mu, var = post.mu.detach().double(), post.logvar.detach().double().exp()
    sq = (x.double() - mu @ c.T - v) ** 2 + var @ (c**2).T  # (B, D)
    jacobian = model.scale.double().log()  # densities are reported in the table's units
    expected = (-0.5 * sq / s**2 - s.log() - 0.5 * math.log(2 * math.pi) - jacobian).sum(-1)
    n = 20_000
    with torch.no_grad():
        terms = loss_terms(model, x, mask, n, _gen(14))
        z = reparameterize(post, n, _gen(14))
        per_sample = model.log_px_z(x, model.decode(z), mask).sum(-1).double()  # (n, B)
    stderr = per_sample.std(0) / math.sqrt(n)
    assert ((terms.recon.double() - expected).abs() < 5 * stderr + 1e-4).all()
    torch.testing.assert_close(terms.kl, kl_per_dim(post).sum(-1))
    torch.testing.assert_close(terms.elbo, terms.recon - terms.kl)


def test_sampled_kl_is_the_log_ratio_at_the_drawn_z_and_exact_at_the_exact_posterior():
    """sampled_kl: log q(z|y) - log p(z) from eps; its mean is the analytic KL, and at the exact
    posterior (the linear start of pPCA) every draw's ELBO is log p(y): no Monte Carlo noise."""
    g = _gen(15)
    y = torch.randn(300, 2, generator=g) @ torch.randn(2, 5, generator=g) + 0.3 * torch.randn(300, 5, generator=g)
    model = _model(y, hidden_dims=(), decoder_variance="shared", standardize=False)
    vae.init_linear_gaussian(model, y)
    x, mask = model.standardize(y)
    with torch.no_grad():
        post = model.encode(x, mask)
        eps = torch.randn(4000, *post.mu.shape, generator=_gen(16))
        sampled = loss_terms(model, x, mask, 4000, None, eps=eps, sampled_kl=True)
        one = loss_terms(model, x, mask, 1, None, eps=eps[0], sampled_kl=True)
        q, prior = Normal(post.mu, (0.5 * post.logvar).exp()), Normal(0.0, 1.0)
        z = post.mu + (0.5 * post.logvar).exp() * eps[0]
    torch.testing.assert_close(one.kl, (q.log_prob(z) - prior.log_prob(z)).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sampled.kl, kl_per_dim(post).sum(-1), rtol=0, atol=0.05)
    exact = affine_vae_marginal(model).log_prob(y)  # the model's own closed-form marginal
    torch.testing.assert_close(one.elbo.double(), exact, rtol=0, atol=1e-3)
    with torch.no_grad():
        analytic = loss_terms(model, x, mask, 1, None, eps=eps[0])
    assert float((analytic.elbo.double() - exact).abs().max()) > 0.1  # the analytic-KL estimate is noisy there


def test_the_validation_figure_is_iwae_and_reaches_the_closed_form_marginal():
    """Early stopping's figure (vae.train._validated, train.val_iw_samples draws a row): the means
    of the log weights are loss_terms' sampled-KL terms at the same draws; logmeanexp of them is
    the IWAE bound, exact at the exact posterior for any K, and off it above the ELBO and rising
    with K to the model's closed-form marginal log-likelihood."""
    from vae.elbo import log_weights
    from vae.train import _validated

    g = _gen(17)
    y = torch.randn(300, 2, generator=g) @ torch.randn(2, 5, generator=g) + 0.3 * torch.randn(300, 5, generator=g)
    model = _model(y, hidden_dims=(), decoder_variance="shared", standardize=False)
    vae.init_linear_gaussian(model, y)
    x, mask = model.standardize(y)
    exact = float(affine_vae_marginal(model).log_prob(y).mean())
    with torch.no_grad():
        recon, kl = log_weights(model, x, mask, 7, _gen(18))
        terms = loss_terms(model, x, mask, 7, _gen(18), sampled_kl=True)
    torch.testing.assert_close(recon.mean(0), terms.recon)
    torch.testing.assert_close(kl.mean(0), terms.kl)
    for k in (1, 25):  # q is the exact posterior: every log weight is log p(y)
        at_start = _validated(model, x, mask, k, seed=0)
        assert at_start.log_likelihood == pytest.approx(exact, abs=1e-3)
        assert float(at_start.terms.elbo) == pytest.approx(exact, abs=1e-3)
    with torch.no_grad():  # a wider, shifted q: no longer the posterior; the decoder (the model) is unchanged
        model.encoder.net[0].bias[model.latent_dim:] += 1.0
        model.encoder.net[0].bias[: model.latent_dim] += 0.3
    figures = {k: _validated(model, x, mask, k, seed=0) for k in (1, 5, 25, 2000)}
    assert figures[1].log_likelihood == pytest.approx(float(figures[1].terms.elbo), abs=1e-5)  # K = 1: the ELBO
    assert float(figures[25].terms.elbo) < exact - 0.3  # the ELBO sees the gap ...
    lls = [figures[k].log_likelihood for k in (1, 5, 25, 2000)]
    assert lls == sorted(lls) and lls[0] < exact - 0.3  # ... the bound closes it with K
    assert lls[-1] == pytest.approx(exact, abs=0.02)  # a bound in expectation: one estimate may pass it by noise


def test_one_sample_path_equals_the_batched_path():
    """loss_terms draws a single sample as (B, K) for speed; it must be the (1, B, K) math."""
    y = _table()
    model = _model(y, decoder_variance="per_feature")
    x, mask = model.standardize(y)
    fast = loss_terms(model, x, mask, 1, _gen(20))
    post = model.encode(x, mask)
    z = reparameterize(post, 1, _gen(20))  # (1, B, K), the same draws
    batched = model.log_px_z(x, model.decode(z), mask).sum(-1).mean(0)
    torch.testing.assert_close(fast.recon, batched)
    torch.testing.assert_close(reparameterize(post, None, _gen(20)), z[0])


def _exact_posterior_model(standardize: bool) -> tuple[vae.VAE, PPCA, torch.Tensor, torch.Tensor]:
    """An affine VAE set by hand to a pPCA model and its exact posterior (W has orthogonal columns).

    Then log p(y|z) + log p(z) - log q(z|y) = log p(y) for every z: ELBO = IWAE_K = log p(y).
    The pPCA lives in the units the noise is learned in, u = r x with x = (y - loc) / scale the
    networks' scale and r = 1 (standardized) or scale / RMS(scale) (table units, in multiples of the
    RMS column std); rows y are drawn from it.
    """
    g = _gen(15)
    d, k = 5, 2
    units = torch.tensor([0.01, 1.0, 30.0, 500.0, 2.0])
    model = _model(torch.randn(100, d, generator=g) * units + 3 * units, standardize=standardize,
                   hidden_dims=(), latent_dim=k, decoder_variance="shared", likelihood="gaussian")
    scale = model.scale.double()
    r = torch.ones(d, dtype=torch.float64) if standardize else scale / scale.pow(2).mean().sqrt()
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    ppca = PPCA(torch.randn(d, generator=g, dtype=torch.float64) * r, q * torch.tensor([2.0, 0.7], dtype=torch.float64) * r.mean(),
                torch.tensor(0.25, dtype=torch.float64) * r.mean() ** 2)
    m_diag = (ppca.w**2).sum(0) + ppca.sigma2  # M = W^T W + s^2 I is diagonal
    a = ppca.w.T / m_diag[:, None]  # E[z|u] = M^{-1} W^T (u - v), u = r x
    with torch.no_grad():
        model.decoder.net[0].weight.copy_(ppca.w / r[:, None])
        model.decoder.net[0].bias.copy_(ppca.mean / r)
        model.decoder.raw_sigma.copy_(torch.log(torch.expm1(ppca.sigma2.sqrt() - model.decoder.min_sigma)))
        enc = model.encoder.net[0]
        enc.weight.zero_()
        enc.weight[:k].copy_(a * r[None, :])
        enc.bias[:k].copy_(-a @ ppca.mean)
        enc.bias[k:].copy_((ppca.sigma2 / m_diag).log())  # Cov[z|x] = s^2 M^{-1}
    u = MultivariateNormal(ppca.mean, ppca.cov).sample((300,))
    y = (u / r * model.scale + model.loc).float()
    return model, ppca, y, r


@pytest.mark.parametrize("standardize", [False, True])
def test_iwae_and_elbo_equal_exact_log_likelihood_under_exact_posterior(standardize):
    model, ppca, y, r = _exact_posterior_model(standardize)
    loc, scale = model.loc.double(), model.scale.double()
    exact = ppca.log_prob((y.double() - loc) / scale * r) - (scale / r).log().sum()  # Jacobian: original units
    scores = vae.score_rows(model, y, iw_samples=50, seed=0)
    torch.testing.assert_close(scores.log_likelihood, exact, rtol=0, atol=2e-3)
    assert float(scores.stderr.max()) < 2e-3  # all importance weights equal
    ev = vae.evaluate(model, y, iw_samples=50, seed=0)
    assert ev.log_likelihood == pytest.approx(float(exact.mean()), abs=1e-3)
    assert ev.elbo == pytest.approx(float(exact.mean()), abs=0.02)
    assert ev.elbo == pytest.approx(ev.reconstruction - ev.kl, abs=1e-9)
    assert ev.kl == pytest.approx(sum(ev.kl_per_dim), abs=1e-9)
    assert ev.active_units == 2


@pytest.mark.parametrize(
    ("step", "beta", "warmup", "expected"),
    [
        (0, 1.0, 0, 1.0),  # no warm-up: beta from the first step
        (500, 1.0, 0, 1.0),
        (0, 1.0, 100, 0.0),  # ramp starts at 0
        (25, 1.0, 100, 0.25),
        (50, 2.0, 100, 1.0),  # ramps to beta, not to 1
        (99, 1.0, 100, 0.99),
        (100, 1.0, 100, 1.0),  # ends at beta
        (10_000, 0.5, 100, 0.5),  # and stays
        (3, 0.0, 10, 0.0),
    ],
)
def test_kl_weight_warmup(step, beta, warmup, expected):
    assert kl_weight(step, beta, warmup) == pytest.approx(expected, abs=1e-12)


# ---- variance floor -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "per_feature", "heteroscedastic"])
def test_min_sigma_floor_holds(mode):
    model = _model(_table(), decoder_variance=mode, min_sigma=0.05)
    with torch.no_grad():
        if model.decoder.raw_sigma is not None:
            model.decoder.raw_sigma.fill_(-80.0)
        else:  # heteroscedastic: the sigma half of the last layer's output
            model.decoder.net[-1].bias[3:].fill_(-80.0)
            model.decoder.net[-1].weight[3:].zero_()
    sigma = model.decode(torch.randn(10, 2, generator=_gen(16))).sigma
    assert (sigma >= 0.05).all()
    torch.testing.assert_close(sigma, torch.full_like(sigma, 0.05))


def test_initial_learned_sigma_is_one_on_standardized_scale():
    model = _model(_table(), decoder_variance="per_feature")
    torch.testing.assert_close(model.decode(torch.zeros(1, 2)).sigma, torch.ones(3), rtol=1e-5, atol=1e-5)


def test_fixed_sigma_below_the_floor_is_refused():
    with pytest.raises(vae.ConfigError, match="model.fixed_sigma"):
        vae.ModelConfig(decoder_variance="fixed", fixed_sigma=1e-4, min_sigma=1e-3)
