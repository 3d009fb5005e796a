"""The table contract a model carries: ordered features, dtypes, moments, range and their hash."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.tables import is_numeric_dtype, split_features


def _names(cols: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(str(c)) for c in cols[:limit])
    return shown + (f", ... ({len(cols) - limit} more)" if len(cols) > limit else "")


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


SKETCH_LEVELS = 65  # quantiles 0, 1/64, ..., 1 per feature: the training distribution for drift


def quantile_sketch(values: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """Per column of values (N, D), its SKETCH_LEVELS quantiles over observed cells."""
    levels = np.linspace(0.0, 1.0, SKETCH_LEVELS)
    return tuple(
        tuple(float(v) for v in np.quantile(col[~np.isnan(col)], levels)) for col in values.T
    )


def _digest(body: dict[str, Any]) -> str:
    # sort_keys and fixed separators make the text canonical; floats print with repr (round trip)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _listed(v: Any) -> Any:
    return [_listed(x) for x in v] if isinstance(v, tuple | list) else v


@dataclass(frozen=True)
class Schema:
    features: tuple[str, ...]
    dtypes: tuple[str, ...]
    id_columns: tuple[str, ...]
    mean: tuple[float, ...]  # population moments and range over observed (non-NaN) cells
    std: tuple[float, ...]
    minimum: tuple[float, ...]
    maximum: tuple[float, ...]
    n_rows: int
    # quantile_sketch of the training table; () in models trained before it existed (their hash
    # then leaves it out, so they still load)
    quantiles: tuple[tuple[float, ...], ...] = ()
    hash: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        if not self.hash:
            object.__setattr__(self, "hash", _digest(self._body()))

    def _body(self) -> dict[str, Any]:
        body = {k: _listed(v) for k, v in asdict(self).items() if k != "hash"}
        if not self.quantiles:
            del body["quantiles"]
        return body

    @classmethod
    def from_frame(
        cls, df: pd.DataFrame, id_columns: Sequence[str] = (), where: str = "table"
    ) -> Schema:
        """Describe a training table: every column but the id columns is a numeric feature."""
        _, features = split_features(df, id_columns, where)
        values = features.to_numpy(dtype=np.float64, na_value=np.nan)  # (N, D)
        observed = ~np.isnan(values)
        empty = [
            c for c, seen in zip(features.columns, observed.any(axis=0), strict=True) if not seen
        ]
        if empty:
            raise PipelineError(f"{where}: column {_names(empty)} has no observed value")
        return cls(
            features=tuple(str(c) for c in features.columns),
            dtypes=tuple(str(df[c].dtype) for c in features.columns),
            id_columns=tuple(id_columns),
            mean=tuple(float(v) for v in np.nanmean(values, axis=0)),
            std=tuple(float(v) for v in np.nanstd(values, axis=0)),
            minimum=tuple(float(v) for v in np.nanmin(values, axis=0)),
            maximum=tuple(float(v) for v in np.nanmax(values, axis=0)),
            n_rows=int(len(df)),
            quantiles=quantile_sketch(values),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self._body(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "schema") -> Schema:
        """Rebuild a stored schema; a hash that does not match its content is refused."""
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, names - set(d) - {"quantiles"}
        if unknown or missing:
            raise PipelineError(
                f"{where}: not a schema (missing keys {sorted(missing)}, unknown keys {sorted(unknown)})"
            )
        schema = cls(**{**d, "hash": ""})
        if schema.hash != d["hash"]:
            raise PipelineError(
                f"{where}: the schema's hash does not match its content "
                f"(stored {str(d['hash'])[:12]}..., computed {schema.hash[:12]}...); "
                "the model directory was edited or is corrupt: retrain or restore it"
            )
        return schema

    def problems(self, df: pd.DataFrame) -> list[str]:
        """Missing, extra and non-numeric columns, one phrase each; [] when df fits."""
        have = [str(c) for c in df.columns]
        known = set(self.features) | set(self.id_columns)
        missing = [c for c in (*self.id_columns, *self.features) if c not in set(have)]
        extra = [c for c in have if c not in known]
        text = [c for c in self.features if c in set(have) and not is_numeric_dtype(df[c].dtype)]
        out = []
        if missing:
            out.append(f"missing {_plural('column', len(missing))} {_names(missing)}")
        if extra:
            out.append(f"extra {_plural('column', len(extra))} {_names(extra)}")
        if text:
            kinds = ", ".join(f"{c!r} ({df[c].dtype})" for c in text[:8])
            out.append(f"non-numeric {_plural('column', len(text))} {kinds}")
        return out

    def check(self, df: pd.DataFrame, where: str) -> None:
        """Raise PipelineError (exit 2) naming every column that breaks the contract."""
        problems = self.problems(df)
        if problems:
            n = len(self.features)
            raise PipelineError(
                f"{where}: {'; '.join(problems)} "
                f"(the model was trained on {n} {_plural('column', n)}: {_names(self.features)})"
            )

    def features_in_order(self, df: pd.DataFrame) -> pd.DataFrame:
        """The feature columns of df, in the schema's order (a table may order them otherwise)."""
        return df[list(self.features)]

    def widened_range(self, tolerance: float) -> list[tuple[float, float]]:
        """Training range widened by tolerance * (max - min) on each side, per feature."""
        out = []
        for lo, hi in zip(self.minimum, self.maximum, strict=True):
            pad = tolerance * (hi - lo) if math.isfinite(hi - lo) else 0.0
            out.append((lo - pad, hi + pad))
        return out
