"""What the model knows of its table: column names, likelihood per column, scaling and range."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from vae.config import Likelihood, MissingPolicy, check_choice
from vae.errors import ConfigError, DataError

ColumnKind = Literal["gaussian", "bernoulli", "categorical"]
Level = str | int


@dataclass(frozen=True)
class TableSpec:
    names: tuple[str, ...]
    kinds: tuple[ColumnKind, ...]
    loc: tuple[float, ...]  # subtracted before the networks: column mean, or 0 (binary)
    scale: tuple[float, ...]  # divides after loc: column std, or 1 (binary)
    minimum: tuple[float, ...]  # training range, observed cells only
    maximum: tuple[float, ...]
    missing: MissingPolicy = "reject"
    # data.standardize: the decoder noise is learned on the standardized scale (True) or in the
    # table's units (False); the networks see standardized cells either way
    standardized: bool = True
    # the resolution each Gaussian column was recorded at (original units; 0 where none shows, for
    # binary columns and for a column the earlier ones determine, () for models saved before it was
    # kept): the decoder's noise never claims a value more precisely than it was recorded (see
    # recording_step, determined_by_earlier, vae.model.resolution_floor)
    resolution: tuple[float, ...] = ()
    # the levels of each categorical column in code order (its cells hold the code 0..L-1 as a
    # float), () for the other columns; () for models saved before categorical columns existed
    levels: tuple[tuple[Level, ...], ...] = ()
    # model.log_columns: the Gaussian columns modelled as log y (loc, scale and resolution are then
    # those of log y; the density keeps the Jacobian -log y); () for none
    log: tuple[bool, ...] = ()
    # the recorded grid, for sampling on it (original units): a column with at most MAX_SUPPORT
    # distinct values keeps them (`support`), one on a wider grid its step (`lattice`, the values
    # from minimum to maximum); () / 0.0 for continuous columns; () for models saved before
    support: tuple[tuple[float, ...], ...] = ()
    lattice: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for key in ("levels", "support"):
            object.__setattr__(self, key, tuple(tuple(v) for v in getattr(self, key)))

    @property
    def n_features(self) -> int:
        return len(self.names)

    def levels_of(self, j: int) -> tuple[Level, ...]:
        """The levels of column j (() unless categorical)."""
        return self.levels[j] if j < len(self.levels) else ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a table without categorical columns leaves `levels` out (as saved before it existed)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for key in ("levels", "support"):
            d[key] = [list(v) for v in getattr(self, key)]
        for key in ("levels", "log", "support", "lattice"):  # keys added later: left out when unused
            if not any(getattr(self, key)):
                del d[key]
        return d

    def is_log(self, j: int) -> bool:
        return j < len(self.log) and self.log[j]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSpec:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


def _name(names: Sequence[str], j: int) -> str:
    return repr(names[j])


def check_values(y: torch.Tensor, names: Sequence[str], missing: MissingPolicy) -> None:
    """Refuse non-finite cells; NaN is allowed only with the mask policy."""
    if y.ndim != 2:
        raise DataError(f"expected a 2-D table (rows, columns), got shape {tuple(y.shape)}")
    if y.shape[1] != len(names):
        raise DataError(f"the table has {y.shape[1]} columns but the model expects {len(names)}")
    bad = torch.isinf(y) if missing == "mask" else ~torch.isfinite(y)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        value = float(y[row, col])
        hint = "" if missing == "mask" or value == value else " (set data.missing: mask to model missing cells)"
        raise DataError(f"column {_name(names, col)} row {row} holds {value}; values must be finite{hint}")


def recording_step(col: torch.Tensor) -> float:
    """The resolution a column was recorded at (float64, observed cells), 0 if none shows.

    A column whose values repeat was recorded on a finite grid (rounded, counted, a few levels):
    its resolution is the smallest gap between distinct values (1 for integers, 0.01 for two
    decimals, the closest two levels). A column of all-distinct values shows none: 0.
    """
    values = torch.unique(col)
    if values.numel() == col.numel():
        return 0.0
    gaps = values.diff()
    tol = 1e-9 * float(values.abs().max())  # values that differ by float noise are one value
    gaps = gaps[gaps > tol]
    return float(gaps.min()) if gaps.numel() else 0.0


MAX_SUPPORT = 64  # a column with at most this many distinct values is sampled on them
MIN_LOG_GAIN = 0.005  # nats per validation row a log scale must add to be chosen (log is ~linear far from 0)
MAX_JOINT_LOG_CHOICE = 100  # model.log_columns auto: columns chosen jointly (full Gaussian) up to this width
LogColumns = Literal["auto", "none"] | Sequence[str]


def check_log_domain(y: torch.Tensor, spec: TableSpec, first_row: int = 0) -> None:
    """A column modelled on the log scale takes values > 0 only: the first other is named (its
    row counted from first_row)."""
    for j in (j for j in range(spec.n_features) if spec.is_log(j)):
        col = y[:, j]
        bad = col <= 0
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise DataError(f"column {spec.names[j]!r} row {first_row + row} holds {float(col[row])}; the model takes its log "
                            "(model.log_columns), so its values must be > 0")


def _full_gauss_val(train: torch.Tensor, val: torch.Tensor, logs: Sequence[int]) -> float:
    """Validation log-likelihood (sum over rows, table units) of the full Gaussian fitted on
    train, with the columns logs on the log scale (Jacobian -log y)."""
    t, v = train.clone(), val.clone()
    idx = list(logs)
    jacobian = float(val[:, idx].log().sum()) if idx else 0.0
    if idx:
        t[:, idx], v[:, idx] = t[:, idx].log(), v[:, idx].log()
    mean = t.mean(0)
    cov = torch.cov(t.T, correction=0).reshape(t.shape[1], t.shape[1])
    cov = cov + 1e-9 * torch.diag(cov.diagonal().clamp_min(1e-300))
    tril, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return -math.inf
    u = torch.linalg.solve_triangular(tril, (v - mean).T, upper=False)
    ll = -0.5 * u.pow(2).sum(0) - tril.diagonal().log().sum() - 0.5 * t.shape[1] * math.log(2 * math.pi)
    return float(ll.sum()) - jacobian


def choose_log_columns(y: torch.Tensor, candidates: Sequence[int], columns: Sequence[int], seed: int = 0,
                       val_fraction: float = 0.2) -> list[int]:
    """model.log_columns auto: the candidate columns (strictly positive) whose log scale raises the
    validation log-likelihood of the full Gaussian over columns (the Gaussian ones; a seeded split
    of the complete rows) by MIN_LOG_GAIN nats per row at least: from none or all of them, whichever
    scores higher, each column's scale toggled in table order and kept where it helps.
    Tables wider than MAX_JOINT_LOG_CHOICE compare each column's own Gaussian instead."""
    if not candidates:
        return []
    data = y[:, list(columns)]
    data = data[~torch.isnan(data).any(1)]
    n_val = max(1, round(data.shape[0] * val_fraction))
    if data.shape[0] - n_val <= len(columns) + 1:
        return []
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    train, val = data[perm[n_val:]], data[perm[:n_val]]
    pos = {c: i for i, c in enumerate(columns)}
    gain = MIN_LOG_GAIN * n_val
    if len(columns) > MAX_JOINT_LOG_CHOICE:
        return [j for j in candidates if _full_gauss_val(train[:, [pos[j]]], val[:, [pos[j]]], [0])
                > _full_gauss_val(train[:, [pos[j]]], val[:, [pos[j]]], []) + gain]
    # related columns move together (radius, perimeter and area are linear in each other only on
    # the log scale): start from none or all, whichever scores higher, then toggle each column
    everything = list(candidates)
    none_score, all_score = _full_gauss_val(train, val, []), _full_gauss_val(train, val, [pos[c] for c in everything])
    chosen, best = (everything, all_score) if all_score > none_score + gain else ([], none_score)
    for j in candidates:
        trial = [c for c in chosen if c != j] if j in chosen else sorted([*chosen, j])
        score = _full_gauss_val(train, val, [pos[c] for c in trial])
        # adding a log must gain; dropping one must not lose (a log is kept only where it pays)
        if (j not in chosen and score > best + gain) or (j in chosen and score >= best - gain):
            chosen, best = trial, score
    return sorted(chosen)


_BLOCK_ROWS = 65536  # determined_by_earlier's passes: bounded extra memory whatever the table's size


def determined_by_earlier(y: torch.Tensor, step: Sequence[float]) -> list[bool]:
    """For each column of y (float64; the Gaussian columns, in table order) with a step: does
    the least-squares prediction from the columns before it recover every training value to
    within half a step (complete rows)?

    Such a column (date = year + (month - 1) / 12 after year and month, a total after its parts)
    is a function of the others, not a reading with a rounding error of its own: the full
    Gaussian, factored in table order like the decoder's noise, holds it tighter than its grid,
    and so may the model. Residuals from the Cholesky factor of the standardized covariance
    (r = L_jj (L^-1 x)_j), with a ridge for exact relations: O(N D^2), in row blocks.
    """
    out = [False] * len(step)
    complete = ~torch.isnan(y).any(1)
    n, d = int(complete.sum()), y.shape[1]
    if not any(h > 0 for h in step[1:]) or n <= d:
        return out

    def blocks() -> Iterator[torch.Tensor]:
        for i in range(0, y.shape[0], _BLOCK_ROWS):
            yield y[i : i + _BLOCK_ROWS][complete[i : i + _BLOCK_ROWS]]

    zero = torch.zeros(d, dtype=y.dtype)
    mean = sum((b.sum(0) for b in blocks()), zero) / n
    std = (sum(((b - mean).pow(2).sum(0) for b in blocks()), zero) / n).sqrt()
    cov = sum((((b - mean) / std).T @ ((b - mean) / std) for b in blocks()), torch.zeros(d, d, dtype=y.dtype)) / n
    tril = torch.linalg.cholesky(cov + 1e-10 * torch.eye(d, dtype=y.dtype))
    worst = torch.zeros(d, dtype=y.dtype)
    for b in blocks():
        u = torch.linalg.solve_triangular(tril, ((b - mean) / std).T, upper=False)  # (D, rows)
        worst = torch.maximum(worst, u.abs().amax(1))
    worst = worst * tril.diagonal() * std
    for j in range(1, len(step)):
        out[j] = step[j] > 0 and bool(worst[j] < 0.5 * step[j])
    return out


def describe_table(
    y: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    likelihood: Likelihood = "auto",
    standardize: bool = True,
    missing: MissingPolicy = "reject",
    levels: Sequence[Sequence[Level]] | None = None,
    log_columns: LogColumns = "none",
    seed: int = 0,
) -> TableSpec:
    """Inspect a training table (rows, features) and fix the per-column choices.

    levels: per column, the levels of a categorical column (whose cells hold codes 0..L-1) or
    () for a numeric one; None: every column numeric.
    """
    names = [f"x{j}" for j in range(y.shape[-1])] if names is None else list(names)
    check_choice("model", "likelihood", likelihood, Likelihood)  # a typo would silently pick a branch
    check_choice("data", "missing", missing, MissingPolicy)
    if isinstance(log_columns, str) and log_columns not in ("none", "auto"):
        raise ConfigError(f"model.log_columns is {log_columns!r}; choose auto, none or a list of column names")
    check_values(y, names, missing)
    if not isinstance(log_columns, str):
        unknown = [c for c in log_columns if c not in names]
        if unknown:
            raise DataError(f"model.log_columns names {unknown[0]!r}, which is not a feature column")
    cats = [tuple(v) for v in levels] if levels is not None else [()] * len(names)
    if len(cats) != len(names):
        raise DataError(f"levels are given for {len(cats)} columns but the table has {len(names)}")
    if y.shape[0] < 2:
        raise DataError(f"the table has {y.shape[0]} rows; at least 2 are needed")
    y64 = y.detach().to("cpu", torch.float64)
    observed = ~torch.isnan(y64)
    kinds: list[ColumnKind] = []
    loc, scale, lo, hi, step = [], [], [], [], []
    for j, name in enumerate(names):
        col = y64[observed[:, j], j]
        if col.numel() == 0:
            raise DataError(f"column {name!r} has no observed value")
        if cats[j]:
            _check_codes(col, y64[:, j], name, len(cats[j]))
            kinds.append("categorical")
            loc.append(0.0)
            scale.append(1.0)
            lo.append(0.0)
            hi.append(float(len(cats[j]) - 1))
            step.append(0.0)
            continue
        mean, std = float(col.mean()), float(col.std(unbiased=False))
        if std == 0.0:
            raise DataError(f"column {name!r} is constant ({float(col[0])}); drop it from the table")
        binary = bool(((col == 0) | (col == 1)).all())
        if likelihood == "bernoulli" and not binary:
            bad = int(torch.nonzero((y64[:, j] != 0) & (y64[:, j] != 1) & observed[:, j])[0])
            raise DataError(
                f"column {name!r} row {bad} holds {float(y64[bad, j])}; model.likelihood: bernoulli "
                "needs 0/1 values (use auto to pick per column)"
            )
        kind: ColumnKind = "bernoulli" if likelihood == "bernoulli" or (likelihood == "auto" and binary) else "gaussian"
        kinds.append(kind)
        loc.append(mean if kind == "gaussian" else 0.0)
        scale.append(std if kind == "gaussian" else 1.0)
        lo.append(float(col.min()))
        hi.append(float(col.max()))
        step.append(recording_step(col) if kind == "gaussian" else 0.0)
    gauss = [j for j, k in enumerate(kinds) if k == "gaussian"]
    positive = [j for j in gauss if lo[j] > 0]
    if log_columns == "auto":
        logs = choose_log_columns(y64, positive, gauss, seed)
    elif log_columns == "none":
        logs = []
    else:
        logs = [names.index(c) for c in log_columns]
        for j in logs:
            if kinds[j] != "gaussian":
                raise DataError(f"model.log_columns names {names[j]!r}, a {kinds[j]} column; only real-valued columns take a log scale")
            if lo[j] <= 0:
                row = int(torch.nonzero(y64[:, j] <= 0)[0])
                raise DataError(f"column {names[j]!r} row {row} holds {float(y64[row, j])}; model.log_columns needs "
                                "values > 0 (use auto to pick the columns where it fits)")
    grid = [step[j] for j in range(len(names))]  # original units, before a log scale changes step
    support = [tuple(float(v) for v in torch.unique(y64[observed[:, j], j]))
               if kinds[j] == "gaussian" and grid[j] > 0 and
               torch.unique(y64[observed[:, j], j]).numel() <= MAX_SUPPORT else () for j in range(len(names))]
    lattice = [grid[j] if grid[j] > 0 and not support[j] and _on_lattice(y64[observed[:, j], j], grid[j]) else 0.0
               for j in range(len(names))]
    t64 = y64.clone()
    for j in logs:
        col = y64[observed[:, j], j].log()
        t64[:, j] = y64[:, j].log()
        loc[j], scale[j], step[j] = float(col.mean()), float(col.std(unbiased=False)), recording_step(col)
    for j, det in zip(gauss, determined_by_earlier(t64[:, gauss], [step[j] for j in gauss]), strict=True):
        step[j] = 0.0 if det else step[j]
    return TableSpec(tuple(names), tuple(kinds), tuple(loc), tuple(scale), tuple(lo), tuple(hi), missing, standardize,
                     tuple(step), tuple(cats) if any(cats) else (),
                     tuple(j in logs for j in range(len(names))) if logs else (),
                     tuple(support) if any(support) else (), tuple(lattice) if any(lattice) else ())


def _on_lattice(col: torch.Tensor, step: float) -> bool:
    """Whether every value is the least one plus a whole number of steps (counts, rounded readings)."""
    k = (col - col.min()) / step
    return bool(((k - k.round()).abs() < 1e-6).all())


def _check_codes(observed: torch.Tensor, column: torch.Tensor, name: str, n_levels: int) -> None:
    """A categorical column's observed cells are codes 0..n_levels-1, and more than one of them."""
    bad = ~torch.isnan(column) & ((column != column.round()) | (column < 0) | (column >= n_levels))
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise DataError(f"column {name!r} row {row} holds {float(column[row])}, not a level code 0..{n_levels - 1}")
    if int(torch.unique(observed).numel()) < 2:
        raise DataError(f"column {name!r} holds one level only; drop it from the table")
