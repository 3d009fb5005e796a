"""Cost of the drift report in `vaepipe embed`: rows/s with validate.drift off against on.

    python benchmarks/embed_drift.py [--rows 500000] [--cols 32] [--rounds 3] [--score-samples 0]

Trains a small model on a synthetic table in a temporary folder, then embeds a second table of
ROWS rows from the same generator, alternating drift off and on in each round (one torch thread),
and prints the median rows/s of each and their ratio. score_samples 0 embeds posterior means only
(the cheapest embedding, where the drift statistics weigh most).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--score-samples", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.config import load_params
    from pipeline.contract.model import load_model_dir
    from pipeline.io.sources import synthetic_table
    from pipeline.stages import train
    from pipeline.stages.embed import embed_file, read_drift

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="vaepipe-drift-bench-"))
    params = load_params(None, ["data.id_columns=[row_id]", "model.hidden_dims=[32]", "model.latent_dim=4",
                                "train.epochs=3", "train.num_threads=1", f"embed.score_samples={args.score_samples}"])
    table = synthetic_table(args.rows + 5_000, args.cols, seed=0)  # one generator: training and new rows alike
    table.iloc[:5_000].to_parquet(work / "train.parquet", index=False)
    table.iloc[5_000:].to_parquet(work / "new.parquet", index=False)
    train.run(work / "train.parquet", work / "model", params)
    model = load_model_dir(work / "model")
    modes = {"off": None, "on": params.validate}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, drift in modes.items():
            t0 = time.perf_counter()
            embed_file(model, work / "new.parquet", work / f"out-{mode}.parquet", params.embed, drift=drift)
            seconds[mode].append(time.perf_counter() - t0)
    rate = {m: args.rows / statistics.median(s) for m, s in seconds.items()}
    drifted = [d["column"] for d in read_drift(work / "out-on.parquet") if d["drifted"]]
    print(f"{args.rows} rows x {args.cols} columns, score_samples {args.score_samples}, {args.rounds} rounds")
    print(f"drift off: {rate['off']:,.0f} rows/s   drift on: {rate['on']:,.0f} rows/s   "
          f"on/off: {rate['on'] / rate['off']:.2f}   drifted columns: {drifted or 'none'}")


if __name__ == "__main__":
    main()
