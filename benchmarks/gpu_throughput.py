"""GPU throughput of training and embedding, against a plain hand-written torch loop.

On a 2,000,000 x 64 table and the 64-128-128-(2x8) model of train_throughput.py (per-feature
decoder sigma, no linear path, torch's init: the plain loop's math), for fp32 and bf16 and
batches of 256, 4,096 and 65,536:
  - rows/s of the plain loop (torch's default Adam), of vae.fit (fused Adam, sync-free epoch) and
    of vae.fit with train.cuda_graph (each full-size step replayed from one CUDA graph);
  - the mean GPU utilization during each timed run (nvidia-smi, sampled every 0.2 s);
  - held-out IWAE log-likelihood after --quality-epochs of vae.fit at each batch, lr by the sqrt
    rule from batch 256 (train.lr_scaling sqrt), next to the speed;
  - embedding rows/s from a device tensor, from a host tensor (pinned, overlapped copies), and from
    a Parquet file (reader thread + embed), beside the Parquet reader alone.
Targets on one H100: fit >= 1.5x the plain loop at batch 256; >= 10M rows/s at 65,536; the
held-out log-likelihood at 65,536 within 0.5 nats/row of batch 256.

Without CUDA it runs a small CPU smoke version (20,000 rows, batches 256 and 4,096).

    python benchmarks/gpu_throughput.py                       # the H100 run (about 5 minutes)
    python benchmarks/gpu_throughput.py --rows 200000 --quality-epochs 1   # a quicker look
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from train_throughput import HIDDEN, LATENT, MIN_SIGMA, plain_fit, synthetic_table  # same folder

import vae
from pipeline.io.prefetch import prefetch

HELD_OUT = 20_000


class Utilization:
    """Mean GPU utilization (%) over a block, sampled by nvidia-smi in a thread; None if unknown."""

    def __init__(self, device: torch.device):
        self.cuda, self.samples, self.stop = device.type == "cuda", [], threading.Event()
        self.index = device.index or 0

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip()))
            except (OSError, ValueError, subprocess.SubprocessError):
                return

    def __enter__(self) -> Utilization:
        if self.cuda:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.stop.set()
            self.thread.join()

    @property
    def mean(self) -> str:
        return f"{sum(self.samples) / len(self.samples):.0f}%" if self.samples else "n/a"


def timed(run: Callable[[], object], rows: int, device: torch.device) -> tuple[float, str]:
    """(rows/s, mean GPU utilization) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with Utilization(device) as util:
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return rows / seconds, util.mean


def model_config() -> vae.ModelConfig:
    return vae.ModelConfig(latent_dim=LATENT, hidden_dims=HIDDEN, likelihood="gaussian", decoder_variance="per_feature",
                           min_sigma=MIN_SIGMA, activation="relu", linear_path=False)


def train_config(args: argparse.Namespace, batch: int, precision: str, graph: bool, epochs: int) -> vae.TrainConfig:
    return vae.TrainConfig(epochs=epochs, batch_size=batch, lr=args.lr, val_fraction=0.0, device=args.device,
                           init="random", refit=False, precision=precision, cuda_graph=graph,  # type: ignore[arg-type]
                           lr_scaling="sqrt", lr_base_batch=256, num_threads=args.threads)


def speed(args: argparse.Namespace, y: torch.Tensor, spec: vae.TableSpec, device: torch.device) -> None:
    x = ((y - torch.tensor(spec.loc)) / torch.tensor(spec.scale)).to(device)
    y_dev, rows = y.to(device), y.shape[0] * args.epochs
    print("\n== training rows/s (one run each, after a warm-up on a tenth of the table)")
    print(f"{'precision':>9} {'batch':>7} {'plain':>12} {'fit':>12} {'fit+graph':>12} {'fit/plain':>9} "
          f"{'graph/plain':>11}  GPU util plain/fit/graph")
    graphs = [False, True] if device.type == "cuda" else [False]
    for precision in ("fp32", "bf16"):
        for batch in args.batches:
            lr = args.lr * (batch / 256) ** 0.5  # the plain loop gets the same lr as fit's sqrt rule
            runs: dict[str, Callable[[torch.Tensor, torch.Tensor, int], object]] = {
                "plain": lambda xx, _yy, e, b=batch, lr=lr, p=precision: plain_fit(xx, e, b, lr, p == "bf16"),
            }
            for g in graphs:
                runs[f"fit{'+graph' if g else ''}"] = lambda _xx, yy, e, b=batch, g=g, p=precision: vae.fit(
                    vae.VAE(spec, model_config()), yy, train_config(args, b, p, g, e))
            out = {}
            for name, run in runs.items():
                warm = max(batch * 4, y.shape[0] // 10)
                run(x[:warm], y_dev[:warm], 1)  # kernels, cuBLAS handles, allocator
                out[name] = timed(lambda run=run: run(x, y_dev, args.epochs), rows, device)
            fit, plain = out["fit"][0], out["plain"][0]
            graph = out.get("fit+graph", (float("nan"), "n/a"))
            print(f"{precision:>9} {batch:>7} {plain:>12,.0f} {fit:>12,.0f} {graph[0]:>12,.0f} {fit / plain:>9.2f} "
                  f"{graph[0] / plain:>11.2f}  {out['plain'][1]}/{out['fit'][1]}/{graph[1]}")


def quality(args: argparse.Namespace, y: torch.Tensor, test: torch.Tensor, spec: vae.TableSpec,
            device: torch.device) -> None:
    print(f"\n== held-out log-likelihood after {args.quality_epochs} epochs (bf16 on CUDA, lr sqrt rule from "
          f"{args.lr:g} at batch 256, {test.shape[0]} held-out rows, IWAE K={args.iw_samples})")
    results = {}
    graph = device.type == "cuda"
    for batch in args.batches:
        model = vae.VAE(spec, model_config())
        cfg = train_config(args, batch, "auto", graph, args.quality_epochs)
        t0 = time.perf_counter()
        vae.fit(model, y.to(device), cfg)
        seconds = time.perf_counter() - t0
        ev = vae.evaluate(model, test.to(device), iw_samples=args.iw_samples, batch_rows=1024)
        results[batch] = ev.log_likelihood
        print(f"batch {batch:>7}  lr {cfg.effective_lr:.2e}  fit {seconds:7.1f} s  "
              f"({y.shape[0] * args.quality_epochs / seconds:>12,.0f} rows/s)  "
              f"log-likelihood {ev.log_likelihood:.3f} +- {ev.log_likelihood_stderr:.3f} nats/row")
    small, large = min(results), max(results)
    print(f"batch {large} minus batch {small}: {results[large] - results[small]:+.3f} nats/row (target >= -0.5)")


def embedding(args: argparse.Namespace, y: torch.Tensor, spec: vae.TableSpec, device: torch.device) -> None:
    model = vae.VAE(spec, model_config()).to(device)
    n, batch = y.shape[0], args.embed_batch
    print(f"\n== embedding rows/s (posterior means, batch {batch})")
    y_dev = y.to(device)
    vae.embed(model, y_dev[:batch], batch_rows=batch)  # warm-up
    for name, rows in (("from a device tensor", y_dev), ("from a host tensor", y)):
        rate, util = timed(lambda rows=rows: vae.embed(model, rows, batch_rows=batch), n, device)
        print(f"{name:<34} {rate:>14,.0f} rows/s  GPU util {util}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        pq.write_table(pa.table({f"x{j}": y[:, j].numpy() for j in range(y.shape[1])}), path, row_group_size=batch)

        def batches():
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch):
                yield torch.from_numpy(rb.to_pandas().to_numpy(dtype="float32", copy=True))

        def read_only() -> None:
            for _ in batches():
                pass

        def read_and_embed() -> None:
            for part in prefetch(batches()):
                vae.embed(model, part, batch_rows=batch)

        for name, run in (("Parquet reader alone", read_only), ("from Parquet (reader thread + embed)", read_and_embed)):
            rate, util = timed(run, n, device)
            print(f"{name:<34} {rate:>14,.0f} rows/s  GPU util {util}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--rows", type=int, default=2_000_000 if cuda else 20_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096, 65536] if cuda else [256, 4096])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed training run")
    parser.add_argument("--quality-epochs", type=int, default=3 if cuda else 1)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="at batch 256; other batches by the sqrt rule")
    parser.add_argument("--embed-batch", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=0 if cuda else 1, help="torch.set_num_threads; 0 = default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "quality", "embed"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    table = synthetic_table(args.rows + HELD_OUT, args.features)
    y, test = table[: args.rows], table[args.rows :]
    spec = vae.describe_table(y, likelihood="gaussian")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run: no CUDA)"
    print(f"torch {torch.__version__}  device {name}  table {args.rows}x{args.features}  batches {args.batches}  "
          f"epochs/run {args.epochs}")
    if "speed" not in args.skip:
        speed(args, y, spec, device)
    if "quality" not in args.skip:
        quality(args, y, test, spec, device)
    if "embed" not in args.skip:
        embedding(args, y, spec, device)


if __name__ == "__main__":
    main()
