"""The table contract as a Great Expectations suite (GX Core 1.x, an ephemeral context per call).

The expectations carry their check's name and message templates in `meta`; gx_checks runs them on
a DataFrame and turns each result into a Check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import DataParams, ValidateParams
from pipeline.contract.checks import MAX_ROWS_SHOWN, Check
from pipeline.contract.schema import Schema, level_values


def _rows(result: dict[str, Any]) -> tuple[int, ...]:
    return tuple(
        int(i) for i in (result.get("partial_unexpected_index_list") or [])[:MAX_ROWS_SHOWN]
    )


def _quote(cols: Sequence[Any]) -> str:
    return ", ".join(repr(str(c)) for c in sorted(cols, key=str))


def _expect(expectation: Any, check: str, ok: str, fail: str = "") -> Any:
    # ok/fail are message templates: {n} the unexpected count, {p} its share, {v} the observed
    # value, {s} a plural s
    expectation.meta = {"check": check, "ok": ok, "fail": fail}
    return expectation


def expectations(
    df: pd.DataFrame,
    numeric: Sequence[str],
    data: DataParams,
    params: ValidateParams,
    against: Schema | None,
    categorical: Sequence[str] = (),
) -> list[Any]:
    """The table contract as GX expectations: the columns, the row count, nulls, constant columns
    and, against a model's schema, its levels and its widened training range."""
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


def gx_checks(df: pd.DataFrame, expectations: list[Any], numeric: Sequence[str],
              categorical: Sequence[str] = ()) -> list[Check]:
    """Run the expectations (`expectations`) on df in an ephemeral GX context: one Check each, in their order."""
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
