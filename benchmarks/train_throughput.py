"""Training throughput of vae.fit against a plain hand-written torch loop doing the same math.

Both train the same VAE (encoder D-128-128-(2x8), decoder 8-128-128-D, ReLU, per-feature learned
decoder sigma = softplus(raw) + min_sigma, analytic KL, one reparameterized sample, Adam, batch 256)
on the same standardized synthetic table. The plain loop gathers one permutation per epoch and
slices contiguous batches (the fastest plain loop measured). fit does more per step: gradient
clipping, a finite check with rollback, KL warm-up, progress statistics and a resumable snapshot
per epoch. Runs are alternated in one process and the median rows/s of each is reported.

    python benchmarks/train_throughput.py                      # CPU, 1 thread
    python benchmarks/train_throughput.py --device cuda --bf16 # both loops under bf16 autocast
    python benchmarks/train_throughput.py --plain-adam fused   # the plain loop with torch's fused Adam
    python benchmarks/train_throughput.py --compile false      # fit's eager steps (train.compile false)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import vae
from vae.step import resolve_compile

LATENT, HIDDEN, MIN_SIGMA = 8, (128, 128), 1e-3


def synthetic_table(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """A nonlinear function of 8 latent variables plus noise, (rows, features)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, LATENT, generator=g)
    a = torch.randn(LATENT, 32, generator=g) / math.sqrt(LATENT)
    b = torch.randn(32, features, generator=g) / math.sqrt(32)
    return torch.tanh(z @ a) @ b + 0.5 * (z[:, :1] ** 2) + 0.1 * torch.randn(rows, features, generator=g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainVAE(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(features, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
            nn.Linear(HIDDEN[1], 2 * LATENT),
        )
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, HIDDEN[1]), nn.ReLU(), nn.Linear(HIDDEN[1], HIDDEN[0]), nn.ReLU(),
            nn.Linear(HIDDEN[0], features),
        )
        self.raw_sigma = nn.Parameter(torch.full((features,), math.log(math.expm1(1.0 - MIN_SIGMA))))


def plain_fit(x: torch.Tensor, epochs: int, batch: int, lr: float, bf16: bool, fused: bool = False) -> None:
    """The same math as vae.fit on already standardized rows x (N, D), nothing else.

    fused: Adam(fused=True) (one kernel a step, as vae.fit's flat Adam); False is torch's default, what a user writes.
    """
    device = x.device
    model = PlainVAE(x.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    n = x.shape[0]
    for _ in range(epochs):
        xs = x[torch.randperm(n, device=device)]
        for i in range(0, n, batch):
            xb = xs[i : i + batch]
            with autocast():
                mu, logvar = model.encoder(xb).float().chunk(2, dim=-1)
                z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
                m = model.decoder(z).float()
            sigma = F.softplus(model.raw_sigma) + MIN_SIGMA
            log_px = (-0.5 * ((xb - m) / sigma) ** 2 - sigma.log() - half_log_2pi).sum(-1)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)
            loss = -(log_px - kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def library_fit(y: torch.Tensor, spec: vae.TableSpec, cfg: vae.TrainConfig) -> None:
    # the plain loop's math: no linear path beside the MLPs; cfg.init "random" (torch's init)
    config = vae.ModelConfig(latent_dim=LATENT, hidden_dims=HIDDEN, likelihood="gaussian",
                             decoder_variance="per_feature", min_sigma=MIN_SIGMA, activation="relu",
                             linear_path=False)
    vae.fit(vae.VAE(spec, config), y, cfg)


def rows_per_second(run: Callable[[], None], rows: int, device: torch.device) -> tuple[float, float]:
    """(wall-clock rows/s, process-CPU-time rows/s); the second resists other load on a shared CPU."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    _sync(device)
    return rows / (time.perf_counter() - t0), rows / (time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each loop")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="both loops under bf16 autocast (CPU too); "
                        "otherwise both in fp32")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="fit's train.compile (auto: on here at 64 or more full batches an epoch); the plain "
                        "loop runs eagerly: false measures what fit's loop adds to the same eager math")
    parser.add_argument("--plain-adam", choices=["default", "fused"], default="default",
                        help="the plain loop's Adam: torch's default (what a user writes) or fused (few kernels, as fit's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    torch.manual_seed(0)

    y = synthetic_table(args.rows, args.features)
    spec = vae.describe_table(y, likelihood="gaussian")
    x = ((y - torch.tensor(spec.loc)) / torch.tensor(spec.scale)).to(device)  # what fit trains on
    y_dev = y.to(device)
    bf16 = args.bf16
    cfg = vae.TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, mc_samples=1,
                          val_fraction=0.0, device=args.device, num_threads=args.threads, init="random",
                          refit=False, precision="bf16" if bf16 else "fp32",
                          compile={"auto": "auto", "true": True, "false": False}[args.compile])
    rows = args.rows * args.epochs

    def plain() -> None:
        plain_fit(x, args.epochs, args.batch, args.lr, bf16, fused=args.plain_adam == "fused")

    def library() -> None:
        library_fit(y_dev, spec, cfg)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}  device {name}  threads {torch.get_num_threads()}  "
          f"table {args.rows}x{args.features}  batch {args.batch}  epochs/run {args.epochs}  "
          f"rounds {args.rounds}  bf16 {bf16}  plain Adam {args.plain_adam}  fit compiled "
          f"{resolve_compile(cfg.compile, device, args.rows, args.batch)}")
    rows_per_second(plain, rows, device)  # warm-up: allocator, kernels, caches
    rows_per_second(library, rows, device)
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "fit": []}
    for r in range(args.rounds):
        results["plain"].append(rows_per_second(plain, rows, device))
        results["fit"].append(rows_per_second(library, rows, device))
        print(f"round {r + 1}: plain {results['plain'][-1][0]:,.0f} rows/s  fit {results['fit'][-1][0]:,.0f} rows/s")
    plain_med, fit_med = (statistics.median(w for w, _ in results[k]) for k in ("plain", "fit"))
    print(f"median: plain {plain_med:,.0f} rows/s  fit {fit_med:,.0f} rows/s  ratio fit/plain {fit_med / plain_med:.3f}")
    if device.type == "cpu":  # with one thread, CPU time is what the loop itself costs
        plain_cpu, fit_cpu = (statistics.median(c for _, c in results[k]) for k in ("plain", "fit"))
        print(f"median by process CPU time: plain {plain_cpu:,.0f} rows/s  fit {fit_cpu:,.0f} rows/s  "
              f"ratio {fit_cpu / plain_cpu:.3f}")


if __name__ == "__main__":
    main()
