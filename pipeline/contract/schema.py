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

from pipeline.contract.columns import is_numeric_dtype, is_text_dtype, split_features
from pipeline.errors import PipelineError


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


def level_values(series: pd.Series) -> np.ndarray:
    """A column's cells as level names (str, object array) and None where missing."""
    missing = series.isna().to_numpy()
    values = series.astype(object).to_numpy(dtype=object, copy=True)
    values[~missing] = [str(v) for v in values[~missing]]
    values[missing] = None
    return values


def training_levels(series: pd.Series, name: str, where: str) -> tuple[str, ...]:
    """The levels of a training table's text column, sorted; refused when every observed value
    differs (an identifier, not a category) or when only one shows."""
    values = level_values(series)
    seen = values[values != None]  # noqa: E711 (elementwise)
    levels = tuple(sorted(set(seen.tolist())))
    if len(levels) == len(seen) and len(seen) > 2:
        raise PipelineError(
            f"{where}: text column {name!r} holds {len(seen)} distinct values in {len(seen)} rows: an identifier, "
            "not a category; list it in data.id_columns or data.drop_columns"
        )
    if len(levels) == 1:
        raise PipelineError(f"{where}: text column {name!r} holds one level only ({levels[0]!r}); drop it (data.drop_columns)")
    return levels


def encode_levels(series: pd.Series, levels: Sequence[str], name: str, where: str, first_row: int = 0) -> np.ndarray:
    """A categorical column as float32 level codes (NaN where missing); a level the model did not
    see in training is an input error naming the column, row and level."""
    values = level_values(series)
    missing = values == None  # noqa: E711 (elementwise)
    index = pd.Index(list(levels))
    codes = index.get_indexer(values)  # -1: not a level (or missing)
    unseen = (codes < 0) & ~missing
    if unseen.any() and pd.api.types.is_float_dtype(series.dtype):
        # a CSV chunk of integer levels with a gap reads as floats: 4.0 is the level "4"
        whole = np.array([str(int(float(v))) if float(v).is_integer() else v for v in values[unseen]], dtype=object)
        codes[unseen] = index.get_indexer(whole)
        unseen = (codes < 0) & ~missing
    if unseen.any():
        row = int(np.flatnonzero(unseen)[0])
        shown = ", ".join(repr(v) for v in list(levels)[:8]) + (", ..." if len(levels) > 8 else "")
        raise PipelineError(
            f"{where}: column {name!r} row {first_row + row} holds level {values[row]!r}, not seen in training "
            f"({len(levels)} levels: {shown}); {int(unseen.sum())} such row{'s' if unseen.sum() > 1 else ''}"
        )
    out = codes.astype(np.float32)
    out[missing] = np.nan
    return out


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
    # per feature, the levels of a text column (sorted; its cells are modelled as their codes and
    # the moments above are the codes'), () for a numeric one; () for a table without text columns
    levels: tuple[tuple[str, ...], ...] = ()
    level_counts: tuple[tuple[int, ...], ...] = ()  # training count of each level (drift)
    # data.drop_columns at training: columns a table may carry that the model ignores
    dropped: tuple[str, ...] = ()
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
        for key in ("quantiles", "levels", "level_counts", "dropped"):  # keys added later: hashes of
            if not any(getattr(self, key)):  # tables without them stay as they were
                del body[key]
        return body

    @property
    def categorical(self) -> list[int]:
        """Positions of the features modelled over levels."""
        return [j for j, v in enumerate(self.levels) if v]

    def levels_of(self, j: int) -> tuple[str, ...]:
        return self.levels[j] if j < len(self.levels) else ()

    def codes(self, df: pd.DataFrame, where: str, first_row: int = 0) -> np.ndarray:
        """The feature columns of df (N, D) float32 in the schema's order, text columns as level codes."""
        frame = self.features_in_order(df)
        out = np.empty((len(frame), len(self.features)), dtype=np.float32, order="F")
        for j, name in enumerate(self.features):
            if self.levels_of(j):
                out[:, j] = encode_levels(frame[name], self.levels[j], name, where, first_row)
            else:
                with np.errstate(over="ignore"):
                    out[:, j] = frame[name].to_numpy(dtype=np.float32, na_value=np.nan)
        return out

    @classmethod
    def from_frame(
        cls, df: pd.DataFrame, id_columns: Sequence[str] = (), where: str = "table", dropped: Sequence[str] = ()
    ) -> Schema:
        """Describe a training table: every column but the id columns is a numeric or a text
        feature; dropped: columns already removed from df (data.drop_columns), recorded."""
        _, features = split_features(df, id_columns, where)
        text = [str(c) for c, t in features.dtypes.items() if not is_numeric_dtype(t) and is_text_dtype(t)]
        levels = {c: training_levels(features[c], c, where) for c in text}
        values = np.column_stack([
            encode_levels(features[c], levels[c], str(c), where).astype(np.float64) if str(c) in levels
            else features[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in features.columns
        ])  # (N, D)
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
            levels=tuple(levels.get(str(c), ()) for c in features.columns) if levels else (),
            level_counts=tuple(
                tuple(int(n) for n in np.bincount(values[~np.isnan(values[:, j]), j].astype(np.int64),
                                                   minlength=len(levels[str(c)])))
                if str(c) in levels else () for j, c in enumerate(features.columns)
            ) if levels else (),
            dropped=tuple(dropped),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self._body(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "schema") -> Schema:
        """Rebuild a stored schema; a hash that does not match its content is refused."""
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, names - set(d) - {"quantiles", "levels", "level_counts", "dropped"}
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
        known = set(self.features) | set(self.id_columns) | set(self.dropped)
        missing = [c for c in (*self.id_columns, *self.features) if c not in set(have)]
        extra = [c for c in have if c not in known]
        cats = {self.features[j] for j in self.categorical}
        text = [c for c in self.features if c in set(have) and c not in cats and not is_numeric_dtype(df[c].dtype)]
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
