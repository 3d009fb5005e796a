"""What a table's columns may hold and how the model reads them: numeric or text features beside
the id columns, float32 cells (the model computes in float32)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.errors import PipelineError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_numeric_dtype(dtype: Any) -> bool:
    if pd.api.types.is_bool_dtype(dtype):
        return True
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)


def is_text_dtype(dtype: Any) -> bool:
    """Text or categorical columns (object, str, category): modelled over their levels."""
    return (isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype))


def split_features(
    df: pd.DataFrame, id_columns: Sequence[str], where: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ids, features): id columns pass through; every other column must be numeric or text
    (a text or categorical column is modelled over its levels)."""
    missing = [c for c in id_columns if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{where}: missing id column {', '.join(map(repr, missing))} (data.id_columns); "
            f"the table has {', '.join(map(repr, map(str, df.columns[:8])))}"
            + (", ..." if df.shape[1] > 8 else "")
        )
    ids = df[list(id_columns)]
    features = df[[c for c in df.columns if c not in set(id_columns)]]
    if features.shape[1] == 0:
        raise PipelineError(f"{where}: no feature columns besides the id columns (data.id_columns)")
    bad = [(c, str(t)) for c, t in features.dtypes.items() if not is_numeric_dtype(t) and not is_text_dtype(t)]
    if bad:
        named = ", ".join(f"{c!r} ({t})" for c, t in bad)
        raise PipelineError(
            f"{where}: column {named} is neither numeric nor text; "
            "convert it, drop it (data.drop_columns) or list it in data.id_columns"
        )
    bools = [c for c, t in features.dtypes.items() if pd.api.types.is_bool_dtype(t)]
    if bools:
        # numpy bool has no missing cells; nullable "boolean" may, so it goes to float with NaN
        features = features.astype(
            {c: "int64" if features[c].dtype == np.bool_ else "float64" for c in bools}
        )
    return ids, features


def float32_overflow(features: pd.DataFrame) -> tuple[str, int, float] | None:
    """(column, row, value) of the first finite cell beyond float32's range, which would become inf."""
    for name in features.columns:
        if features[name].dtype.kind != "f" or features[name].dtype.itemsize <= 4:
            continue
        values = features[name].to_numpy(dtype=np.float64, na_value=np.nan)
        big = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
        if big.any():
            row = int(np.flatnonzero(big)[0])
            return str(name), row, float(values[row])
    return None


def float32_collapsed(features: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, why) for each integer column whose distinct values all round to one float32 (int64
    ids or timestamps near 2**62): the model, which computes in float32, would see a constant column."""
    lines = []
    for name in features.columns:
        values = features[name].to_numpy()
        if values.dtype.kind not in "iu" or len(values) == 0:
            continue
        lo, hi = values.min(), values.max()
        if lo != hi and np.float32(lo) == np.float32(hi):  # rounding is monotone: everything between too
            lines.append((str(name), f"holds integers near {float(hi):.3g} that differ by at most "
                          f"{int(hi) - int(lo):,}: float32, in which the model computes, cannot tell them "
                          "apart; subtract an offset (e.g. the column's minimum) or drop the column"))
    return lines


def to_tensor(features: pd.DataFrame, where: str = "table") -> torch.Tensor:
    """(rows, features) float32, a copy: pandas 3 hands out read-only views."""
    over = float32_overflow(features)
    if over is not None:
        name, row, value = over
        raise PipelineError(
            f"{where}: column {name!r} row {row} holds {value:g}, beyond float32's range "
            f"(+-{FLOAT32_MAX:.3g}) in which the model computes; rescale the column (e.g. other units)"
        )
    return torch.from_numpy(features.to_numpy(dtype=np.float32, na_value=np.nan, copy=True))

