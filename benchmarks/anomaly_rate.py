"""The share of breast_cancer's test rows that `embed` flags at embed.anomaly_quantile, over seeded splits.

    python benchmarks/anomaly_rate.py --splits 5 --set train.calibration_fraction=0.1
    python benchmarks/anomaly_rate.py --splits 5 --set train.calibration_fraction=0 --empirical

Each split: `prepare` (data.seed = the split), `train` with the --val table as the pipeline runs
it, the test rows scored as `embed` scores them (embed.score_samples, common draws). The rows the
threshold was placed on are captured once, so one training gives every quantile's rate.
--empirical: the plain empirical quantile (torch.quantile) of those rows, the rule before the
plotting positions. Prints one line per quantile: flagged / test rows pooled, per split.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import load_params
from pipeline.contract.model import load_model_dir
from pipeline.stages import train
from pipeline.stages.prepare import prepare
from vae import anomaly_threshold, load_checkpoint, score_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.01, 0.02, 0.1])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--empirical", action="store_true")
    ap.add_argument("--by-selection", action="store_true",
                    help="score the test rows with the selected model (before train.refit), from the checkpoint")
    args = ap.parse_args()
    captured: list[torch.Tensor] = []

    def capture(scores: torch.Tensor, quantile: float) -> float:
        captured.append(scores.detach().to(torch.float64).clone())
        return anomaly_threshold(scores, quantile)

    train.anomaly_threshold = capture  # type: ignore[assignment]
    rule = (lambda s, q: float(torch.quantile(s, q))) if args.empirical else anomaly_threshold
    flagged = {q: [] for q in args.quantiles}
    rows = []
    for split in range(args.splits):
        params = load_params(None, ["data.source=sklearn:breast_cancer", f"data.seed={split}", *args.set])
        with tempfile.TemporaryDirectory() as tmp:
            paths = prepare(params.data, params.train.val_fraction, Path(tmp) / "prepared")
            train.train_model(paths["train"], Path(tmp) / "model", params, val_path=paths["val"])
            model = load_model_dir(Path(tmp) / "model")
            test = pd.read_parquet(paths["test"])
            scorer = model.vae
            if args.by_selection:
                scorer = copy.deepcopy(model.vae)
                scorer.load_state_dict(load_checkpoint(Path(tmp) / "model").selected_model)
                scorer.eval()
        y = torch.from_numpy(test[list(model.schema.features)].to_numpy(dtype="float32", copy=True))
        ll = score_rows(scorer, y, params.embed.score_samples, params.embed.seed, common_eps=True).log_likelihood
        placed = model.metadata["anomaly"]
        print(f"split {split}: threshold on {placed['rows']} {placed['placed_on']}", flush=True)
        rows.append(len(test))
        for q in args.quantiles:
            flagged[q].append(int((ll < rule(captured[-1], q)).sum()))
    for q in args.quantiles:
        print(f"quantile {q}: {sum(flagged[q])} of {sum(rows)} test rows flagged "
              f"({100 * sum(flagged[q]) / sum(rows):.1f} %), per split {flagged[q]}")


if __name__ == "__main__":
    main()
