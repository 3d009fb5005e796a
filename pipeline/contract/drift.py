"""Drift: does a new table come from the distribution a model was trained on?

Per feature column, two two-sample tests against the training table as the model's schema
stores it (moments and a quantile sketch, pipeline.contract.schema), each with an effect size so that a
large table does not fail on a shift too small to matter:
- location: the new mean minus the training mean in training standard deviations (Welch's t-test
  from the moments);
- shape: the Kolmogorov-Smirnov distance between the new values and the training sketch
  (asymptotic two-sample p-value).
A column drifts when an effect passes its limit (validate.drift_max_shift_std, drift_max_ks) and
the test is significant at validate.drift_alpha, Bonferroni over the columns.
A text column (modelled over its levels) has neither a mean nor an order: its level frequencies
are compared instead, by their total variation distance (limit validate.drift_max_ks, a distance
between distributions on the same [0, 1] scale) and the chi-square test of homogeneity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.config import ValidateParams
from pipeline.contract.columns import is_numeric_dtype
from pipeline.contract.schema import Schema, level_values

MIN_DRIFT_ROWS = 2  # a mean and a variance need two values
CHUNK_ROWS = 1 << 16  # rows per update step: bounds the temporaries of a whole-table update


@dataclass(frozen=True)
class Drift:
    column: str
    n_rows: int  # observed values in the new table
    shift_std: float  # new mean - training mean, in training standard deviations
    shift_p: float
    ks: float | None  # KS distance to the training sketch; None without a sketch
    ks_p: float | None
    drifted: bool
    levels_tv: float | None = None  # a text column: total variation distance of the level frequencies
    levels_p: float | None = None  # its chi-square p-value (homogeneity with the training counts)

    def describe(self) -> str:
        if self.levels_tv is not None:
            return f"level frequencies moved by total variation {self.levels_tv:.3f} (chi-square p={self.levels_p:.2g})"
        text = f"mean shifted {self.shift_std:+.2f} training sd (p={self.shift_p:.2g})"
        if self.ks is not None:
            text += f", KS distance {self.ks:.3f} (p={self.ks_p:.2g})"
        return text


def _shift(n: int, mean: float, sd: float, train_mean: float, train_sd: float, n_train: int) -> tuple[float, float]:
    if train_sd <= 0:  # a constant training column: any other value is a shift
        gap = mean - train_mean
        return (math.copysign(math.inf, gap), 0.0) if gap else (0.0, 1.0)
    p = _welch_p(mean, sd, n, train_mean, train_sd, max(n_train, 2))
    return float((mean - train_mean) / train_sd), p if math.isfinite(p) else 1.0


def _welch_p(mean1: float, sd1: float, n1: int, mean2: float, sd2: float, n2: int) -> float:
    """Two-sided p-value of Welch's t-test from the moments, computed as
    scipy.stats.ttest_ind_from_stats(..., equal_var=False) does (whose import alone takes a second)."""
    from scipy import special

    vn1, vn2 = np.asarray(sd1) ** 2 / n1, np.asarray(sd2) ** 2 / n2  # 0-d arrays, as scipy's: the same roundings
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (vn1 + vn2) ** 2 / (vn1**2 / (n1 - 1) + vn2**2 / (n2 - 1))
        t = np.divide(np.asarray(mean1) - np.asarray(mean2), np.sqrt(vn1 + vn2))
    df = np.where(np.isnan(df), 1.0, df)  # zero variances: any df
    return float(2 * special.stdtr(df, -np.abs(t)))


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

    A batch costs a few operations over all its columns at once (no loop over the columns): the
    feature columns as one (P, N) array, row sums for the moments, each row sorted in place and
    one batched searchsorted of the sketch points into the sorted rows for the counts. Float32
    columns stay float32: the sketch points are rounded outwards to float32 so that every
    comparison is the exact one in float64 (see _float32_bounds).
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        d = len(schema.features)
        self.cats = schema.categorical  # counted by level, not in the moments and sketch below
        self.level_counts = {j: np.zeros(len(schema.levels[j]), dtype=np.int64) for j in self.cats}
        self.n, self.mean, self.m2 = np.zeros(d, dtype=np.int64), np.zeros(d), np.zeros(d)
        points = [np.unique(np.asarray(q, dtype=np.float64)) for q in schema.quantiles]  # (U_j,)
        self.sizes = np.array([u.size for u in points], dtype=np.int64)  # U_j
        width = int(self.sizes.max()) if points else 0
        self.points = np.full((d, width), np.inf)  # (D, U): column j's U_j points, then +inf
        for j, u in enumerate(points):
            self.points[j, : u.size] = u
        self.below = np.zeros((d, width), dtype=np.int64)  # new values < points
        self.at_most = np.zeros((d, width), dtype=np.int64)  # new values <= points
        # (lower, upper) points by the dtype of the values: x < u iff x < lower, x <= u iff x <= upper
        self._bounds = {np.dtype(np.float64): (self.points, self.points),
                        np.dtype(np.float32): _float32_bounds(self.points)}
        self._kept: dict[np.dtype, np.ndarray] = {}  # by dtype, a chunk's values, sorted in place
        self._work = np.empty(0)  # float64 deviations of a chunk

    def update(self, df: pd.DataFrame, cells: torch.Tensor | None = None) -> None:
        """Add the observed values of df's feature columns (others, and missing columns, are ignored).

        cells: df's features as LoadedModel.features reads them, (N, D) float32 in the schema's
        order; read instead of df's columns where float32 holds those exactly (no second conversion).
        """
        every = np.arange(len(self.schema.features))
        if self.cats:
            self._count_levels(df, cells)
        exact = (not self.cats and cells is not None and cells.shape == (len(df), every.size)
                 and _all_exact_in_float32(df, self.schema))
        for start in range(0, len(df), CHUNK_ROWS):  # temporaries of one chunk, whatever df's size
            if exact and cells is not None:
                self._add(every, cells[start : start + CHUNK_ROWS].numpy().T)  # (D, n)
                continue
            cols, values = _feature_values(self.schema.features, df.iloc[start : start + CHUNK_ROWS], set(self.cats))
            if cols.size:
                self._add(cols, values)

    def _count_levels(self, df: pd.DataFrame, cells: torch.Tensor | None) -> None:
        """Add each text column's level counts: from the codes in cells, else from df's values
        (a value that is no level, or missing, is not counted)."""
        for j in self.cats:
            name, n = self.schema.features[j], len(self.schema.levels[j])
            if cells is not None and cells.shape == (len(df), len(self.schema.features)):
                codes = cells[:, j].numpy()
                codes = codes[~np.isnan(codes)].astype(np.int64)
            elif name in df.columns:
                codes = pd.Index(list(self.schema.levels[j])).get_indexer(level_values(df[name]))
                codes = codes[codes >= 0].astype(np.int64)
            else:
                continue
            self.level_counts[j] += np.bincount(codes, minlength=n)[:n]

    def _level_drift(self, j: int, params: ValidateParams, alpha: float) -> Drift | None:
        from scipy import special

        new = self.level_counts[j].astype(np.float64)
        n = int(new.sum())
        if n < MIN_DRIFT_ROWS or j >= len(self.schema.level_counts):
            return None
        train = np.asarray(self.schema.level_counts[j], dtype=np.float64)
        tv = float(0.5 * np.abs(new / n - train / train.sum()).sum())
        table = np.stack([train, new])  # 2 x L contingency table
        seen = table.sum(0) > 0
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        stat = float((((table - expected) ** 2)[:, seen] / expected[:, seen]).sum())
        p = float(special.chdtrc(max(int(seen.sum()) - 1, 1), stat))
        drifted = tv > params.drift_max_ks and p < alpha
        return Drift(self.schema.features[j], n, 0.0, 1.0, None, None, drifted, tv, p)

    def _add(self, cols: np.ndarray, chunk: np.ndarray) -> None:
        """chunk (P, n): the values of the features cols (read only: copied to a kept buffer)."""
        values = self._keep(chunk)
        count, total, observed = _observed_sums(values)
        mean = total / np.maximum(count, 1)
        work = self._deviations(values, mean)  # (P, n) float64
        if observed is not None:
            work[~observed] = 0.0
        self._merge(cols, count, mean, np.square(work, out=work).sum(axis=1))  # not BLAS: its threads spin
        if self.points.shape[1]:
            values.sort(axis=1)  # unobserved cells are +inf: last, above every sketch point
            lower, upper = (torch.from_numpy(np.ascontiguousarray(b[cols])) for b in self._bounds[values.dtype])
            rows = torch.from_numpy(values)
            self.below[cols] += torch.searchsorted(rows, lower).numpy()  # values < u
            self.at_most[cols] += torch.searchsorted(rows, upper, right=True).numpy()  # values <= u

    def _keep(self, chunk: np.ndarray) -> np.ndarray:
        """A copy of chunk in a buffer kept from chunk to chunk (a fresh array per chunk costs page faults)."""
        kept = self._kept.get(chunk.dtype)
        if kept is None or kept.size < chunk.size:
            kept = self._kept[chunk.dtype] = np.empty(chunk.size, dtype=chunk.dtype)
        values = kept[: chunk.size].reshape(chunk.shape)
        np.copyto(values, chunk)
        return values

    def _deviations(self, values: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """values - mean per row, in float64, in a buffer kept for the next chunk."""
        if self._work.size < values.size:
            self._work = np.empty(values.size)
        work = self._work[: values.size].reshape(values.shape)
        return np.subtract(values, mean[:, None], out=work, dtype=np.float64)

    def _merge(self, cols: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        seen = count > 0
        cols, count, mean, m2 = cols[seen], count[seen], mean[seen], m2[seen]
        n_old = self.n[cols]
        n = n_old + count
        delta = mean - self.mean[cols]
        self.m2[cols] += m2 + delta**2 * n_old * count / n
        self.mean[cols] += delta * count / n
        self.n[cols] = n

    def _ks(self, j: int) -> tuple[float, float]:
        from scipy import special

        n, size = int(self.n[j]), int(self.sizes[j])
        u = self.points[j, :size]
        cdf = _sketch_cdf(np.asarray(self.schema.quantiles[j], dtype=np.float64), u)  # at and right of u_k
        left = np.concatenate([[0.0], cdf[:-1]])  # just left of u_k
        below, at_most = self.below[j, :size], self.at_most[j, :size]
        d = float(max(np.max(np.abs(at_most / n - cdf)), np.max(np.abs(below / n - left))))
        en = math.sqrt(n * self.schema.n_rows / (n + self.schema.n_rows))
        return d, float(special.kolmogorov(en * d))  # scipy.stats.kstwobign.sf

    def drifts(self, params: ValidateParams) -> list[Drift]:
        """One Drift per feature with enough observed values."""
        alpha = params.drift_alpha / max(len(self.schema.features), 1)
        s, out = self.schema, []
        for j, name in enumerate(s.features):
            if j in self.level_counts:
                if (level := self._level_drift(j, params, alpha)) is not None:
                    out.append(level)
                continue
            n = int(self.n[j])
            if n < MIN_DRIFT_ROWS:
                continue
            sd = math.sqrt(self.m2[j] / (n - 1))
            shift, p_shift = _shift(n, float(self.mean[j]), sd, s.mean[j], s.std[j], s.n_rows)
            drifted = abs(shift) > params.drift_max_shift_std and p_shift < alpha
            ks = ks_p = None
            if self.points.shape[1]:
                ks, ks_p = self._ks(j)
                drifted = drifted or (ks > params.drift_max_ks and ks_p < alpha)
            out.append(Drift(name, n, shift, p_shift, ks, ks_p, drifted))
        return out


def _float32_bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) float32 for float64 points: for every float32 x, x < u exactly when
    x < lower (the least float32 >= u), and x <= u exactly when x <= upper (the greatest <= u)."""
    with np.errstate(over="ignore"):
        near = points.astype(np.float32)  # the nearest float32 (+-inf beyond float32's range)
        lower = np.where(near < points, np.nextafter(near, np.float32(np.inf)), near)
        upper = np.where(near > points, np.nextafter(near, np.float32(-np.inf)), near)
    return lower.astype(np.float32), upper.astype(np.float32)


def _exact_in_float32(dtype: object) -> bool:
    return isinstance(dtype, np.dtype) and (dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize <= 2)
                                            or (dtype.kind == "f" and dtype.itemsize <= 4))


def _all_exact_in_float32(df: pd.DataFrame, schema: Schema) -> bool:
    """Whether df has every feature column of schema, each of a dtype that float32 holds exactly."""
    if not set(schema.features) <= set(df.columns):
        return False
    return all(_exact_in_float32(t) for t in df.dtypes[list(schema.features)])


def _feature_values(features: Sequence[str], df: pd.DataFrame, skip: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the features present in df, but not in skip, their values (P, N), read only):
    float32 where every column converts to it exactly, else float64; NaN where missing or not a number."""
    have = set(df.columns)
    cols = np.array([j for j, name in enumerate(features) if name in have and j not in (skip or ())], dtype=np.int64)
    frame = df[[features[j] for j in cols]]
    text = [c for c, t in frame.dtypes.items() if not is_numeric_dtype(t)]
    if text:  # as pd.to_numeric(errors="coerce") reads them
        frame = frame.assign(**{str(c): pd.to_numeric(frame[c], errors="coerce") for c in text})
    dtype = np.float32 if all(_exact_in_float32(t) for t in frame.dtypes) else np.float64
    return cols, frame.to_numpy(dtype=dtype, na_value=np.nan).T  # pandas' blocks: (N, P) F-ordered


def _observed_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(count, sum) of each row's finite cells, and where they are (None: everywhere). The
    others (NaN, +-inf) are set to +inf in place: they sort after every sketch point."""
    total = values.sum(axis=1, dtype=np.float64)
    if np.isfinite(total).all():
        return np.full(values.shape[0], values.shape[1], dtype=np.int64), total, None
    observed = np.isfinite(values)
    values[~observed] = np.inf
    total = np.where(observed, values, 0.0).sum(axis=1, dtype=np.float64)
    return observed.sum(axis=1), total, observed


def column_drift(schema: Schema, df: pd.DataFrame, params: ValidateParams) -> list[Drift]:
    """One Drift per feature of schema present in df with enough observed values."""
    stats = DriftStats(schema)
    stats.update(df)
    return stats.drifts(params)


def drift_summary(drifts: Sequence[Drift]) -> str:
    """'a (+1.02 sd), b (-0.61 sd), c (levels TV 0.31)' for the drifted columns; '' when none drifted."""
    return ", ".join(f"{d.column!r} ({d.shift_std:+.2f} sd)" if d.levels_tv is None else
                     f"{d.column!r} (levels TV {d.levels_tv:.2f})" for d in drifts if d.drifted)
