"""The Gaussian VAE: an MLP (or affine) encoder q(z|y) and a Gaussian/Bernoulli decoder p(y|z)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from vae.config import ModelConfig
from vae.draws import standard_normal, uniform
from vae.marginal import MarginalTransform
from vae.noise import NoiseCovariance, gaussian_cells
from vae.table import TableSpec

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}
LOG_2PI = math.log(2 * math.pi)
SQRT_12 = math.sqrt(12.0)


def resolution_floor(spec: TableSpec) -> torch.Tensor:
    """(D,) the least noise std of each column on the standardized scale: h_j / sqrt(12) / s_j.

    A value recorded on a grid of step h_j (rounded, counted, a few levels) carries a rounding
    error of std h_j / sqrt(12) at least, whatever else is known of the row. Without this floor
    the noise of a column that is constant within a cluster of training rows (a pixel always 0)
    shrinks to model.min_sigma, and a held-out row one step off scores -1e5 nats: the floor caps
    the density at a value (log p <= 0.32 - log h_j per cell) and the cost of such a row. Columns
    of all-distinct values, binary columns and models saved before it have none.
    """
    if len(spec.resolution) != spec.n_features:
        return torch.zeros(spec.n_features)
    step = torch.tensor(spec.resolution, dtype=torch.float64)
    return (step / SQRT_12 / torch.tensor(spec.scale, dtype=torch.float64)).float()


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with an activation between them, none after the last (affine if 2 sizes)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Posterior:
    mu: torch.Tensor  # (B, K)
    logvar: torch.Tensor  # (B, K)


@dataclass(frozen=True)
class DecoderOut:
    loc: torch.Tensor  # (..., D) Gaussian means (standardized scale) or Bernoulli logits
    sigma: torch.Tensor  # (..., D) or broadcastable (D,) / (1,): Gaussian std, standardized scale
    scale_tril: torch.Tensor | None = None  # (G, G) Cholesky factor of the Gaussian columns' noise
    log_scale: torch.Tensor | None = None  # (..., G) model.noise_by_z: noise L L^T scaled to D L L^T D, D = exp
    logits: torch.Tensor | None = None  # (..., L) the categorical columns' level logits, column after column


LOGVAR_LIMIT = 30.0  # |log sigma^2| of q(z|y): see Encoder.forward


class Encoder(nn.Module):
    """mu, logvar = MLP(x) + (A x + b): the linear path starts at the closed-form posterior."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], latent_dim: int, activation: str, linear_path: bool):
        super().__init__()
        self.net = mlp([n_in, *hidden, 2 * latent_dim], activation)
        self.linear = nn.Linear(n_in, 2 * latent_dim) if hidden and linear_path else None

    def forward(self, x: torch.Tensor) -> Posterior:
        h = self.net(x) if self.linear is None else self.net(x) + self.linear(x)
        mu, logvar = h.float().chunk(2, dim=-1)
        # exp(logvar) overflows float32 beyond 88.7 (an extreme row: an infinite KL, z and a NaN step);
        # the bound is far outside any posterior a table gives (a variance of 1e13 standardized units)
        return Posterior(mu, logvar.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT))


class Decoder(nn.Module):
    """Means MLP(z) + (C z + v); the noise per decoder_variance, in the likelihood's units.

    noise_scale (D,) maps the noise parameters to the standardized scale the density is computed
    on: 1 with data.standardize; without it the noise lives in the table's units, parameterized
    in multiples of `noise_unit` (the RMS column std) so that its parameters stay O(1):
    noise_scale_j = noise_unit / s_j, and min_sigma, fixed_sigma (table units) divide by noise_unit.
    Every noise std is at least its column's floor: model.min_sigma or the column's recording
    resolution (`resolution`, (D,) standardized scale; see resolution_floor), whichever is larger.
    """

    fixed_sigma: torch.Tensor
    sigma_floor: torch.Tensor
    noise_scale: torch.Tensor
    gauss_index: torch.Tensor
    noise_gate: torch.Tensor  # model.noise_by_z only

    def __init__(self, n_out: int, config: ModelConfig, noise_scale: torch.Tensor, gaussian: torch.Tensor,
                 noise_unit: float = 1.0, resolution: torch.Tensor | None = None, n_logits: int = 0):
        """n_out: the columns (D); n_logits: the levels of the categorical columns, all together
        (their logits follow the D means in the network's output, before any noise head)."""
        super().__init__()
        self.mode = config.decoder_variance
        self.min_sigma = config.min_sigma / noise_unit
        floor = torch.full((n_out,), self.min_sigma)  # in the noise's parameter units
        if resolution is not None:
            floor = torch.maximum(floor, resolution / noise_scale)
        hetero = self.mode == "heteroscedastic"
        n_gauss = int(gaussian.sum())
        self.by_z = config.noise_by_z and self.mode in ("full", "lowrank") and n_gauss > 0
        # noise outputs of the network after the means and logits: s(z) (heteroscedastic) or log D(z) (by_z)
        self.n_loc, self.n_logits, self.n_head = n_out, n_logits, n_out if hetero else n_gauss if self.by_z else 0
        self.n_out = n_out + n_logits  # means and logits: what the linear path adds to
        self.net = mlp([config.latent_dim, *config.hidden_dims, self.n_out + self.n_head], config.activation)
        self.linear = nn.Linear(config.latent_dim, self.n_out) if config.hidden_dims and config.linear_path else None
        n_sigma = {"shared": 1, "per_feature": n_out}.get(self.mode, 0)
        # softplus(raw) + min_sigma = 1 at start: unit variance on the standardized scale
        start = math.log(math.expm1(max(1.0 - self.min_sigma, 1e-6)))
        self.raw_sigma = nn.Parameter(torch.full((n_sigma,), start)) if n_sigma else None
        if self.by_z:  # 0 until training opens the head; saved with the weights
            self.register_buffer("noise_gate", torch.zeros(()))
        self.noise = (
            NoiseCovariance(n_gauss, self.mode, config.noise_rank, floor[gaussian])
            if self.mode in ("full", "lowrank") else None
        )
        self.register_buffer("sigma_floor", floor, persistent=False)
        self.register_buffer("fixed_sigma", torch.tensor([config.fixed_sigma / noise_unit]), persistent=False)
        self.register_buffer("noise_scale", noise_scale, persistent=False)
        self.unit_noise = bool((noise_scale == 1).all())
        self.register_buffer("gauss_index", torch.nonzero(gaussian).flatten(), persistent=False)

    def forward(self, z: torch.Tensor) -> DecoderOut:
        out = self.net(z)
        if self.linear is not None:  # the linear path adds to the means, not to a noise head
            lin = self.linear(z)
            out = torch.cat([out[..., : self.n_out] + lin, out[..., self.n_out :]], dim=-1) if self.n_head else out + lin
        out = out.float()
        if not self.n_logits:
            return self._heads(out)
        logits = out[..., self.n_loc : self.n_out]
        rest = torch.cat([out[..., : self.n_loc], out[..., self.n_out :]], dim=-1) if self.n_head else out[..., : self.n_loc]
        return replace(self._heads(rest), logits=logits)

    def _heads(self, out: torch.Tensor) -> DecoderOut:
        """The means (D) and the noise head of out."""
        if self.noise is not None:
            base = self.noise.cholesky()  # the noise's parameter units
            tril = base if self.unit_noise else self.noise_scale[self.gauss_index, None] * base
            if not self.by_z:
                return DecoderOut(out, self.noise_scale, tril)
            loc, log_scale = out.split([self.n_loc, self.n_head], dim=-1)
            # each conditional std of D Sigma D is D_jj L_jj (its Cholesky factor is D L): floor it
            # as L_jj is, or a density on rounded values grows without bound. noise_scale
            # multiplies both sides alike; L_jj >= its floor makes the bound <= 0, so a closed
            # head (log D = 0) is left exactly as it is
            floor = (self.noise.floor / base.diagonal()).log()
            return DecoderOut(loc, self.noise_scale, tril, torch.maximum(log_scale * self.noise_gate, floor))
        if self.mode == "heteroscedastic":
            loc, raw = out.chunk(2, dim=-1)
            return DecoderOut(loc, self._scaled(F.softplus(raw) + self.sigma_floor))
        if self.mode == "per_feature" and self.raw_sigma is not None:
            # a floor added, not a clamp: no column's gradient stops at its floor
            return DecoderOut(out, self._scaled(F.softplus(self.raw_sigma) + self.sigma_floor))
        # fixed, shared: one std for every column, lifted to a column's floor where that is higher
        # (the shared std gets its gradient from the other columns)
        sigma = self.fixed_sigma if self.raw_sigma is None else F.softplus(self.raw_sigma) + self.min_sigma
        return DecoderOut(out, self._scaled(torch.maximum(sigma, self.sigma_floor)))

    def _scaled(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma if self.unit_noise else sigma * self.noise_scale


class VAE(nn.Module):
    """Takes rows in the table's original units; scaling, masks and the Jacobian stay inside.

    Networks always see standardized cells x = (y - loc) / scale; data.standardize only chooses
    the units the decoder noise is parameterized in (see Decoder), so p(y) is the same family
    of densities in the table's units whether or not the encoder's inputs were scaled.
    """

    loc: torch.Tensor  # (D,) buffers, saved in the state_dict
    scale: torch.Tensor
    gaussian: torch.Tensor
    cell_const: torch.Tensor
    cat_index: torch.Tensor  # (C,) buffers of the categorical and log columns, not saved
    cat_offset: torch.Tensor
    cat_pad: torch.Tensor
    cat_valid: torch.Tensor
    cat_sizes: torch.Tensor
    log_mask: torch.Tensor

    def __init__(self, spec: TableSpec, config: ModelConfig, seed: int | None = None):
        """seed: initial weights from this seed (the global RNG is left untouched); None: global RNG."""
        super().__init__()
        self.spec, self.config = spec, config
        d = spec.n_features
        self.masked = spec.missing == "mask"
        gauss = torch.tensor([k == "gaussian" for k in spec.kinds])
        bern = torch.tensor([k == "bernoulli" for k in spec.kinds])
        cat = [j for j, k in enumerate(spec.kinds) if k == "categorical"]
        sizes = [len(spec.levels_of(j)) for j in cat]
        n_levels = sum(sizes)
        scale = torch.tensor(spec.scale, dtype=torch.float32)
        # without standardization the noise is learned in the table's units (see Decoder)
        unit = 1.0 if spec.standardized or not bool(gauss.any()) else float(scale[gauss].pow(2).mean().sqrt())
        noise_scale = torch.ones(d) if spec.standardized else torch.where(gauss, unit / scale, 1.0)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            # inputs: the D standardized cells (a categorical column's cell at 0), then the one-hot
            # levels of the categorical columns, then (data.missing: mask) the D-column mask
            n_in = d + n_levels + (d if self.masked else 0)
            self.encoder = Encoder(n_in, config.hidden_dims, config.latent_dim, config.activation, config.linear_path)
            self.decoder = Decoder(d, config, noise_scale, gauss, unit, torch.where(gauss, resolution_floor(spec), 0.0),
                                   n_logits=n_levels)
        # real columns through a learned monotone map first (model.marginal_units; vae.marginal)
        self.marginal = MarginalTransform(d, config.marginal_units) if config.marginal_units and gauss.any() else None
        self.all_gaussian, self.all_bernoulli = bool(gauss.all()), bool(bern.all())
        self.any_gaussian, self.n_levels = bool(gauss.any()), n_levels
        self.register_buffer("loc", torch.tensor(spec.loc, dtype=torch.float32))
        self.register_buffer("scale", scale)
        self.register_buffer("gaussian", gauss)
        # per-cell constant of log N in original units: -1/2 log 2pi - log s_j (change of variables)
        self.register_buffer("cell_const", torch.where(gauss, -0.5 * LOG_2PI - scale.log(), 0.0))
        # categorical columns (not saved with the weights: they follow from the table spec)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        width = max(sizes, default=0)
        pad = torch.tensor([[o + min(i, n - 1) for i in range(width)] for o, n in zip(offsets, sizes, strict=True)],
                           dtype=torch.long).reshape(len(cat), width)
        valid = torch.tensor([[i < n for i in range(width)] for n in sizes], dtype=torch.bool).reshape(len(cat), width)
        self.register_buffer("cat_index", torch.tensor(cat, dtype=torch.long), persistent=False)  # (C,)
        self.register_buffer("cat_offset", torch.tensor(offsets, dtype=torch.long), persistent=False)  # (C,)
        self.register_buffer("cat_pad", pad, persistent=False)  # (C, Lmax) positions in the logits
        self.register_buffer("cat_valid", valid, persistent=False)  # (C, Lmax) which are levels
        self.register_buffer("cat_sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)  # (C,)
        # model.log_columns: these cells enter as log y, and the density has the Jacobian -log y
        self.register_buffer("log_mask", torch.tensor([spec.is_log(j) for j in range(d)], dtype=torch.bool),
                             persistent=False)
        self.any_log = bool(self.log_mask.any())

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def transform(self, y: torch.Tensor) -> torch.Tensor:
        """y with the log-scale columns as log y (the others as they are)."""
        if not self.any_log:
            return y
        mask = self.log_mask.to(y.device)
        return torch.where(mask, y.clamp_min(torch.finfo(y.dtype).tiny).log(), y)

    def cpu_transform(self, y: torch.Tensor) -> torch.Tensor:
        """transform() of rows on the CPU (any dtype), whatever the model's device."""
        if not self.any_log:
            return y
        return torch.where(self.log_mask.cpu(), y.clamp_min(torch.finfo(y.dtype).tiny).log(), y)

    def standardize(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, D) original units -> (scaled rows with missing cells at 0, observed mask or None)."""
        x = (self.transform(y) - self.loc) / self.scale
        if not self.masked:
            return x, None
        mask = ~torch.isnan(x)
        return torch.where(mask, x, 0.0), mask.to(x.dtype)

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.where(self.gaussian, x * self.scale + self.loc, x)
        return torch.where(self.log_mask, y.exp(), y) if self.any_log else y

    def on_grid(self, y: torch.Tensor) -> torch.Tensor:
        """Rows y (N, D) with each column recorded on a grid moved to its nearest grid value: one
        of its few training values (spec.support), or its lattice from the training minimum to
        the maximum (spec.lattice). The other columns are left as they are."""
        spec, y = self.spec, y.clone()
        for j, values in enumerate(spec.support):
            if values:
                v = torch.tensor(values, dtype=y.dtype, device=y.device)
                mid = (v[1:] + v[:-1]) / 2
                y[:, j] = v[torch.bucketize(y[:, j].contiguous(), mid)]
        for j, step in enumerate(spec.lattice):
            if step > 0:
                lo, hi = spec.minimum[j], spec.maximum[j]
                y[:, j] = (lo + step * torch.round((y[:, j] - lo) / step)).clamp(lo, hi)
        return y

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> Posterior:
        if self.marginal is not None:  # the encoder sees the columns as the decoder's Gaussian does
            x = torch.where(self.gaussian, self.marginal(x)[0], x)
        if self.n_levels:
            x = self._with_one_hot(x, mask)
        return self.encoder(x if mask is None else torch.cat([x, mask], dim=-1))

    def _with_one_hot(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(..., D + L): the cells with each categorical column's code replaced by 0, then the
        one-hot levels of those columns (all 0 for a missing cell)."""
        codes = self.codes(x)  # (..., C)
        hot = x.new_zeros((*x.shape[:-1], self.n_levels))
        on = x.new_ones(codes.shape) if mask is None else mask.index_select(-1, self.cat_index).to(x.dtype)
        hot.scatter_(-1, codes + self.cat_offset, on)
        return torch.cat([x.index_fill(-1, self.cat_index, 0.0), hot], dim=-1)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) the level codes of the categorical columns of x (a missing cell, 0 in x, reads 0)."""
        return x.index_select(-1, self.cat_index).long()

    def categorical_log_probs(self, out: DecoderOut) -> torch.Tensor:
        """(..., C, Lmax) log softmax of each categorical column's logits; -inf beyond its levels."""
        assert out.logits is not None
        padded = out.logits[..., self.cat_pad].masked_fill(~self.cat_valid, -math.inf)
        return F.log_softmax(padded, dim=-1)

    def _categorical_cells(self, x: torch.Tensor, out: DecoderOut) -> torch.Tensor:
        """(..., C) log p(level | z) of each categorical cell."""
        logp = self.categorical_log_probs(out)
        codes = self.codes(x).expand(*logp.shape[:-1])
        return logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)

    def decode(self, z: torch.Tensor) -> DecoderOut:
        return self.decoder(z)

    def log_px_z(self, x: torch.Tensor, out: DecoderOut, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-cell log p(y|z) in original units, (..., D); unobserved cells give 0.

        With a full noise covariance the cells are the chain rule's factors log p(y_j | y_<j, z)
        over the Gaussian columns in table order: they still add up to log p(y|z).
        """
        recorded, jacobian = x, None
        if self.marginal is not None:  # the Gaussian is on g(x); g'(x) is the change of variables
            g, log_dg = self.marginal(x)
            x, jacobian = torch.where(self.gaussian, g, x), torch.where(self.gaussian, log_dg, 0.0)
        if not self.any_gaussian:  # Bernoulli (categorical cells replaced below)
            cell = x * out.loc - F.softplus(out.loc)
        elif out.scale_tril is not None:
            cell = self._correlated_cells(x, out, mask)
        else:
            # log N(x; m, s^2) = -1/2 (x - m)^2 / s^2 - log s - 1/2 log 2pi (constant in cell_const)
            cell = -0.5 * ((x - out.loc) / out.sigma) ** 2 - out.sigma.log() + self.cell_const
            if not self.all_gaussian:
                cell = torch.where(self.gaussian, cell, x * out.loc - F.softplus(out.loc))
        if self.n_levels:
            cats = self._categorical_cells(x, out)
            cell = cell.expand(*cats.shape[:-1], -1).index_copy(-1, self.cat_index, cats)
        if jacobian is not None:
            cell = cell + jacobian
        if self.any_log:  # change of variables y -> log y: -log y = -(x s + m) on those columns
            cell = cell - torch.where(self.log_mask, recorded * self.scale + self.loc, 0.0)
        return cell if mask is None else cell * mask

    def _correlated_cells(self, x: torch.Tensor, out: DecoderOut, mask: torch.Tensor | None) -> torch.Tensor:
        assert out.scale_tril is not None
        if self.all_gaussian:
            resid = x - out.loc  # (..., D)
            return gaussian_cells(resid, out.scale_tril, mask, out.log_scale) + self.cell_const
        idx = self.decoder.gauss_index
        resid = (x - out.loc).index_select(-1, idx)  # (..., G)
        gmask = None if mask is None else mask.index_select(-1, idx)
        gauss = gaussian_cells(resid, out.scale_tril, gmask, out.log_scale) + self.cell_const[idx]
        cell = x * out.loc - F.softplus(out.loc)  # Bernoulli everywhere, Gaussian columns replaced
        return cell.index_copy(-1, idx, gauss.expand(*cell.shape[:-1], -1).contiguous())

    def mean_of(self, out: DecoderOut) -> torch.Tensor:
        """E[y|z] in original units: the Gaussian mean (with model.marginal_units the conditional
        median, g's inverse of it), the Bernoulli probability, or the code of the most probable
        level (a categorical column has no mean)."""
        real = self._untransformed(out.loc)
        x = real if self.all_gaussian else torch.where(self.gaussian, real, torch.sigmoid(out.loc))
        if self.n_levels:
            mode = self.categorical_log_probs(out).argmax(-1).to(x.dtype)
            x = x.index_copy(-1, self.cat_index, mode)
        return self.unstandardize(x)

    def _untransformed(self, t: torch.Tensor) -> torch.Tensor:
        """Gaussian-scale cells back through g's inverse (model.marginal_units); a monotone map
        keeps medians, so the Gaussian mean maps to the column's conditional median."""
        return t if self.marginal is None else torch.where(self.gaussian, self.marginal.inverse(t), t)

    def sample_from(self, out: DecoderOut, generator: torch.Generator | None) -> torch.Tensor:
        """A draw y ~ p(y|z) in original units (generator on any device: see vae.draws)."""
        noise = standard_normal(out.loc.shape, generator, out.loc.device)
        if out.scale_tril is None:
            gauss = out.loc + out.sigma * noise
        else:  # correlated noise L eps on the Gaussian columns
            idx = self.decoder.gauss_index
            corr = noise.index_select(-1, idx) @ out.scale_tril.T
            if out.log_scale is not None:
                corr = corr * out.log_scale.exp()
            gauss = out.loc.index_add(-1, idx, corr)
        gauss = self._untransformed(gauss)
        if self.all_gaussian:
            return self.unstandardize(gauss)
        u = uniform(out.loc.shape, generator, out.loc.device)
        flips = (u < torch.sigmoid(out.loc)).to(gauss.dtype)
        y = torch.where(self.gaussian, gauss, flips)
        if self.n_levels:  # inverse CDF of each categorical column at one more uniform draw
            cdf = self.categorical_log_probs(out).exp().cumsum(-1)  # (..., C, Lmax)
            v = uniform(cdf.shape[:-1], generator, cdf.device).unsqueeze(-1)
            drawn = torch.minimum((cdf < v).sum(-1), self.cat_sizes - 1).to(y.dtype)
            y = y.index_copy(-1, self.cat_index, drawn)
        return self.unstandardize(y)
