"""benchmarks/quality.py: the dequantizer (the baselines' and the VAE's figures are only comparable
if no column is left as point masses and the noise intervals of different values never overlap) and
the neural spline flow's figure (nats/row in the table's own units, against a closed form)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.quality import Split, dequantize, gmm_bic, main, nsf_fit, run_table

MEAN = np.array([3.0, -40.0])
COV = np.array([[4.0, 30.0], [30.0, 400.0]])  # sds 2 and 20, correlation 0.75


def _gaussian_table(seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """1,000 training and 2,000 test rows of N(MEAN, COV), and the true density's mean log-density
    of those test rows: the closed form the flow's held-out figure must approach."""
    y = np.random.default_rng(seed).multivariate_normal(MEAN, COV, size=3000)
    d = y[1000:] - MEAN
    log_p = -0.5 * np.einsum("ij,jk,ik->i", d, np.linalg.inv(COV), d) - 0.5 * np.log(np.linalg.det(2 * np.pi * COV))
    return y[:1000], y[1000:], float(log_p.mean())


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


def test_the_flows_held_out_figure_is_the_true_gaussians_within_estimation_error():
    """Scored on the same test rows as the truth, the flow can only fall short by its estimation
    error (the true density maximizes the expected log-likelihood): measured 0.02-0.06 nats on
    seeds 0-5 of this table, so 0.15 allows for other BLAS/zuko builds, while a lost Jacobian
    (log 2 + log 20 = 3.7 nats), an unrestored or untrained flow, or standardizing with the test
    rows' moments would miss by far more. It may beat the truth only by the test rows' noise in the
    paired difference (a few hundredths at most)."""
    train, test, truth = _gaussian_table(seed=0)
    nats, seconds, epochs = nsf_fit(train, test, seed=0)
    assert truth - 0.15 < nats < truth + 0.03
    assert epochs > 20 and seconds >= 0  # stopped by patience (20), not on the first epoch


def test_the_flows_figure_carries_the_jacobian_and_a_rerun_repeats_it():
    """Standardization makes the flow's fit blind to the columns' scale, so scaling the table by
    (1000, 0.01) must move the figure by exactly -log 1000 - log 0.01 nats/row (the Jacobian of the
    change of units), and the same seed must give the same figure. Both hold at any epoch count;
    after 20 the flow is a trained one (within 0.05 nats/row of the truth on this table)."""
    train, test, _ = _gaussian_table(seed=1)
    scale = np.array([1000.0, 0.01])
    nats, _, _ = nsf_fit(train, test, seed=0, max_epochs=20)
    again, _, _ = nsf_fit(train, test, seed=0, max_epochs=20)
    scaled, _, _ = nsf_fit(train * scale, test * scale, seed=0, max_epochs=20)
    assert again == nats
    assert scaled - nats == pytest.approx(-np.log(scale).sum(), abs=1e-3)


def test_train_seeds_train_one_vae_per_seed_on_the_same_split_and_report_their_spread():
    """--train-seeds: the figure is the mean over the seeds, vae_range their spread, each seed a run
    of its own (train.seed reaches the training: the figures differ); the mixture and flow are off."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    table = pd.DataFrame({"a": x, "b": x**2 + 0.1 * rng.normal(size=500)})  # curved: training beats the linear start
    split = Split(table[:400], table[400:], table[:400], table[400:], 0)
    sets = ["train.num_threads=1", "train.epochs=10", "train.lr_warmup_steps=0", "model.hidden_dims=[16]",
            "model.latent_dim=1", "evaluate.iw_samples=20"]
    r = run_table("gauss", split, sets, seed=0, max_k=0, nsf=False, train_seeds=[0, 1, 2])
    figures = r["vae_seeds"]
    assert len(figures) == 3 and len(set(figures)) == 3
    assert r["vae"] == pytest.approx(sum(figures) / 3) and r["vae_range"] == pytest.approx(max(figures) - min(figures))
    assert len(r["train_seconds_seeds"]) == 3 and r["gmm"] is None and r["nsf"] is None
    one = run_table("gauss", split, sets, seed=0, max_k=0, nsf=False)
    assert one["vae_range"] is None and one["vae"] == pytest.approx(figures[0])  # params' train.seed is 0


def test_the_mixture_fits_on_the_vaes_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its seconds stand beside the VAE's: left alone numpy's BLAS took every core (twice one
    thread's time on the 2-vCPU machine), so run_table fits it under train.num_threads threads, and
    the figure (k, nats/row) is the closed form's where one component is right."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_info

    seen: list[set[int]] = []
    fit = GaussianMixture.fit

    def counting(self: GaussianMixture, x: np.ndarray) -> GaussianMixture:
        seen.append({pool["num_threads"] for pool in threadpool_info()})
        return fit(self, x)

    monkeypatch.setattr(GaussianMixture, "fit", counting)
    train, test, truth = _gaussian_table(seed=2)
    k, nats, _ = gmm_bic(train, test, max_k=3, seed=0, threads=1)
    assert len(seen) == 3 and all(s == {1} for s in seen)
    assert k == 1 and nats == pytest.approx(truth, abs=0.05)
    seen.clear()  # through run_table, from the VAE's settings
    split = Split(*(pd.DataFrame(a, columns=["a", "b"]) for a in (train, test, train, test)), 0)
    sets = ["train.num_threads=1", "train.epochs=1", "model.hidden_dims=[8]", "evaluate.iw_samples=10"]
    r = run_table("gauss", split, sets, seed=0, max_k=2, nsf=False)
    assert len(seen) == 2 and all(s == {1} for s in seen) and r["gmm_k"] == 1


def test_several_split_seeds_give_a_row_per_split_and_export_a_folder_per_split(tmp_path, capsys) -> None:
    """--seed 0,1: each table is split, trained and scored once per seed (the splits differ, so the
    baselines' figures do); --export writes <table>/<seed>/ and --from reads it back to the same rows."""
    import json

    fast = ["--no-nsf", "--max-k", "0", "--set", "train.epochs=2", "--set", "evaluate.iw_samples=20",
            "--set", "model.hidden_dims=[16]", "--set", "train.num_threads=1"]
    main(["--tables", "wine", "--seed", "0,1", "--export", str(tmp_path / "splits")])
    assert {p.name for p in (tmp_path / "splits" / "wine").iterdir()} == {"0", "1"}
    main(["--tables", "wine", "--seed", "0,1", *fast, "--out", str(tmp_path / "a.json")])
    main(["--tables", "wine", "--seed", "0,1", "--from", str(tmp_path / "splits"), *fast, "--out", str(tmp_path / "b.json")])
    direct, exported = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert [r["split"] for r in direct] == [0, 1] and direct[0]["full_gauss"] != direct[1]["full_gauss"]
    assert [(r["split"], r["full_gauss"], r["vae"]) for r in exported] == [(r["split"], r["full_gauss"], r["vae"]) for r in direct]
    assert capsys.readouterr().out.count("| wine | ") == 4  # a row per split, each run
