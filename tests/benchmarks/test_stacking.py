"""benchmarks/stacking.py: the stack's weights maximize the held-out log-likelihood over the simplex
(EM, against the weights that drew the rows and against a grid of the simplex), and the stack's
log-density is log sum_i w_i p_i."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from benchmarks.stacking import em_weights, slice_positions, stack_log_p


def _two_gaussians(n: int, share: float, seed: int) -> np.ndarray:
    """log-densities (n, 3) of rows drawn from share * N(-2, 1) + (1 - share) * N(2, 1) under each
    of the two Gaussians and under a third component that has no mass anywhere (-inf)."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < share, rng.normal(-2, 1, n), rng.normal(2, 1, n))
    return np.column_stack([norm.logpdf(y, -2, 1), norm.logpdf(y, 2, 1), np.full(n, -np.inf)])


def test_em_finds_the_weights_that_drew_the_rows():
    w = em_weights(_two_gaussians(20_000, 0.3, seed=0))
    assert abs(w[0] - 0.3) < 0.015 and abs(w[1] - 0.7) < 0.015  # sd of the share: 0.003
    assert w[2] == 0.0 and abs(w.sum() - 1) < 1e-12


def test_em_weights_beat_every_point_of_a_simplex_grid():
    y = np.random.default_rng(1).standard_t(3, 500)  # none of the three: an interior optimum
    log_p = np.column_stack([norm.logpdf(y, -1, 1), norm.logpdf(y, 1, 1), norm.logpdf(y, 0, 3)])
    best = stack_log_p(log_p, em_weights(log_p)).sum()
    grid = [np.array([a, b, 1 - a - b]) for a in np.linspace(0, 1, 21) for b in np.linspace(0, 1 - a, 21)]
    assert all(stack_log_p(log_p, g).sum() <= best + 1e-6 for g in grid)


def test_the_stack_of_one_component_is_that_component():
    log_p = _two_gaussians(50, 0.5, seed=2)
    np.testing.assert_allclose(stack_log_p(log_p, np.array([0.0, 1.0, 0.0])), log_p[:, 1])
    np.testing.assert_allclose(stack_log_p(log_p[:, [0, 0]], np.array([0.4, 0.6])), log_p[:, 0])


def test_the_slice_is_seeded_and_a_share_of_the_rows():
    a, b = slice_positions(1000, 0.15, seed=0), slice_positions(1000, 0.15, seed=0)
    assert len(a) == 150 and len(np.unique(a)) == 150 and np.array_equal(a, b)
    assert not np.array_equal(a, slice_positions(1000, 0.15, seed=1))
