"""Batched inference: embeddings, reconstructions, new rows, traversals, anomaly thresholds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from vae.draws import standard_normal
from vae.errors import ConfigError
from vae.model import VAE, Posterior
from vae.transfer import HostSink, device_batches

# the activations of vae.model in place: the same numbers, written over their input
_IN_PLACE: dict[type[nn.Module], Callable[[torch.Tensor], object]] = {
    nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_,
    nn.SiLU: lambda h: F.silu(h, inplace=True), nn.ELU: lambda h: F.elu(h, inplace=True),
}


@dataclass(frozen=True)
class Embedding:
    z: torch.Tensor  # (N, K) posterior means, or one draw from q(z|y) with mode="sample"
    logvar: torch.Tensor | None  # (N, K) with with_variance=True


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


class Workspace:
    """Buffers of the encoder's layers, reused from block to block and from call to call.

    On the CPU a fresh output per layer and block costs an allocation (and, for large ones, page
    faults) that can exceed the layer's ReLU; writing every layer into a kept buffer, each
    activation in place, gives the same numbers without. Not thread-safe: one per stream.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, bool], torch.Tensor] = {}  # (rows, cols), or (cols, rows) column-major

    def buffer(self, key: int, rows: int, cols: int, column_major: bool = False) -> torch.Tensor:
        """(rows, cols) float32, each row contiguous (each column: column_major), contents
        undefined; kept under key and grown when too small."""
        shape = (cols, rows) if column_major else (rows, cols)  # as stored
        grows = 1 if column_major else 0  # the dimension of rows
        kept = self._buffers.get((key, column_major))
        if kept is None or kept.shape[grows] < rows or kept.shape[1 - grows] != cols:
            kept = self._buffers[key, column_major] = torch.empty(shape, dtype=torch.float32)
        return kept[:, :rows].T if column_major else kept[:rows]


def _plain_cpu_mlp(model: VAE) -> bool:
    """Whether _encode_into can run the encoder: float32 Linear layers and known activations, on the
    CPU, no categorical column (whose one-hot inputs model.encode builds) and no marginal map
    (model.marginal_units: model.encode maps the cells first)."""
    if model.n_levels or model.marginal is not None:
        return False
    layers = [*model.encoder.net, *([model.encoder.linear] if model.encoder.linear is not None else [])]
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    return (all(isinstance(m, nn.Linear) or type(m) in _IN_PLACE for m in layers)
            and all(m.bias is not None and m.weight.dtype == torch.float32 for m in linear)
            and linear[0].weight.device.type == "cpu")


def _cache_rows(model: VAE) -> int:
    """Rows per block on the CPU: the widest layer's (rows, width) float32 output about 1 MiB, so
    that each layer's output is still in cache when the next reads it (measured: a 65536-row
    batch in 2048-row blocks encodes in half the time of one block; same numbers)."""
    widest = max(m.out_features for m in model.encoder.net if isinstance(m, nn.Linear))
    return max(256, (1 << 18) // widest)


def _encode_into(model: VAE, rows: torch.Tensor, ws: Workspace) -> Posterior:
    """model.encode(*model.standardize(rows)), the same numbers, every layer written into ws."""
    n, layers = rows.shape[0], model.encoder.net
    if model.masked:
        x, mask = model.standardize(rows)
        x = torch.cat([x, mask], dim=-1) if mask is not None else x  # (B, 2D): the mask is an input
    else:
        # (B, D) in rows' memory order, as model.standardize allocates it (a Parquet batch: column-major)
        column_major = rows.stride(0) < rows.stride(1)
        src = model.transform(rows)  # log-scale columns as log y (rows itself when there are none)
        x = torch.sub(src, model.loc, out=ws.buffer(-1, n, rows.shape[1], column_major)).div_(model.scale)
    h = x
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):  # F.linear is this addmm
            h = torch.addmm(layer.bias, h, layer.weight.t(), out=ws.buffer(i, n, layer.out_features))
        else:
            _IN_PLACE[type(layer)](h)
    if (lin := model.encoder.linear) is not None:  # the linear path adds to the whole output
        h.add_(torch.addmm(lin.bias, x, lin.weight.t(), out=ws.buffer(len(layers), n, lin.out_features)))
    mu, logvar = h.chunk(2, dim=-1)  # (B, K) views of ws: copied out before the next batch
    return Posterior(mu, logvar)


@torch.inference_mode()
def embed(
    model: VAE,
    y: torch.Tensor,
    *,
    mode: Literal["mean", "sample"] = "mean",
    with_variance: bool = False,
    batch_rows: int = 4096,
    generator: torch.Generator | None = None,
    workspace: Workspace | None = None,
) -> Embedding:
    """Encode rows (N, D) in original units, on the model's device; results on the CPU.

    On the CPU the layers write into the buffers of workspace (a new one if None; pass the same
    one to every call of a stream), in blocks that fit a cache (_cache_rows). On CUDA, rows on
    the host travel through pinned buffers, each batch's copy overlapping the previous batch's
    encoding, and results come back without a wait per batch (vae.transfer).
    """
    model.eval()
    device, n, k = _device(model), y.shape[0], model.latent_dim
    zs = HostSink(n, (k,), torch.float32, device)
    logvars = HostSink(n if with_variance else 0, (k,), torch.float32, device)
    ws = (workspace or Workspace()) if _plain_cpu_mlp(model) else None
    # means in cache-sized blocks on the CPU (the same numbers); draws keep batch_rows' blocks,
    # so that a generator gives the rows it gave before
    step = batch_rows if ws is None or mode == "sample" else min(batch_rows, _cache_rows(model))
    for start, rows in device_batches(y, step, device):
        post = model.encode(*model.standardize(rows)) if ws is None else _encode_into(model, rows, ws)
        z = post.mu
        if mode == "sample":
            eps = standard_normal(z.shape, generator, z.device)
            z = z + (0.5 * post.logvar).exp() * eps
        zs.put(start, z)
        if with_variance:
            logvars.put(start, post.logvar)
    return Embedding(zs.result(), logvars.result() if with_variance else None)


@torch.inference_mode()
def reconstruct(model: VAE, y: torch.Tensor, batch_rows: int = 4096) -> torch.Tensor:
    """E[y | z = posterior mean] in original units, (N, D)."""
    model.eval()
    parts = []
    for i in range(0, y.shape[0], batch_rows):
        post = model.encode(*model.standardize(y[i : i + batch_rows].to(_device(model), torch.float32)))
        parts.append(model.mean_of(model.decode(post.mu)).cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.spec.n_features)


@torch.inference_mode()
def sample(
    model: VAE, n: int, *, generator: torch.Generator | None = None, batch_rows: int = 4096, noise: bool = True,
    on_grid: bool = False,
) -> torch.Tensor:
    """n new rows from p(z) p(y|z) in original units; noise=False returns E[y|z] instead.

    generator: on any device; a CPU one gives the same rows whatever the model's device (vae.draws).
    on_grid: columns recorded on a grid are drawn on it (VAE.on_grid): the model's density, read
    as the probability of the grid cell around each value, as the data were recorded."""
    model.eval()
    parts = []
    for i in range(0, n, batch_rows):
        m = min(batch_rows, n - i)
        z = standard_normal((m, model.latent_dim), generator, _device(model))
        out = model.decode(z)
        rows = model.sample_from(out, generator) if noise else model.mean_of(out)
        parts.append((model.on_grid(rows) if on_grid else rows).cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.spec.n_features)


@torch.inference_mode()
def traversals(model: VAE, steps: int = 7, radius: float = 2.5) -> torch.Tensor:
    """E[y|z] along each latent axis, other coordinates at 0: (K, steps, D) in original units."""
    model.eval()
    values = torch.linspace(-radius, radius, steps, device=_device(model))
    z = torch.zeros((model.latent_dim, steps, model.latent_dim), device=values.device)
    for j in range(model.latent_dim):
        z[j, :, j] = values
    return model.mean_of(model.decode(z)).cpu()


def tail_rows(n: int) -> int:
    """m, the lowest scores the exponential tail of `anomaly_threshold` is fitted to: min(10, n // 4),
    at least 3. Its scale is their mean excess, which varies by 1 / sqrt(m) (m = 10: 32 %), so
    fewer rows make the extrapolation erratic; more reach from the tail into the body, where the
    exponential form no longer holds: a quarter of the rows keeps the fit in the lower tail, and 10
    rows suffice for quantiles a few times below 1 / (n + 1)."""
    return max(3, min(10, n // 4))


def anomaly_threshold(scores: torch.Tensor, quantile: float) -> float:
    """Rows whose log-likelihood falls below this are anomalies: the `quantile` of new rows
    exchangeable with `scores` (N,), the held-out rows' log-likelihoods, fall below it.

    Plotting positions: a new row falls below the k-th least of n exchangeable scores with
    probability k / (n + 1), whatever their distribution; between those, linear in k (at p = q (n + 1)),
    and above the n-th the greatest. Below the least (q (n + 1) < 1, where an empirical quantile can
    only return the least score, which about 1 / (n + 1) of new rows fall below), an exponential
    lower tail (peaks over threshold, generalized Pareto shape 0; a log-density's lower tail is
    near exponential for light-tailed rows) fitted to the m = tail_rows(n) least scores:
    u = the (m + 1)-th least, sigma = the mean of u - s_(i) over the m least, and the threshold
    u - sigma * L with L = m * (((m + 1) / ((n + 1) q)) ** (1 / m) - 1). Where the tail is exactly
    exponential, the share of new rows below it is q on average over the held-out sample: given u,
    the excesses are i.i.d. exponential, so sigma / scale ~ Gamma(m, rate m) independent of u,
    P(new < u) ~ Beta(m + 1, n - m) has mean (m + 1) / (n + 1), and E[exp(-L sigma / scale)] =
    (1 + L / m) ** -m; L is where the product is q (log((m + 1) / ((n + 1) q)) for large m: the
    plain plug-in, which overshoots q by the spread of sigma, about 1.5 q at n = 50, q = 0.01).
    Fewer than 4 scores: the least.
    """
    if not 0 < quantile < 1:
        raise ConfigError(f"embed.anomaly_quantile is {quantile!r}; it must be in (0, 1)")
    s = scores.detach().to("cpu", torch.float64).flatten().sort().values
    n = s.shape[0]
    if n == 0:
        raise ConfigError("anomaly_threshold needs at least one score")
    position = quantile * (n + 1)  # 1-based, among the order statistics
    if abs(position - round(position)) < 1e-9 * (n + 1):
        position = float(round(position))
    if position >= n:
        return float(s[-1])
    if position >= 1:
        k = int(position)  # s_(k) is s[k - 1]
        return float(s[k - 1] + (position - k) * (s[k] - s[k - 1]))
    m = tail_rows(n)
    if n < m + 1:
        return float(s[0])
    u = s[m]
    sigma = float((u - s[:m]).mean())
    excess = m * (((m + 1) / position) ** (1 / m) - 1)
    return float(u) - sigma * excess
