"""benchmarks/quality.py's dequantizer: the baselines' and the VAE's figures are only comparable if
no column is left as point masses and the noise intervals of different values never overlap."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.quality import dequantize


def test_each_repeated_value_gets_its_own_interval_on_a_grid_or_off_it():
    rng = np.random.default_rng(0)
    levels = np.log1p([0.0, 25.0, 50.0, 95.0, 100.0])  # randhie's lncoins: five values off any grid
    df = pd.DataFrame({
        "levels": rng.choice(levels, 400),
        "counts": rng.integers(0, 7, 400).astype(float) * 0.5,  # a grid of step 0.5
        "binary": rng.integers(0, 2, 400).astype(float),
        "real": rng.normal(size=400),  # all values distinct: left alone
    })
    out = dequantize(df, np.random.default_rng(1))

    upper = np.append(levels[1:], levels[-1] + (levels[-1] - levels[-2]))
    i = np.searchsorted(levels, df["levels"])
    assert bool((out["levels"] >= df["levels"]).all()) and bool((out["levels"] < upper[i]).all())
    assert bool((out["levels"] != df["levels"]).all())
    step = out["counts"] - df["counts"]
    assert bool((step >= 0).all()) and bool((step < 0.5).all()) and float(step.std()) > 0.1
    pd.testing.assert_series_equal(out["binary"], df["binary"])
    pd.testing.assert_series_equal(out["real"], df["real"])
    assert out["levels"].nunique() == len(df) and out["counts"].nunique() == len(df)
