"""How often train.grad_clip acts: the gradient norm of every step of a training run.

    python benchmarks/grad_norms.py --tables cells,randhie,diamonds --set train.epochs=30 --set train.refit=false

Trains the model of params.yaml (with the --set overrides) on the training rows of
benchmarks/quality.py's split of each table and prints the quantiles of the steps' global
gradient norms before clipping, and the share of steps train.grad_clip scaled down. A diagnostic:
each step's norm is read back to the host, which the training loop itself never does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.stages.train import train_model  # noqa: E402
from vae.adam import FlatAdam  # noqa: E402

QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def step_norms(name: str, overrides: list[str], seed: int) -> tuple[np.ndarray, float]:
    """The norms of every step of one training run on the table's training rows, and the clip."""
    norms: list[float] = []
    clip = FlatAdam.clip_grad_norm

    def recorded(self: FlatAdam, max_norm: float):  # type: ignore[no-untyped-def]
        norm = clip(self, max_norm)
        norms.append(float(norm))
        return norm

    split = quality.split_table(name, seed)
    params = load_params(None, overrides)
    FlatAdam.clip_grad_norm = recorded  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.parquet"
            split.train.to_parquet(path, index=False)
            train_model(path, Path(tmp) / "model", params)
    finally:
        FlatAdam.clip_grad_norm = clip  # type: ignore[method-assign]
    return np.array(norms), params.train.grad_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="cells,randhie,diamonds", help="comma-separated names of quality.py's tables")
    ap.add_argument("--set", action="append", default=["train.num_threads=1"], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (as quality.py's --seed)")
    args = ap.parse_args()
    print("| table | steps | " + " | ".join(f"norm q{q:g}" for q in QUANTILES) + " | share clipped |")
    print("|---" * (len(QUANTILES) + 3) + "|")
    for name in (n.strip() for n in args.tables.split(",")):
        norms, clip = step_norms(name, args.set, args.seed)
        cells = " | ".join(f"{np.quantile(norms, q):.4g}" for q in QUANTILES)
        print(f"| {name} | {len(norms)} | {cells} | {np.mean(norms > clip):.1%} (> {clip:g}) |", flush=True)


if __name__ == "__main__":
    main()
