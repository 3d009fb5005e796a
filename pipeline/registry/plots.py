"""Figures of a trained model as PNG files: loss curves, latent means, reconstruction, traversals.

Each function takes data (frames, arrays, dicts), writes into a folder and returns the paths
written. Figures are drawn on matplotlib's object API (Figure renders with Agg), so no global
backend or pyplot state is touched and it is safe off the main thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.contract.model import LoadedModel
from vae import embed
from vae import traversals as decode_traversals
from vae.terms import TERMS, column

MAX_LINE_FEATURES = 10  # traversals: beyond this many features a heatmap reads better than lines
MAX_BARS = 60  # per-feature reconstruction: the worst features when there are more
PLOT_ROWS = 5000  # rows of a table drawn in the latent view


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=100)  # constrained layout: no second "tight" render
    return path


def loss_curves(history: pd.DataFrame, out_dir: Path, marks: Mapping[str, Any] | None = None) -> list[Path]:
    """history.csv as a frame: train_/val_ elbo, recon, kl (nats/row) per epoch, the refit's after the
    selection's (total_epoch). marks: the model's metadata["fit"] (the chosen epoch, the noise head's
    opening), drawn as vertical lines; the switch to the refit is drawn from the phase column."""
    fig = loss_figure(history, marks)
    return [_save(fig, Path(out_dir), "loss_curves.png")]


def loss_figure(history: pd.DataFrame, marks: Mapping[str, Any] | None = None) -> Figure:
    fig = Figure(figsize=(4 * len(TERMS), 3.8), layout="constrained")
    x = history["total_epoch"] if "total_epoch" in history else pd.Series(range(1, len(history) + 1), index=history.index)
    refit = history["phase"] == "refit" if "phase" in history else pd.Series(False, index=history.index)
    curves = (("train", ~refit, "train"), ("val", ~refit, "validation"), ("train", refit, "refit, all rows"),
              ("val", refit, "refit, validation rows (trained on)"))
    lines = _epoch_marks(x, refit, marks or {})
    for i, (ax, term) in enumerate(zip(fig.subplots(1, len(TERMS)), TERMS, strict=True)):  # a panel per term
        for split, rows, label in curves:
            col = column(split, term)
            if col in history and history.loc[rows, col].notna().any():
                ax.plot(x[rows], history.loc[rows, col], label=label, marker="." if int(rows.sum()) < 30 else None)
        for at, label, style in lines:
            ax.axvline(at, color="grey", linestyle=style, linewidth=1, label=label)
        ax.set(title=term.title, xlabel="epoch (selection, then refit)", ylabel="nats / row")
        if i == 0:
            ax.legend(fontsize=7)
    return fig


def _epoch_marks(x: pd.Series, refit: pd.Series, marks: Mapping[str, Any]) -> list[tuple[float, str, str]]:
    """(x, label, line style) of the chosen epoch, the refit's start and the noise head's openings."""
    lines: list[tuple[float, str, str]] = []
    if refit.any():
        lines.append((float(x[refit].iloc[0]) - 0.5, "refit on all rows begins", "-"))
    for j, at in enumerate(marks.get("noise_opened", [])):
        lines.append((float(at), "z-dependent noise opens" if j == 0 else "_", ":"))  # "_": no second legend entry
    if refit.any() and marks.get("selected_epoch"):
        lines.append((float(marks["selected_epoch"]), "best validation epoch of the selection", "-."))
    chosen = marks.get("chosen_epoch")
    if chosen is not None:
        lines.append((float(chosen), "chosen epoch (the model's weights)", "--"))
    return lines
def _two_dims(z: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """The first two latent means, or the first two principal components of all of them."""
    if z.shape[1] <= 2:
        return z, ("z_0", "z_1")
    centred = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = s**2 / max(float((s**2).sum()), 1e-300)
    return centred @ vt[:2].T, (f"PC 1 of z ({share[0]:.0%})", f"PC 2 of z ({share[1]:.0%})")


def latent_view(z: np.ndarray, out_dir: Path, color: np.ndarray | None = None, title: str = "latent means") -> list[Path]:
    """Scatter of posterior means (N, K); a histogram when K = 1. color: optional (N,) values."""
    z = np.asarray(z, dtype=float)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    if z.shape[1] == 1:
        ax.hist(z[:, 0], bins=min(50, max(5, len(z) // 10)))
        ax.set(xlabel="z_0", ylabel="rows")
    else:
        xy, (xlabel, ylabel) = _two_dims(z)
        points = ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, c=color, cmap="viridis" if color is not None else None)
        if color is not None:
            fig.colorbar(points, ax=ax)
        ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(f"{title} ({len(z)} rows)")
    return [_save(fig, Path(out_dir), "latent.png")]


def feature_gains(per_feature: Mapping[str, float], features: Sequence[str], kinds: Sequence[str],
                  mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    """Per feature, E_q[log p(y_i|z)] minus the expected log-likelihood of the column's own fit on its
    training rows (nats/row): -1/2 log(2 pi e sd^2) for a Gaussian column, p log p + (1-p) log(1-p) for a
    binary one. Units cancel: rescaling a column by c moves both terms by -log c. Columns of other kinds
    are left out."""
    columns = {n: (k, m, sd) for n, k, m, sd in zip(features, kinds, mean, std, strict=True)}
    gains = {}
    for name, recon in per_feature.items():
        kind, p, sd = columns.get(name, ("", math.nan, math.nan))
        if kind == "gaussian" and sd > 0:
            gains[name] = recon + 0.5 * math.log(2 * math.pi * math.e * sd**2)
        elif kind == "bernoulli" and 0 < p < 1:
            gains[name] = recon - (p * math.log(p) + (1 - p) * math.log(1 - p))
    return gains


def per_feature_reconstruction(gains: Mapping[str, float], out_dir: Path, total: int | None = None) -> list[Path]:
    """Bars of feature_gains: what the latent explains of each column, least first."""
    items = sorted(gains.items(), key=lambda kv: kv[1])[:MAX_BARS]
    total = len(gains) if total is None else total
    fig = Figure(figsize=(7, 1.5 + 0.25 * len(items)), layout="constrained")
    ax = fig.subplots()
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
    ax.margins(y=0.01)
    shown = "" if len(items) == total else f", the {len(items)} lowest of {total}"
    ax.set(xlabel="reconstruction minus the column's own Gaussian (nats / row)",
           title=f"per-feature reconstruction beyond each column's marginal fit{shown}")
    return [_save(fig, Path(out_dir), "per_feature_reconstruction.png")]


def traversals(
    values: np.ndarray,
    features: Sequence[str],
    out_dir: Path,
    radius: float = 2.5,
    scale: Sequence[float] | np.ndarray | None = None,
) -> list[Path]:
    """Decoded means along each latent axis, values (K, steps, D) from vae.traversals.

    Shown as the change from the decoded mean at z = 0, in units of `scale` (e.g. the training
    standard deviations), so features of different units share an axis. Lines for few features,
    one heatmap (feature x step) per latent dimension for many.
    """
    values = np.asarray(values, dtype=float)
    k, steps, d = values.shape
    unit = np.asarray(scale, dtype=float) if scale is not None else np.ones(d)
    delta = (values - values[:, steps // 2 : steps // 2 + 1, :]) / np.where(unit > 0, unit, 1.0)
    axis = np.linspace(-radius, radius, steps)
    rows, cols = -(-k // 4), min(k, 4)  # up to four latent dimensions a row
    height = 3.5 if d <= MAX_LINE_FEATURES else max(3.5, 0.15 * d)
    fig = Figure(figsize=(4.5 * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ylabel = "change / training std" if scale is not None else "change in E[y|z]"
    for j, ax in enumerate(axes):
        if j >= k:
            ax.set_axis_off()
        elif d <= MAX_LINE_FEATURES:
            for i, name in enumerate(features):
                ax.plot(axis, delta[j, :, i], label=name)
            ax.set(title=f"z_{j}", xlabel=f"z_{j}", ylabel=ylabel)
        else:
            lim = float(np.abs(delta[j]).max()) or 1.0
            image = ax.imshow(delta[j].T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                              extent=(-radius, radius, d - 0.5, -0.5))
            ax.set(title=f"z_{j}", xlabel=f"z_{j}", ylabel="feature")
            ax.set_yticks(range(d), list(features), fontsize=6 if d > 30 else 8)
            fig.colorbar(image, ax=ax, label=ylabel)
    if d <= MAX_LINE_FEATURES:
        axes[0].legend(fontsize=7)
    return [_save(fig, Path(out_dir), "traversals.png")]


def model_figures(
    model: LoadedModel,
    history: pd.DataFrame,
    out_dir: Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    table: pd.DataFrame | None = None,
) -> list[Path]:
    """Loss curves and traversals always; per-feature bars with metrics; latent view with a table."""
    paths = loss_curves(history, out_dir, model.metadata.get("fit"))
    values = decode_traversals(model.vae).numpy()  # (K, steps, D)
    paths += traversals(values, model.schema.features, out_dir, scale=model.schema.std)
    if metrics and metrics.get("per_feature_reconstruction"):
        per_feature, schema = metrics["per_feature_reconstruction"], model.schema
        gains = feature_gains(per_feature, schema.features, model.vae.spec.kinds, schema.mean, schema.std)
        paths += per_feature_reconstruction(gains, out_dir, len(per_feature))
    if table is not None:
        rows = table if len(table) <= PLOT_ROWS else table.sample(PLOT_ROWS, random_state=0)
        z = embed(model.vae, model.features(rows, "table")).z.numpy()  # (N, K); text columns as level codes
        paths += latent_view(z, out_dir)
    return paths
