"""The affine VAE with a shared variance is probabilistic PCA: its trained held-out likelihood must
reach the closed-form maximum-likelihood pPCA (Tipping & Bishop 1999), in original units."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

import vae
from tests.vae.closed_form import affine_vae_loglik, ppca_heldout_loglik

KS = (1, 10, 100, 1000)


def _loose_posterior(model: vae.VAE) -> vae.VAE:
    """A copy whose q(z|y) is e times too wide: IWAE_K then rises visibly with K."""
    loose = copy.deepcopy(model)
    with torch.no_grad():
        loose.encoder.net[0].bias[model.latent_dim :] += 1.0
    return loose


@dataclass(frozen=True)
class Estimate:
    elbo: float
    log_likelihood: float  # IWAE_K
    stderr: float  # its Monte Carlo error
    gap_stderr: float  # the Monte Carlo error of log_likelihood - elbo


def _estimates(model: vae.VAE, y: torch.Tensor) -> dict[int, Estimate]:
    """IWAE_K for each K. Its reported stderr is 0 at K = 1 (no spread within one sample), so
    there the estimate is the mean of 8 seeds and the error their spread over sqrt(8). At K = 1
    IWAE is itself an estimate of the ELBO (log w of one draw against the draw's reconstruction
    minus the analytic KL): their gap is judged by the spread of the paired differences; at larger
    K by IWAE's error (the ELBO's, from K draws, is far smaller)."""
    out = {}
    for k in KS:
        evs = [vae.evaluate(model, y, iw_samples=k, seed=s) for s in (range(8) if k == 1 else [0])]
        lls = torch.tensor([e.log_likelihood for e in evs], dtype=torch.float64)
        gaps = lls - torch.tensor([e.elbo for e in evs], dtype=torch.float64)
        se = float(lls.std() / math.sqrt(len(evs))) if k == 1 else evs[0].log_likelihood_stderr
        gap_se = float(gaps.std() / math.sqrt(len(evs))) if k == 1 else se
        out[k] = Estimate(sum(e.elbo for e in evs) / len(evs), float(lls.mean()), se, gap_se)
    return out


@pytest.fixture(scope="module")
def plain_estimates(ppca_plain) -> dict[int, Estimate]:
    return _estimates(ppca_plain.model, ppca_plain.test)


@pytest.fixture(scope="module")
def loose_estimates(ppca_plain) -> dict[int, Estimate]:
    return _estimates(_loose_posterior(ppca_plain.model), ppca_plain.test)


def test_affine_vae_reaches_ppca_mle_without_standardization(ppca_plain, plain_estimates):
    closed = ppca_heldout_loglik(ppca_plain.train, ppca_plain.test, ppca_plain.k, standardize=False)
    got = plain_estimates[1000].log_likelihood
    assert got == pytest.approx(closed, abs=0.05), (got, closed)


def test_affine_vae_reaches_ppca_mle_with_standardization_in_original_units(ppca_scaled):
    fit = ppca_scaled
    assert max(fit.model.spec.scale) / min(fit.model.spec.scale) > 1e4  # units far apart
    closed = ppca_heldout_loglik(fit.train, fit.test, fit.k, standardize=True)
    got = vae.evaluate(fit.model, fit.test, iw_samples=1000, seed=0).log_likelihood
    assert got == pytest.approx(closed, abs=0.05), (got, closed)
    # the standardized-scale figure differs by the Jacobian, sum_j log s_j: far more than 0.05
    jacobian = sum(math.log(s) for s in fit.model.spec.scale)
    assert abs(jacobian) > 1.0


@pytest.mark.parametrize("posterior", ["trained", "loose"])
def test_iwae_estimates_the_models_exact_marginal(ppca_plain, ppca_scaled, posterior):
    """The decoder of the affine VAE is a pPCA model with exact log p(y); IWAE_1000 must find it
    whatever q is (Burda et al. 2016), and ELBO must stay below it."""
    for fit in (ppca_plain, ppca_scaled):
        model = fit.model if posterior == "trained" else _loose_posterior(fit.model)
        exact = float(affine_vae_loglik(model, fit.test).mean())
        ev = vae.evaluate(model, fit.test, iw_samples=1000, seed=1)
        assert abs(ev.log_likelihood - exact) < 4 * ev.log_likelihood_stderr + 2e-3, (ev, exact)
        assert ev.elbo < exact + 1e-3


def test_elbo_below_iwae_and_iwae_non_decreasing_in_k(plain_estimates, loose_estimates):
    for est in (plain_estimates, loose_estimates):
        for k in KS:
            assert est[k].elbo <= est[k].log_likelihood + 3 * est[k].gap_stderr + 1e-3, (k, est[k])
        for k_small, k_big in zip(KS[:-1], KS[1:], strict=True):
            small, big = est[k_small], est[k_big]
            err = math.hypot(small.stderr, big.stderr)
            assert big.log_likelihood >= small.log_likelihood - 3 * err - 1e-3, (k_small, k_big)
    # with a poor q the bound tightens visibly with K (fails if IWAE were the plain ELBO average)
    est = loose_estimates
    for k_small, k_big in ((1, 10), (10, 100)):
        err = math.hypot(est[k_small].stderr, est[k_big].stderr)
        assert est[k_big].log_likelihood - est[k_small].log_likelihood > 5 * err, (k_small, k_big)
    assert est[1000].log_likelihood - est[1000].elbo > 0.3


def test_stderr_is_the_monte_carlo_error_of_the_estimate(ppca_plain):
    loose = _loose_posterior(ppca_plain.model)
    replicas = [vae.evaluate(loose, ppca_plain.test, iw_samples=10, seed=s) for s in range(8)]
    values = torch.tensor([r.log_likelihood for r in replicas], dtype=torch.float64)
    reported = sum(r.log_likelihood_stderr for r in replicas) / len(replicas)
    # the spread of estimates over seeds is what the stderr claims (8 replicas: +-25 % noise)
    assert 0.4 < float(values.std()) / reported < 2.5, (values, reported)
    # it shrinks like 1/sqrt(K)
    big = vae.evaluate(loose, ppca_plain.test, iw_samples=1000, seed=0).log_likelihood_stderr
    assert 5 < reported / big < 20, (reported, big)
    # and it is not the spread of the rows' log-likelihoods
    rows = vae.score_rows(loose, ppca_plain.test, iw_samples=10, seed=0).log_likelihood
    assert reported < 0.2 * float(rows.std()) / math.sqrt(rows.numel())


def test_without_standardization_any_units_reach_raw_unit_ppca(ppca_raw_wide):
    """Columns from 1e-2 to 1e3 in raw units: the encoder sees scaled cells (a reparameterization
    of q), the noise stays isotropic in the table's units (p(y) is raw-unit pPCA), no divergence."""
    fit = ppca_raw_wide
    assert max(fit.model.spec.scale) / min(fit.model.spec.scale) > 1e4
    closed = ppca_heldout_loglik(fit.train, fit.test, fit.k, standardize=False)
    got = vae.evaluate(fit.model, fit.test, iw_samples=1000, seed=0).log_likelihood
    assert got == pytest.approx(closed, abs=0.05), (got, closed)
    # and it is not the standardized model's optimum, which differs by far more than 0.05 here
    assert abs(ppca_heldout_loglik(fit.train, fit.test, fit.k, standardize=True) - closed) > 1.0
