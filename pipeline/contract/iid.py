"""The rows' i.i.d. assumption along row order, per numeric column: lag-1 autocorrelation, trend
against the row number, a shift between the halves; a limit fires only where the statistic is also
significant (Bonferroni over the columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import ValidateParams
from pipeline.contract.checks import Check, Severity

MIN_IID_ROWS = 8  # below this the i.i.d. statistics are noise


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


def iid_checks(df: pd.DataFrame, numeric: Sequence[str], params: ValidateParams) -> list[Check]:
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
