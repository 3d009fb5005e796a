"""The ELBO's terms as every report names them, declared once.

The epoch sums of a fit (vae/step.py), EpochStats and history.csv, the MLflow curves, the loss-curve
panels, the progress lines and the metrics JSON all derive their names and order from TERMS;
tests/test_loss_terms.py fails where one of them does not, so a term added here shows up everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vae.elbo import LossTerms


@dataclass(frozen=True)
class Term:
    name: str  # LossTerms' and RowScores' attribute; history columns and MLflow curves <split>_<name>
    key: str  # the metrics JSON's key, Evaluation's field
    title: str  # the loss-curve panel's title
    label: str  # in the progress lines
    headline: bool = True  # in the log's progress lines and dvc.yaml's plots: recon is ELBO + KL


TERMS = (
    Term("elbo", "elbo", "ELBO", "ELBO"),
    Term("recon", "reconstruction", "reconstruction", "recon", headline=False),
    Term("kl", "kl", "KL", "KL"),
)
SPLITS = ("train", "val")  # the rows the epoch trained on; the held-out rows early stopping watches
# beside the terms: the validation rows' importance-weighted log-likelihood, the figure early stopping
# compares (train.val_iw_samples draws a row); EpochStats' field, history.csv's column, an MLflow curve
VAL_LOG_LIKELIHOOD = "val_log_likelihood"


def column(split: str, term: Term) -> str:
    """A term on a split: history.csv's column, EpochStats' field, the MLflow curve (train_elbo)."""
    return f"{split}_{term.name}"


def history_columns() -> tuple[str, ...]:
    """train_elbo, train_recon, train_kl, val_elbo, val_recon, val_kl: EpochStats' order."""
    return tuple(column(split, term) for split in SPLITS for term in TERMS)


def split_values(split: str, terms: LossTerms | None) -> dict[str, Any]:
    """EpochStats' fields of one split (floats) from the epoch's mean terms; None each when nothing was held out."""
    return {column(split, t): None if terms is None else float(getattr(terms, t.name)) for t in TERMS}
