"""What the model knows of its table: column names, likelihood per column, scaling and range."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from vae.config import Likelihood, MissingPolicy
from vae.errors import DataError

ColumnKind = Literal["gaussian", "bernoulli"]


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
    # the resolution each Gaussian column was recorded at (original units; 0 where none shows and
    # for binary columns, () for models saved before it was kept): the decoder's noise never
    # claims a value more precisely than it was recorded (see recording_step, vae.model.resolution_floor)
    resolution: tuple[float, ...] = ()

    @property
    def n_features(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

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


def describe_table(
    y: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    likelihood: Likelihood = "auto",
    standardize: bool = True,
    missing: MissingPolicy = "reject",
) -> TableSpec:
    """Inspect a training table (rows, features) and fix the per-column choices."""
    names = [f"x{j}" for j in range(y.shape[-1])] if names is None else list(names)
    check_values(y, names, missing)
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
    return TableSpec(tuple(names), tuple(kinds), tuple(loc), tuple(scale), tuple(lo), tuple(hi), missing, standardize,
                     tuple(step))
