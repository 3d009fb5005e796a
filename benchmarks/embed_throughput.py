"""Batch embedding: rows/s and peak memory of `vaepipe embed` against a plain script, drift on and off.

The plain script is what a user would write by hand: pyarrow's iter_batches with its defaults ->
the encoder's posterior means under inference_mode -> a ParquetWriter. `vaepipe embed` does the
same work through the pipeline (schema check, id columns, one row group per batch, provenance,
and by default the drift check against the model's training distribution), with means only
(embed.score_samples=0); the IWAE scoring rate is measured on a separate table (--score-rows).

The model is the default one (the repository's params.yaml) with model.hidden_dims=[128,128] and
model.latent_dim=8, trained for one epoch on 20,000 rows from the generator of the embedded
tables (so nothing drifts). Every run is a fresh process at one torch thread, the whole command
timed from outside; its peak RSS is its own (VmHWM). The per-row rate of each kind comes from the
difference of the largest and the smallest table (start-up, imports and the model's load cancel).
Runs are interleaved (plain, drift off, drift on, for each size, REPEATS times) and the best time of
each kind and size is kept: the machine is shared, and its other load only ever adds time.
Tables are float32, written in row groups of 1Mi rows into a temporary folder deleted afterwards.

    python benchmarks/embed_throughput.py                                  # 200k and 2M rows x 64 columns
    python benchmarks/embed_throughput.py --rows 200000 2000000 20000000 --repeats 1
    python benchmarks/embed_throughput.py --score-rows 200000              # also the IWAE scoring rate
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

ROOT = Path(__file__).resolve().parents[1]
ROW_GROUP = 1 << 20
BATCH_ROWS = 65536  # embed.batch_rows's default; the plain script reads batches of the same size
MODEL_SETTINGS = ["model.hidden_dims=[128,128]", "model.latent_dim=8"]  # the model; params.yaml otherwise
KINDS = {"plain": "plain script", "off": "vaepipe, drift off", "on": "vaepipe, drift on"}


def write_table(path: Path, rows: int, cols: int, seed: int = 0) -> None:
    """rows x cols float32 with a 4-d latent structure (the same for every seed), plus an int64 row_id."""
    w = np.random.default_rng(12345).normal(size=(4, cols)).astype(np.float32)
    rng = np.random.default_rng(seed)
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
    from pipeline.stages.train import train_model as train

    table = root / "train.parquet"
    write_table(table, 20_000, cols, seed=1)
    params = load_params(ROOT / "params.yaml", ["data.id_columns=[row_id]", "train.epochs=1",
                                                "train.num_threads=1", *MODEL_SETTINGS])
    return train(table, root / "model", params).directory


def vaepipe_argv(model: str, table: str, out: str, drift: str, score_samples: int) -> list[str]:
    """`vaepipe embed` as a user runs it: the repository's params.yaml, its default drift check."""
    sets = ["data.id_columns=[row_id]", f"embed.score_samples={score_samples}", f"validate.drift={drift}"]
    return ["embed", model, table, out, "--params", str(ROOT / "params.yaml"), *(a for s in sets for a in ("--set", s))]


def child_vaepipe(model: str, table: str, out: str, drift: str, score_samples: int) -> None:
    from pipeline.cli import main

    code = main(vaepipe_argv(model, table, out, drift, score_samples))
    if code != 0:
        raise SystemExit(f"vaepipe embed exited {code}")


def child_plain(model: str, table: str, out: str) -> None:
    import torch

    from vae import load_model

    torch.set_num_threads(1)
    vae = load_model(Path(model), "cpu").eval()
    writer = None
    for batch in pq.ParquetFile(table).iter_batches(batch_size=BATCH_ROWS):
        df = batch.to_pandas()
        y = torch.from_numpy(df[list(vae.spec.names)].to_numpy(np.float32, copy=True))
        with torch.inference_mode():
            z = vae.encode(*vae.standardize(y)).mu.numpy()
        frame = pa.table({"row_id": df["row_id"].to_numpy(), **{f"z_{j}": z[:, j] for j in range(z.shape[1])}})
        writer = writer or pq.ParquetWriter(out, frame.schema)
        writer.write_table(frame)
    if writer is not None:
        writer.close()


def run_child(*args: str) -> dict[str, float]:
    """One fresh process; the whole command's wall-clock seconds and its peak RSS."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return {"seconds": seconds, **json.loads(out.stdout.strip().splitlines()[-1])}


def measure(kind: str, model: Path, table: Path, root: Path, score_samples: int = 0) -> dict[str, float]:
    out = root / f"out-{kind}.parquet"
    result = run_child(kind, str(model), str(table), str(out), str(score_samples))
    if kind == "on":
        from pipeline.stages.embed import read_drift

        result["drifted"] = sum(bool(d["drifted"]) for d in read_drift(out))
    out.unlink(missing_ok=True)
    return result


Runs = dict[tuple[int, str], dict[str, float]]  # (rows, kind) -> seconds, maxrss_mib, ...


def run_all(root: Path, model: Path, sizes: list[int], cols: int, repeats: int) -> Runs:
    """Best run of each (rows, kind), runs interleaved."""
    tables = {}
    for rows in sizes:
        tables[rows] = root / f"table-{rows}.parquet"
        t0 = time.perf_counter()
        write_table(tables[rows], rows, cols)
        print(f"{rows:>11,} rows x {cols} float32: {tables[rows].stat().st_size / 2**30:.2f} GiB, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    best: Runs = {}
    for r in range(repeats):
        for rows in sizes:
            for kind in KINDS:
                run = measure(kind, model, tables[rows], root)
                print(f"  run {r + 1}/{repeats} {rows:>11,} rows {KINDS[kind]:<19}: {run['seconds']:7.2f} s, "
                      f"peak RSS {run['maxrss_mib']:5.0f} MiB", flush=True)
                if (rows, kind) not in best or run["seconds"] < best[rows, kind]["seconds"]:
                    best[rows, kind] = run
    return best


def report(best: Runs, sizes: list[int]) -> None:
    small, large = min(sizes), max(sizes)
    print("\nbest of the runs; whole command (rows/s of the whole command, x the plain script's):")
    for rows in sizes:
        plain = best[rows, "plain"]["seconds"]
        cells = [f"{KINDS[k]} {best[rows, k]['seconds']:.2f} s ({rows / best[rows, k]['seconds']:,.0f}/s, "
                 f"{plain / best[rows, k]['seconds']:.2f}x)" for k in KINDS]
        print(f"{rows:>11,} rows: " + "; ".join(cells))
    if small == large:
        return
    rate = {k: (large - small) / (best[large, k]["seconds"] - best[small, k]["seconds"]) for k in KINDS}
    print(f"\nper-row rate, {large:,} minus {small:,} rows (start-up excluded):")
    for k in KINDS:
        rss = ", ".join(f"{best[rows, k]['maxrss_mib']:.0f}" for rows in sizes)
        print(f"  {KINDS[k]:<19}: {rate[k]:>9,.0f} rows/s  {rate[k] / rate['plain']:.2f}x the plain script   "
              f"peak RSS {rss} MiB")
    drifted = int(best[large, "on"].get("drifted", 0))
    print(f"  drift check: {drifted} column(s) drifted (the tables come from the model's training generator)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind per size (best kept)")
    parser.add_argument("--score-rows", type=int, default=0, help="rows of an IWAE scoring run (0: skip)")
    parser.add_argument("--score-samples", type=int, default=100)
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    sizes = sorted(set(args.rows))
    need = sum(sizes) * (args.cols * 4 + 8) * 1.1
    free = shutil.disk_usage(args.tmp).free
    if need > free:
        raise SystemExit(f"{args.tmp}: {free / 2**30:.1f} GiB free, the tables need {need / 2**30:.1f} GiB")
    root = Path(tempfile.mkdtemp(prefix="vaepipe-embed-bench-", dir=args.tmp))
    try:
        model = train_model(root, args.cols)
        report(run_all(root, model, sizes, args.cols, args.repeats), sizes)
        if args.score_rows > 0:
            table = root / "table-scores.parquet"
            write_table(table, args.score_rows, args.cols)
            r = measure("on", model, table, root, args.score_samples)
            print(f"with scores (IWAE, embed.score_samples={args.score_samples}), drift on: "
                  f"{args.score_rows / r['seconds']:,.0f} rows/s (whole command) on {args.score_rows:,} rows, "
                  f"peak RSS {r['maxrss_mib']:.0f} MiB")
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
    if kind == "plain":
        child_plain(model, table, out)
    else:
        child_vaepipe(model, table, out, "fail" if kind == "on" else "off", int(score_samples))
    print(json.dumps({"maxrss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
