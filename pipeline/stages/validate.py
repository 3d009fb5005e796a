"""The validate stage: a table against the contract, one report of Checks.

GX checks the columns, row count, nulls, constant columns and, against a model's schema, its
levels and training range (pipeline.contract.expectations); pandas checks dtypes, infinities,
float32 precision and duplicates (here); numpy/scipy check the i.i.d. assumption along row order
(pipeline.contract.iid) and, against a model, drift (pipeline.contract.drift)
(docs/architecture.md, "Contracts"). Row numbers in reports are 0-based positions in the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import DataParams, Params, ValidateParams, drop_columns
from pipeline.contract.checks import MAX_ROWS_SHOWN, Check, Severity
from pipeline.contract.columns import (
    FLOAT32_MAX,
    float32_collapsed,
    is_numeric_dtype,
    is_text_dtype,
)
from pipeline.contract.expectations import expectations, gx_checks
from pipeline.contract.iid import iid_checks
from pipeline.contract.schema import Schema, level_values
from pipeline.errors import ValidationFailed
from pipeline.io.sources import load_source, resolve_source
from pipeline.registry.resolve import resolve_model
from vae.atomic import write_atomic


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    checks: tuple[Check, ...]
    n_rows: int
    where: str

    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.success and c.severity == "error")

    def warnings(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.success and c.severity == "warning")

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "success": self.success,
            "n_rows": self.n_rows,
            "n_checks": len(self.checks),
            "n_failed": len(self.failures()),
            "n_warnings": len(self.warnings()),
            "checks": [{**asdict(c), "rows": list(c.rows)} for c in self.checks],
        }

    def summary_lines(self) -> list[str]:
        verdict = "valid" if self.success else "INVALID"
        head = (
            f"{self.where}: {verdict} ({self.n_rows} rows, {len(self.checks)} checks, "
            f"{len(self.failures())} failed, {len(self.warnings())} warnings)"
        )
        return [head, *(c.line() for c in (*self.failures(), *self.warnings()))]


def save_report(report: ValidationReport, path: Path) -> Path:
    """Write the report as JSON: path holds the old file or the whole new one."""
    write_atomic(Path(path), (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return Path(path)


def validate_path(
    path: Path | str,
    params: Params,
    against: Schema | None = None,
    report_path: Path | None = None,
) -> ValidationReport:
    """Read a table (or a data.source: folder, sklearn:NAME, synthetic:) and validate it as
    recorded; unreadable files raise PipelineError (exit 2)."""
    source = resolve_source(str(path))
    df = load_source(source, seed=params.data.seed)
    report = validate_table(
        df, data=params.data, params=params.validate, against=against, where=source
    )
    if report_path is not None:
        save_report(report, report_path)
    return report


def validate_table(
    df: pd.DataFrame,
    *,
    data: DataParams,
    params: ValidateParams,
    against: Schema | None = None,
    where: str = "table",
) -> ValidationReport:
    """Check a table against the contract; success is False when an error-severity check fails."""
    # GX reports index labels: make them positions; names as str for GX and the report
    df = drop_columns(df.reset_index(drop=True).rename(columns=str), data, where)
    if against is not None and against.dropped:  # the model's data.drop_columns: ignored where present
        df = df.drop(columns=[c for c in against.dropped if c in df.columns])
    ids = set(against.id_columns if against is not None else data.id_columns)
    features = [c for c in df.columns if c not in ids]
    if against is not None:
        features = [c for c in features if c in set(against.features)]
        levels = {against.features[j]: against.levels[j] for j in against.categorical}
        categorical = [c for c in features if c in levels]
    else:
        categorical = [c for c in features if not is_numeric_dtype(df[c].dtype) and is_text_dtype(df[c].dtype)]
    numeric = [c for c in features if is_numeric_dtype(df[c].dtype) and c not in set(categorical)]
    precision = _precision_checks(df, numeric)
    imprecise = {c.column for c in precision if not c.success}
    checked = [c for c in numeric if c not in imprecise]
    checks = [
        *_numeric_checks(df, features, categorical),
        *_level_checks(df, categorical, against),
        *_finite_checks(df, numeric),
        *precision,
        *gx_checks(df, expectations(df, checked, data, params, against, categorical), checked, categorical),
        _duplicate_check(df, [*numeric, *categorical], params.max_duplicate_fraction),
        *iid_checks(df, numeric, params),
        *_drift_checks(df, [*numeric, *categorical], params, against),
    ]
    success = not any(not c.success and c.severity == "error" for c in checks)
    return ValidationReport(success=success, checks=tuple(checks), n_rows=len(df), where=where)


def _numeric_checks(df: pd.DataFrame, features: Sequence[str], categorical: Sequence[str]) -> list[Check]:
    bad = [c for c in features if not is_numeric_dtype(df[c].dtype) and c not in set(categorical)]
    hint = ("is not numeric and the model has no levels for it; retrain with it or drop it (data.drop_columns)"
            if categorical or any(is_text_dtype(df[c].dtype) for c in bad) else
            "is neither numeric nor text; convert it, drop it (data.drop_columns) or list it in data.id_columns")
    checks = [Check("numeric", c, False, "error", f"dtype {df[c].dtype} {hint}") for c in bad]
    n = len(features) - len(categorical)
    return checks or [Check("numeric", None, True, "error", f"all {n} non-text features are numeric")]


def _level_checks(df: pd.DataFrame, categorical: Sequence[str], against: Schema | None) -> list[Check]:
    """Text columns, modelled over their levels: one that holds a distinct value in every row is an
    identifier, not a category (against a model, its levels are checked by GX instead)."""
    checks = []
    for c in categorical:
        values = level_values(df[c])
        seen = values[values != None]  # noqa: E711 (elementwise)
        distinct = len(set(seen.tolist()))
        if against is None and distinct == len(seen) and len(seen) > 2:
            checks.append(Check("categorical", c, False, "error",
                                f"{distinct} distinct values in {len(seen)} rows: an identifier, not a category; "
                                "list it in data.id_columns or data.drop_columns"))
        else:
            checks.append(Check("categorical", c, True, "error", f"text, modelled over {distinct} levels"))
    return checks


def _finite_checks(df: pd.DataFrame, numeric: Sequence[str]) -> list[Check]:
    checks = []
    for c in numeric:
        values = df[c].to_numpy(dtype=np.float64, na_value=np.nan)
        inf = np.isinf(values)
        big = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)  # finite here, inf in the model's float32
        for bad, what in ((inf, "infinite value"), (big, f"value beyond float32's range (+-{FLOAT32_MAX:.3g})")):
            if bad.any():
                rows = tuple(int(i) for i in np.flatnonzero(bad)[:MAX_ROWS_SHOWN])
                checks.append(Check("finite", c, False, "error", f"{int(bad.sum())} {what}{'s' if bad.sum() > 1 else ''}", rows))
    return checks or [Check("finite", None, True, "error", "no infinite values")]


def _precision_checks(df: pd.DataFrame, numeric: Sequence[str]) -> list[Check]:
    """Integer columns that float32 turns constant (GX, in float64, would call them constant too)."""
    checks = [Check("float32_precision", name, False, "error", why) for name, why in float32_collapsed(df[list(numeric)])]
    return checks or [Check("float32_precision", None, True, "error", "every integer column is distinct in float32")]


def _duplicate_check(df: pd.DataFrame, numeric: Sequence[str], limit: float) -> Check:
    dup = df[list(numeric)].duplicated().to_numpy() if numeric else np.zeros(len(df), bool)
    count, n = int(dup.sum()), max(len(df), 1)
    rows = tuple(int(i) for i in np.flatnonzero(dup)[:MAX_ROWS_SHOWN])
    ok = count / n <= limit
    message = (
        f"{count} of {len(df)} rows ({count / n:.1%}) repeat an earlier row over the feature "
        f"columns; at most {limit:.1%} allowed (validate.max_duplicate_fraction)"
    )
    return Check("duplicates", None, ok, "error", message, () if ok else rows)


def _drift_checks(
    df: pd.DataFrame, numeric: Sequence[str], params: ValidateParams, against: Schema | None
) -> list[Check]:
    """--against: each numeric feature against the model's training distribution."""
    from pipeline.contract.drift import column_drift

    if against is None or params.drift == "off":
        return []
    severity: Severity = "error" if params.drift == "fail" else "warning"
    limits = (f"limits {params.drift_max_shift_std} sd (validate.drift_max_shift_std), KS "
              f"{params.drift_max_ks} (validate.drift_max_ks) at p<{params.drift_alpha:g}")
    checks = []
    for d in column_drift(against, df[list(numeric)], params):
        hint = ": the table does not look like the training table" if d.drifted else ""
        brief = f"{d.shift_std:+.2f} sd" + ("" if d.ks is None else f", KS {d.ks:.2f}")
        if d.levels_tv is not None:
            brief = f"levels TV {d.levels_tv:.2f}"
        checks.append(Check("drift", d.column, not d.drifted, severity, f"{d.describe()}; {limits}{hint}",
                            brief=brief))
    return checks


def run(path: Path | str, params: Params, against: str | None = None, report_path: Path | None = None,
        raise_on_failure: bool = True) -> ValidationReport:
    """`vaepipe validate`: PATH, a table file or any data.source (a folder: its newest table;
    sklearn:NAME; synthetic:), validated as recorded, in its own row order, before any split;
    against: MODEL, whose table contract and training distribution the table is checked against."""
    schema = resolve_model(against).schema if against else None
    report = validate_path(path, params, against=schema, report_path=report_path)
    if raise_on_failure:
        raise_if_failed(report, path)
    return report


def raise_if_failed(report: ValidationReport, path: Path | str) -> None:
    """ValidationFailed (exit 1) naming the drifted columns, then the first failure and a few more."""
    if not report.success:
        failures = report.failures()
        drifted = [f"{c.column!r} ({c.brief})" for c in failures if c.name == "drift"]
        others = [c for c in failures if c.name != "drift"]
        parts = [f"drifted columns {', '.join(drifted)} (validate.drift)"] if drifted else []
        parts += [c.line().removeprefix("FAIL ") if i == 0 and not drifted else (f"{c.name} ({c.column})" if c.column else c.name)
                  for i, c in enumerate(others)]
        head, rest = parts[0], parts[1:]
        also = f"; also {'; '.join(rest[:4])}" + (" ..." if len(rest) > 4 else "") if rest else ""
        raise ValidationFailed(f"{path} failed validation: {head}{also}")


def against_champion(source: str, params: Params) -> ValidationReport | None:
    """data.source against @champion's table contract and training distribution (drift).

    None when there is no champion yet: nothing to compare with.
    """
    from pipeline.registry.champion import check_champion_contract
    from pipeline.registry.versions import current_champion

    name = params.register.model_name
    version = current_champion(name)
    if version is None:
        return None
    schema = resolve_model(f"models:/{name}/{version}").schema
    df = load_source(source, seed=params.data.seed)
    check_champion_contract(df, name, source, source)  # another table: no drift to speak of, another name
    return validate_table(df, data=params.data, params=params.validate, against=schema,
                          where=f"{source} against {name} version {version} (@champion)")
