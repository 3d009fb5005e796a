"""The validate stage: the table contract as a Great Expectations suite, plus i.i.d. checks.

GX (Core 1.x, an ephemeral context per call) checks the columns, row count, nulls, infinities,
constant columns and, against a model's schema, the training range. Pandas checks dtypes and
duplicates; numpy/scipy check the i.i.d. assumption along row order (docs/architecture.md,
"Contracts"). Row numbers in reports are 0-based positions in the table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.config import DataParams, Params, ValidateParams, drop_columns
from pipeline.contract.columns import (
    FLOAT32_MAX,
    float32_collapsed,
    is_numeric_dtype,
    is_text_dtype,
)
from pipeline.contract.schema import Schema, level_values
from pipeline.errors import ValidationFailed
from pipeline.io.sources import load_source, resolve_source
from pipeline.registry.resolve import resolve_model
from vae.atomic import write_atomic

Severity = Literal["error", "warning"]
MAX_ROWS_SHOWN = 5
MIN_IID_ROWS = 8  # below this the i.i.d. statistics are noise


@dataclass(frozen=True)
class Check:
    name: str
    column: str | None
    success: bool
    severity: Severity
    message: str
    rows: tuple[int, ...] = ()  # up to MAX_ROWS_SHOWN offending row positions
    brief: str = ""  # the measured effect in a few words, for one-line errors (drift)

    def line(self) -> str:
        tag = "PASS" if self.success else ("FAIL" if self.severity == "error" else "WARN")
        col = f" column {self.column!r}" if self.column is not None else ""
        more = f" (rows {', '.join(map(str, self.rows))})" if self.rows else ""
        return f"{tag} {self.name}{col}: {self.message}{more}"


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
    checks = [
        *_numeric_checks(df, features, categorical),
        *_level_checks(df, categorical, against),
        *_finite_checks(df, numeric),
        *precision,
        *_gx_checks(df, [c for c in numeric if c not in imprecise], data, params, against, categorical),
        _duplicate_check(df, [*numeric, *categorical], params.max_duplicate_fraction),
        *_iid_checks(df, numeric, params),
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


def _rows(result: dict[str, Any]) -> tuple[int, ...]:
    return tuple(
        int(i) for i in (result.get("partial_unexpected_index_list") or [])[:MAX_ROWS_SHOWN]
    )


def _quote(cols: Sequence[Any]) -> str:
    return ", ".join(repr(str(c)) for c in sorted(cols, key=str))


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


def _expect(expectation: Any, check: str, ok: str, fail: str = "") -> Any:
    # ok/fail are message templates: {n} the unexpected count, {p} its share, {v} the observed
    # value, {s} a plural s
    expectation.meta = {"check": check, "ok": ok, "fail": fail}
    return expectation


def _expectations(
    df: pd.DataFrame,
    numeric: Sequence[str],
    data: DataParams,
    params: ValidateParams,
    against: Schema | None,
    categorical: Sequence[str] = (),
) -> list[Any]:
    import great_expectations.expectations as gxe

    if against is not None:
        cols = [*against.features, *against.id_columns]
    else:
        cols = [*df.columns, *(c for c in data.id_columns if c not in df.columns)]
    need = f"at least {params.min_rows} are needed (validate.min_rows)"
    out = [
        _expect(gxe.ExpectTableColumnsToMatchSet(column_set=cols, exact_match=True), "columns",
                ok=f"the {len(cols)} expected columns"),
        _expect(gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows), "row_count",
                ok="{v} rows", fail=f"{{v}} rows; {need}"),
    ]
    for c in [*numeric, *categorical]:
        if data.missing == "reject":
            out.append(_expect(gxe.ExpectColumnValuesToNotBeNull(column=c), "no_nulls",
                               ok="no null values",
                               fail="{n} null value{s}; fill them or set data.missing: mask"))
        out.append(_expect(gxe.ExpectColumnUniqueValueCountToBeBetween(column=c, min_value=2),
                           "not_constant", ok="{v} distinct values",
                           fail="{v} distinct value{s}; a constant or empty column carries nothing: drop it"))
    if against is not None:
        for j in against.categorical:
            c, levels = against.features[j], list(against.levels[j])
            if c in categorical:
                known = gxe.ExpectColumnValuesToBeInSet(column=c, value_set=levels)
                text = "{n} value{s} ({p}) not among the " + f"{len(levels)} training levels" + "{u}"
                out.append(_expect(known, "known_levels", ok=text, fail=text))
        ranges = zip(against.features, against.widened_range(params.range_tolerance), strict=True)
        for c, (lo, hi) in ((c, r) for c, r in ranges if c in numeric):
            between = gxe.ExpectColumnValuesToBeBetween(column=c, min_value=lo, max_value=hi,
                                                        mostly=1.0 - params.max_out_of_range_fraction)
            text = (f"{{n}} value{{s}} ({{p}}) outside the training range widened to [{lo:.6g}, {hi:.6g}] "
                    f"(validate.range_tolerance); at most {params.max_out_of_range_fraction:.2%} allowed "
                    "(validate.max_out_of_range_fraction)")
            out.append(_expect(between, "in_training_range", ok=text, fail=text))
    return out


def _gx_checks(
    df: pd.DataFrame,
    numeric: Sequence[str],
    data: DataParams,
    params: ValidateParams,
    against: Schema | None,
    categorical: Sequence[str] = (),
) -> list[Check]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # that module pins its own logger at INFO and announces every ephemeral docs folder
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars on stderr
    batch = (
        ctx.data_sources.add_pandas("vaepipe")
        .add_dataframe_asset("table")
        .add_batch_definition_whole_dataframe("whole")
    )
    expectations = _expectations(df, numeric, data, params, against, categorical)
    for i, e in enumerate(expectations):
        e.meta["i"] = i  # GX returns results in its own order
    suite = ctx.suites.add(gx.ExpectationSuite(name="table_contract", expectations=expectations))
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="table_contract", data=batch, suite=suite)
    )
    # numeric features as float64 with NaN: bool and nullable dtypes then compare like numbers
    frame = df.assign(**{c: df[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in numeric},
                      **{c: level_values(df[c]) for c in categorical})  # levels as str, None where missing
    result = vd.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
    results: list[Any] = list(result.results)
    checks = {r.expectation_config.meta["i"]: _gx_check(r) for r in results}
    return [checks[i] for i in sorted(checks)]


def _gx_check(r: Any) -> Check:
    meta, column = r.expectation_config.meta, r.expectation_config.kwargs.get("column")
    info = r.exception_info or {}
    nested = [v for v in info.values() if isinstance(v, dict)]
    failed = [d for d in (info, *nested) if d.get("raised_exception")]
    if failed:
        why = str(failed[0].get("exception_message", "")).splitlines()[:1]
        return Check(
            meta["check"], column, False, "error", f"GX could not evaluate it: {''.join(why)}"
        )
    result = r.result
    if meta["check"] == "columns" and not r.success:
        mism = (result.get("details") or {}).get("mismatched") or {}
        parts = [
            f"{label} columns {_quote(mism[key])}"
            for key, label in (("missing", "missing"), ("unexpected", "extra"))
            if mism.get(key)
        ]
        return Check("columns", None, False, "error", "; ".join(parts) or "columns do not match")
    template = meta["ok"] if r.success else meta["fail"]
    n, v = result.get("unexpected_count"), result.get("observed_value")
    p = f"{(result.get('unexpected_percent') or 0.0) / 100:.2%}"
    unseen = sorted({str(u) for u in result.get("partial_unexpected_list") or []})
    u = f": {', '.join(map(repr, unseen[:MAX_ROWS_SHOWN]))}" if unseen and not r.success else ""
    message = template.format(n=n, v=v, p=p, s="" if (n if n is not None else v) == 1 else "s", u=u)
    return Check(meta["check"], column, bool(r.success), "error", message, _rows(result))


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


@dataclass(frozen=True)
class IidStat:
    name: str  # autocorrelation | trend | shift
    value: float  # lag-1 autocorrelation, Spearman rho vs row number, or mean2 - mean1 in stds
    p_value: float  # two-sided, under "the rows are i.i.d."


def iid_stats(x: np.ndarray) -> list[IidStat]:
    """Effects of row order on one column (finite values, in row order); [] if too few or constant."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n < MIN_IID_ROWS or np.ptp(x) == 0:
        return []
    xc = x - x.mean()
    r1 = float(xc[:-1] @ xc[1:] / (xc @ xc))
    p_r1 = float(2 * stats.norm.sf(abs(r1 + 1 / n) * math.sqrt(n)))  # r1 ~ N(-1/n, 1/n) if i.i.d.
    rho = stats.spearmanr(x, np.arange(n))
    a, b = x[: n // 2], x[n // 2 :]
    pooled = math.sqrt((a.var() + b.var()) / 2)
    gap = float(b.mean() - a.mean())  # > 0: the second half is higher
    if pooled > 0:
        shift, p_shift = gap / pooled, float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    else:  # each half constant
        shift, p_shift = (math.copysign(math.inf, gap), 0.0) if gap else (0.0, 1.0)
    return [
        IidStat("autocorrelation", r1, p_r1),
        IidStat("trend", float(rho.statistic), float(rho.pvalue)),
        IidStat("shift", shift, p_shift),
    ]


_IID_TEXT = {
    "autocorrelation": (
        "lag-1 autocorrelation along row order",
        "max_autocorrelation",
        "neighbouring rows are alike (runs of high and of low values): shuffle the rows or check how they "
        "were collected",
    ),
    "trend": (
        "Spearman correlation with the row number",
        "max_trend_correlation",
        "values drift along the rows: shuffle the rows or check for drift",
    ),
    "shift": (
        "second half's mean minus the first's, in pooled stds,",
        "max_shift_std",
        "the second half differs from the first: shuffle the rows or check for drift",
    ),
}


def _iid_checks(df: pd.DataFrame, numeric: Sequence[str], params: ValidateParams) -> list[Check]:
    if params.iid == "off":
        return []
    severity: Severity = "error" if params.iid == "fail" else "warning"
    alpha = params.iid_alpha / max(len(numeric), 1)  # Bonferroni: the columns are tested at once
    checks = []
    for c in numeric:
        for s in iid_stats(df[c].to_numpy(dtype=np.float64, na_value=np.nan)):
            what, key, hint = _IID_TEXT[s.name]
            if s.name == "autocorrelation" and s.value < 0:
                hint = ("neighbouring rows alternate (a high value tends to follow a low one): rows interleaved "
                        "from two sources or taken in pairs? shuffle the rows or check how they were collected")
            limit = getattr(params, key)
            fired = abs(s.value) > limit and s.p_value < alpha
            message = f"{what} {s.value:+.3f} (limit {limit} validate.{key}, p={s.p_value:.2g})"
            checks.append(
                Check(s.name, c, not fired, severity, message + (f": {hint}" if fired else ""))
            )
    return checks


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
