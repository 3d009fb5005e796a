"""Start training at the closed-form linear-Gaussian fit of the training rows.

The decoder's linear path and noise are set so that p(y) = N(v, C C^T + Psi) is the maximum-
likelihood fit of the decoder_variance family on the Gaussian columns: the full Gaussian (`full`),
factor analysis with latent_dim + noise_rank factors (`lowrank`), pPCA (`shared`, `fixed`: C only) or
factor analysis (`per_feature`, `heteroscedastic`). The encoder's linear path is set to that
model's exact posterior, made diagonal by rotating C (C R leaves C C^T unchanged), so the ELBO
equals log p(y) at the start; the MLPs' last layers start at zero (Tipping & Bishop 1999).
The fit is computed once on the CPU in float64, whatever the model's device; each result is then
moved to its parameter's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vae.model import VAE
from vae.noise import inverse_softplus

FA_ITERATIONS = 200  # EM steps of factor analysis (from the pPCA solution); cheap: (D, D) algebra


@dataclass(frozen=True)
class LinearGaussian:
    mean: torch.Tensor  # (G,) standardized scale
    weight: torch.Tensor  # (G, K) C, standardized scale, C^T Psi^{-1} C diagonal
    noise: torch.Tensor  # (G, G) Psi, standardized scale
    noise_factor: torch.Tensor | None  # (G, r) lowrank: Psi = diag + factor factor^T (parameter units)
    noise_units: torch.Tensor  # (G, G) Psi in the units of the noise's parameters (Decoder)


def _ppca(cov: torch.Tensor, k: int, sigma2: float | None, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U_k (L_k - s^2 I)^{1/2} and s^2 (the mean discarded eigenvalue unless given)."""
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    n, kk = cov.shape[0], min(k, cov.shape[0])
    if sigma2 is None:
        sigma2 = float(evals[kk:].mean()) if kk < n else 0.5 * float(evals[-1])
    sigma2 = max(sigma2, floor)
    w = evecs[:, :kk] * (evals[:kk] - sigma2).clamp_min(0).sqrt()
    return torch.cat([w, w.new_zeros(n, k - kk)], dim=1), torch.tensor(sigma2, dtype=cov.dtype)


def _factor_analysis(cov: torch.Tensor, w: torch.Tensor, psi: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EM for factor analysis on a sample covariance (Rubin & Thayer 1982)."""
    eye = torch.eye(w.shape[1], dtype=cov.dtype)
    for _ in range(FA_ITERATIONS):
        b = w.T / psi  # (K, G) C^T Psi^{-1}
        beta = torch.linalg.solve(eye + b @ w, b)  # E[z|x] = beta x
        ezz = eye - beta @ w + beta @ cov @ beta.T
        w = torch.linalg.solve(ezz, beta @ cov).T
        psi = (cov.diagonal() - (w @ beta @ cov).diagonal()).clamp_min(floor)
    return w, psi


def linear_gaussian_fit(model: VAE, y: torch.Tensor) -> LinearGaussian | None:
    """The closed-form fit of the model's family on the Gaussian columns of y (N, D), or None."""
    dec, cfg = model.decoder, model.config
    idx = dec.gauss_index.cpu()
    if idx.numel() == 0:
        return None
    y64 = model.cpu_transform(y.detach().to("cpu", torch.float64))
    x = (y64 - model.loc.double().cpu()) / model.scale.double().cpu()
    if model.marginal is not None:  # the Gaussian of g(x) (model.marginal_units), as the model's
        x = torch.where(model.gaussian.cpu(), model.marginal.map_cpu(x), x)
    x = x[:, idx]
    x = torch.nan_to_num(x, nan=0.0)  # missing cells at the mean: an approximate start
    mean = x.mean(0)
    ns = dec.noise_scale.double().cpu()[idx]  # noise parameter units -> standardized scale
    cov_u = torch.cov(x.T, correction=0).reshape(idx.numel(), idx.numel()) / (ns[:, None] * ns[None, :])
    k, floor, g = cfg.latent_dim, dec.min_sigma**2, idx.numel()  # min_sigma in the noise's parameter units
    factor = None
    if cfg.decoder_variance == "full":
        w, _ = _ppca(cov_u, k, None, floor)
        psi_u = cov_u - w @ w.T + floor * torch.eye(g, dtype=x.dtype)
    elif cfg.decoder_variance == "lowrank":  # factor analysis with latent_dim + noise_rank factors
        wr, s2 = _ppca(cov_u, k + cfg.noise_rank, None, floor)
        wr, psi = _factor_analysis(cov_u, wr, s2.expand(g).clone(), floor)
        w, factor = wr[:, :k], wr[:, k:]
        psi_u = torch.diag(psi) + factor @ factor.T
    elif cfg.decoder_variance in ("shared", "fixed"):
        w, s2 = _ppca(cov_u, k, float(dec.fixed_sigma) ** 2 if cfg.decoder_variance == "fixed" else None, floor)
        psi_u = s2 * torch.eye(g, dtype=x.dtype)
    else:
        w, s2 = _ppca(cov_u, k, None, floor)
        w, psi = _factor_analysis(cov_u, w, s2.expand(g).clone(), floor)
        psi_u = torch.diag(psi)
    w_x, psi_x = ns[:, None] * w, ns[:, None] * psi_u * ns[None, :]
    # rotate C so that C^T Psi^{-1} C is diagonal: the exact posterior is then a diagonal Gaussian
    evals, rot = torch.linalg.eigh(w_x.T @ torch.linalg.solve(psi_x, w_x))
    return LinearGaussian(mean, w_x @ rot, psi_x, factor, psi_u)


def _last(seq: nn.Sequential) -> nn.Linear:
    layer = seq[-1]
    assert isinstance(layer, nn.Linear)
    return layer


def has_linear_start(model: VAE) -> bool:
    """The closed-form start needs the decoder's and encoder's linear-Gaussian part: an affine model
    (hidden_dims []) or MLPs with model.linear_path."""
    return not model.config.hidden_dims or (model.decoder.linear is not None and model.encoder.linear is not None)


@torch.no_grad()
def init_linear_gaussian(model: VAE, y: torch.Tensor) -> LinearGaussian | None:
    """Set the linear paths and the noise of `model` to the closed-form fit of rows y (N, D)."""
    if not has_linear_start(model):
        raise ValueError("init_linear_gaussian needs an affine model or model.linear_path")
    fit = linear_gaussian_fit(model, y)
    if fit is None:  # no Gaussian column: nothing linear-Gaussian to start from
        return None
    _init_decoder(model, y, fit)
    _init_encoder(model, fit)
    return fit


def level_frequencies(model: VAE, y: torch.Tensor) -> list[torch.Tensor]:
    """Per categorical column of the model, the share of each level among the observed cells of
    y (N, D): float64, on the CPU, each at least 1e-12 (a level absent from these rows)."""
    y64 = y.detach().to("cpu", torch.float64)
    out = []
    for j, n in zip(model.cat_index.tolist(), model.cat_sizes.tolist(), strict=True):
        col = y64[:, j]
        counts = torch.bincount(col[~torch.isnan(col)].long(), minlength=n).double()
        out.append((counts / counts.sum().clamp_min(1)).clamp_min(1e-12))
    return out


def _init_decoder(model: VAE, y: torch.Tensor, fit: LinearGaussian) -> None:
    dec, d, k = model.decoder, model.spec.n_features, model.latent_dim
    idx = dec.gauss_index.cpu()
    n = dec.n_out  # means (D), then the categorical columns' logits
    weight, bias = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    weight[idx], bias[idx] = fit.weight, fit.mean
    binary = torch.tensor([kind == "bernoulli" for kind in model.spec.kinds])
    if bool(binary.any()):  # independent Bernoulli columns at their observed frequency
        p = torch.nanmean(y.detach().to("cpu", torch.float64)[:, binary], dim=0).clamp(1e-4, 1 - 1e-4)
        bias[:d][binary] = torch.log(p / (1 - p))
    # independent categorical columns at their level frequencies (logits log p, weights 0): with the
    # Gaussian part at its closed-form fit, p(y) is the full Gaussian times the frequencies, and
    # the exact posterior ignores the levels, so the encoder's one-hot weights start at 0 as well
    for off, freq in zip(model.cat_offset.tolist(), level_frequencies(model, y), strict=True):
        bias[d + off : d + off + freq.numel()] = freq.log()
    last = _last(dec.net)
    layer = dec.linear if dec.linear is not None else last
    if dec.linear is not None:
        last.weight.zero_()
        last.bias.zero_()
    layer.weight[:n].copy_(weight.to(layer.weight))
    layer.bias[:n].copy_(bias.to(layer.bias))
    if dec.by_z:  # D(z) = I at the start, and the head closed until training opens it
        last.weight[n:].zero_()
        last.bias[n:].zero_()
        dec.noise_gate.zero_()
    sigma_u = fit.noise_units.diagonal().sqrt()  # (G,) parameter units
    mode = dec.mode
    # what softplus(raw) is added to (Decoder.forward): the per-column floor, or for the one shared
    # std model.min_sigma (the column floors are a clamp there)
    floor = dec.min_sigma if mode in ("shared", "fixed") else dec.sigma_floor.double().cpu()[idx]  # (G,) parameter units
    raw = inverse_softplus((sigma_u - floor).clamp_min(1e-3 * floor))
    if mode == "heteroscedastic":
        last.weight[n:].zero_()
        last.bias[n:].index_copy_(0, idx.to(last.bias.device), raw.to(last.bias))
    elif mode == "per_feature" and dec.raw_sigma is not None:
        dec.raw_sigma.index_copy_(0, idx.to(dec.raw_sigma.device), raw.to(dec.raw_sigma))
    elif mode == "shared" and dec.raw_sigma is not None:
        dec.raw_sigma.fill_(float(raw.mean()))
    elif dec.noise is not None:
        if mode == "full":
            dec.noise.set_covariance(fit.noise_units)
        else:
            assert fit.noise_factor is not None
            dec.noise.set_covariance(torch.diag(fit.noise_units.diagonal() - fit.noise_factor.pow(2).sum(1)), fit.noise_factor)


def _init_encoder(model: VAE, fit: LinearGaussian) -> None:
    """q(z|x) = N(M^{-1} C^T Psi^{-1} (x - v), M^{-1}), M = I + C^T Psi^{-1} C (diagonal)."""
    enc, k = model.encoder, model.latent_dim
    idx = model.decoder.gauss_index.cpu()
    pw = torch.linalg.solve(fit.noise, fit.weight)  # (G, K) Psi^{-1} C
    m = 1.0 + (fit.weight * pw).sum(0)  # diag of M
    a = pw.T / m[:, None]  # (K, G)
    last = _last(enc.net)
    layer = enc.linear if enc.linear is not None else last
    if enc.linear is not None:
        last.weight.zero_()
        last.bias.zero_()
    weight = torch.zeros(layer.weight.shape, dtype=torch.float64)  # (2K, D or 2D) on the CPU, like the fit
    weight[:k, idx] = a
    layer.weight.copy_(weight.to(layer.weight))
    layer.bias.copy_(torch.cat([-(a @ fit.mean), -m.log()]).to(layer.bias))
