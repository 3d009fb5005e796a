"""Drift: does a new table come from the distribution a model was trained on?

Per feature column, two two-sample tests against the training table as the model's schema
stores it (moments and a quantile sketch, pipeline.schema), each with an effect size so that a
large table does not fail on a shift too small to matter:
- location: the new mean minus the training mean in training standard deviations (Welch's t-test
  from the moments);
- shape: the Kolmogorov-Smirnov distance between the new values and the training sketch
  (asymptotic two-sample p-value).
A column drifts when an effect passes its limit (validate.drift_max_shift_std, drift_max_ks) and
the test is significant at validate.drift_alpha, Bonferroni over the columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import ValidateParams
from pipeline.schema import Schema

MIN_DRIFT_ROWS = 2  # a mean and a variance need two values


@dataclass(frozen=True)
class Drift:
    column: str
    n_rows: int  # observed values in the new table
    shift_std: float  # new mean - training mean, in training standard deviations
    shift_p: float
    ks: float | None  # KS distance to the training sketch; None without a sketch
    ks_p: float | None
    drifted: bool

    def describe(self) -> str:
        text = f"mean shifted {self.shift_std:+.2f} training sd (p={self.shift_p:.2g})"
        if self.ks is not None:
            text += f", KS distance {self.ks:.3f} (p={self.ks_p:.2g})"
        return text


def _shift(n: int, mean: float, sd: float, train_mean: float, train_sd: float, n_train: int) -> tuple[float, float]:
    from scipy import stats

    if train_sd <= 0:  # a constant training column: any other value is a shift
        gap = mean - train_mean
        return (math.copysign(math.inf, gap), 0.0) if gap else (0.0, 1.0)
    t = stats.ttest_ind_from_stats(mean, sd, n, train_mean, train_sd, max(n_train, 2), equal_var=False)
    p = float(t.pvalue) if math.isfinite(t.pvalue) else 1.0
    return float((mean - train_mean) / train_sd), p


def _sketch_cdf(quantiles: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The training CDF at points from its quantile sketch, right-continuous (ties count fully)."""
    below = np.searchsorted(quantiles, points, side="right")  # sketch points <= x
    return np.clip((below - 1) / (quantiles.size - 1), 0.0, 1.0)


class DriftStats:
    """What drift needs of a table, per feature, accumulated over row batches in bounded memory.

    The count, mean and sum of squared deviations (merged as Chan, Golub & LeVeque 1979), and, at
    each distinct point u of the training sketch, the counts of new values < u and <= u. The
    sketch's CDF is a step function that only moves at those points, so the KS distance from
    these counts equals the one over all the new values.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        d = len(schema.features)
        self.n, self.mean, self.m2 = np.zeros(d, dtype=np.int64), np.zeros(d), np.zeros(d)
        self.points = [np.unique(np.asarray(q, dtype=np.float64)) for q in schema.quantiles]  # (U_j,)
        self.below = [np.zeros(u.size, dtype=np.int64) for u in self.points]
        self.at_most = [np.zeros(u.size, dtype=np.int64) for u in self.points]

    def update(self, df: pd.DataFrame) -> None:
        """Add the observed values of df's feature columns (others, and missing columns, are ignored)."""
        for j, name in enumerate(self.schema.features):
            if name not in df.columns:
                continue
            x = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            x = np.sort(x[np.isfinite(x)])
            if not x.size:
                continue
            n, mean = self.n[j] + x.size, float(x.mean())
            delta = mean - self.mean[j]
            self.m2[j] += float(((x - mean) ** 2).sum()) + delta**2 * self.n[j] * x.size / n
            self.mean[j] += delta * x.size / n
            self.n[j] = n
            if self.points:
                self.below[j] += np.searchsorted(x, self.points[j], side="left")
                self.at_most[j] += np.searchsorted(x, self.points[j], side="right")

    def _ks(self, j: int) -> tuple[float, float]:
        from scipy import stats

        n, u = int(self.n[j]), self.points[j]
        cdf = _sketch_cdf(np.asarray(self.schema.quantiles[j], dtype=np.float64), u)  # at and right of u_k
        left = np.concatenate([[0.0], cdf[:-1]])  # just left of u_k
        d = float(max(np.max(np.abs(self.at_most[j] / n - cdf)), np.max(np.abs(self.below[j] / n - left))))
        en = math.sqrt(n * self.schema.n_rows / (n + self.schema.n_rows))
        return d, float(stats.kstwobign.sf(en * d))

    def drifts(self, params: ValidateParams) -> list[Drift]:
        """One Drift per feature with enough observed values."""
        alpha = params.drift_alpha / max(len(self.schema.features), 1)
        s, out = self.schema, []
        for j, name in enumerate(s.features):
            n = int(self.n[j])
            if n < MIN_DRIFT_ROWS:
                continue
            sd = math.sqrt(self.m2[j] / (n - 1))
            shift, p_shift = _shift(n, float(self.mean[j]), sd, s.mean[j], s.std[j], s.n_rows)
            drifted = abs(shift) > params.drift_max_shift_std and p_shift < alpha
            ks = ks_p = None
            if self.points:
                ks, ks_p = self._ks(j)
                drifted = drifted or (ks > params.drift_max_ks and ks_p < alpha)
            out.append(Drift(name, n, shift, p_shift, ks, ks_p, drifted))
        return out


def column_drift(schema: Schema, df: pd.DataFrame, params: ValidateParams) -> list[Drift]:
    """One Drift per feature of schema present in df with enough observed values."""
    stats = DriftStats(schema)
    stats.update(df)
    return stats.drifts(params)


def drift_summary(drifts: Sequence[Drift]) -> str:
    """'a (+1.02 sd), b (-0.61 sd)' for the drifted columns; '' when none drifted."""
    return ", ".join(f"{d.column!r} ({d.shift_std:+.2f} sd)" for d in drifts if d.drifted)
