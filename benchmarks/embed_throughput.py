"""Batch embedding: rows/s and peak memory of `vaepipe embed` against a plain script, by input size.

The plain script is what a user would write by hand: pyarrow's iter_batches with its defaults ->
the encoder's posterior means under inference_mode -> a ParquetWriter. `vaepipe embed` does the
same work through the pipeline (schema check, id columns, one row group per batch, provenance)
with means only (embed.score_samples=0); the IWAE scoring rate with scores on is measured on a
smaller table. Every run is a fresh subprocess at one torch thread; its peak RSS is its own
peak RSS (VmHWM). Tables are float32, written in row groups of 1Mi rows (pyarrow's default cap)
into a temporary folder that is deleted afterwards.

    python benchmarks/embed_throughput.py                         # 2M and 20M rows x 64 columns
    python benchmarks/embed_throughput.py --rows 2000000 --score-rows 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1 << 20
BATCH_ROWS = 65536


def write_table(path: Path, rows: int, cols: int, seed: int = 0) -> None:
    """rows x cols float32 with a 4-d latent structure, plus an int64 row_id, in row groups."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, cols)).astype(np.float32)
    fields = [pa.field("row_id", pa.int64())] + [pa.field(f"x{j}", pa.float32()) for j in range(cols)]
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            y = rng.standard_normal((n, 4), dtype=np.float32) @ w
            y += 0.3 * rng.standard_normal((n, cols), dtype=np.float32)
            arrays = [pa.array(np.arange(start, start + n))] + [pa.array(y[:, j]) for j in range(cols)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP)


def train_model(root: Path, cols: int) -> Path:
    from pipeline.config import load_params
    from pipeline.train import train_model as train

    table = root / "train.parquet"
    write_table(table, 20_000, cols, seed=1)
    params = load_params(None, ["data.id_columns=[row_id]", "train.epochs=2", "train.num_threads=1",
                                "train.batch_size=256", "embed.score_samples=10"])
    return train(table, root / "model", params).directory


def child_vaepipe(model: str, table: str, out: str, score_samples: int) -> dict[str, float]:
    import torch

    from pipeline import steps
    from pipeline.config import load_params

    torch.set_num_threads(1)
    params = load_params(None, ["data.id_columns=[row_id]", f"embed.score_samples={score_samples}",
                                f"embed.batch_rows={BATCH_ROWS}"])
    t0 = time.perf_counter()
    rows = steps.embed(model, Path(table), Path(out), params)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def child_plain(model: str, table: str, out: str) -> dict[str, float]:
    import torch

    from vae import load_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    vae = load_model(Path(model), "cpu").eval()
    writer, rows = None, 0
    for batch in pq.ParquetFile(table).iter_batches(batch_size=BATCH_ROWS):
        df = batch.to_pandas()
        y = torch.from_numpy(df[list(vae.spec.names)].to_numpy(np.float32, copy=True))
        with torch.inference_mode():
            z = vae.encode(*vae.standardize(y)).mu.numpy()
        frame = pa.table({"row_id": df["row_id"].to_numpy(), **{f"z_{j}": z[:, j] for j in range(z.shape[1])}})
        writer = writer or pq.ParquetWriter(out, frame.schema)
        writer.write_table(frame)
        rows += len(df)
    if writer is not None:
        writer.close()
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run_child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(kind: str, model: Path, table: Path, root: Path, score_samples: int = 0) -> dict[str, float]:
    out = root / f"out-{kind}.parquet"
    result = run_child(kind, str(model), str(table), str(out), str(score_samples))
    out.unlink(missing_ok=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--score-rows", type=int, default=200_000, help="rows of the scoring run (0: skip)")
    parser.add_argument("--score-samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind per size (best kept)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    need = max(args.rows) * (args.cols * 4 + 8) * 1.1
    free = shutil.disk_usage(args.tmp).free
    if need > free:
        raise SystemExit(f"{args.tmp}: {free / 2**30:.1f} GiB free, the largest table needs {need / 2**30:.1f} GiB")
    root = Path(tempfile.mkdtemp(prefix="vaepipe-embed-bench-", dir=args.tmp))
    try:
        model = train_model(root, args.cols)
        rss: dict[int, float] = {}
        for rows in args.rows:
            table = root / f"table-{rows}.parquet"
            t0 = time.perf_counter()
            write_table(table, rows, args.cols)
            print(f"{rows:>11,} rows x {args.cols} float32: table {table.stat().st_size / 2**30:.2f} GiB "
                  f"written in {time.perf_counter() - t0:.0f} s", flush=True)
            runs = {"vaepipe": [], "plain": []}
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(measure(kind, model, table, root))
            best = {k: max(v, key=lambda r: r["rows"] / r["seconds"]) for k, v in runs.items()}
            rate = {k: r["rows"] / r["seconds"] for k, r in best.items()}
            rss[rows] = max(r["maxrss_mib"] for r in runs["vaepipe"])
            print(f"  vaepipe embed (means only): {rate['vaepipe']:>10,.0f} rows/s   peak RSS "
                  f"{rss[rows]:7.0f} MiB\n  plain pyarrow script      : {rate['plain']:>10,.0f} rows/s   peak RSS "
                  f"{max(r['maxrss_mib'] for r in runs['plain']):7.0f} MiB\n"
                  f"  ratio vaepipe / plain     : {rate['vaepipe'] / rate['plain']:.2f}x", flush=True)
            table.unlink()
        if len(rss) > 1:
            print(f"peak RSS spread over sizes: {max(rss.values()) - min(rss.values()):.0f} MiB "
                  f"(largest {max(rss.values()):.0f} MiB)")
        if args.score_rows > 0:
            table = root / "table-scores.parquet"
            write_table(table, args.score_rows, args.cols)
            r = measure("vaepipe", model, table, root, args.score_samples)
            print(f"with scores (IWAE, embed.score_samples={args.score_samples}): {r['rows'] / r['seconds']:,.0f} rows/s "
                  f"on {args.score_rows:,} rows, peak RSS {r['maxrss_mib']:.0f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM (getrusage's ru_maxrss keeps the parent's across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB; not Linux


def child(argv: list[str]) -> None:
    kind, model, table, out, score_samples = argv
    result = child_plain(model, table, out) if kind == "plain" else child_vaepipe(model, table, out, int(score_samples))
    result["maxrss_mib"] = peak_rss_mib()
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
