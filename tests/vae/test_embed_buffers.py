"""vae.embed on the CPU (layers written into a Workspace's kept buffers, cache-sized blocks) gives
exactly the numbers of model.encode on the same rows, for every encoder vae.model builds."""

from __future__ import annotations

import pytest
import torch

import vae
from tests.vae.helpers import curved_rows
from vae.inference import Workspace, _cache_rows, _plain_cpu_mlp


def _model(**settings: object) -> vae.VAE:
    y = curved_rows(n=200, d=6)
    missing = "mask" if settings.pop("masked", False) else "reject"
    spec = vae.describe_table(y, missing=missing)  # type: ignore[arg-type]
    config = vae.ModelConfig(latent_dim=3, **settings)  # type: ignore[arg-type]
    with torch.no_grad():  # away from the linear start: every layer matters
        model = vae.VAE(spec, config, seed=1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def _reference(model: vae.VAE, y: torch.Tensor, rows: int) -> vae.Posterior:
    """model.encode in blocks of the embed path's size (the same matrix shapes)."""
    with torch.inference_mode():
        parts = [model.encode(*model.standardize(y[i : i + rows])) for i in range(0, y.shape[0], rows)]
    return vae.Posterior(torch.cat([p.mu for p in parts]), torch.cat([p.logvar for p in parts]))


@pytest.mark.parametrize("settings", [
    {"hidden_dims": (16, 16)},  # the default shape: an MLP with a linear path
    {"hidden_dims": (16,), "linear_path": False},
    {"hidden_dims": ()},  # affine
    {"hidden_dims": (8, 8), "activation": "tanh"},
    {"hidden_dims": (8,), "activation": "silu"},
    {"hidden_dims": (8,), "activation": "elu"},
    {"hidden_dims": (8, 8), "masked": True},
], ids=["mlp", "no-linear-path", "affine", "tanh", "silu", "elu", "masked"])
def test_the_buffered_path_gives_encode_s_numbers(settings: dict[str, object]) -> None:
    model = _model(**settings)
    assert _plain_cpu_mlp(model)
    y = curved_rows(n=1500, d=6, seed=3)
    if model.masked:
        y[::7, 2] = float("nan")
    rows = min(_cache_rows(model), 500)
    want = _reference(model, y, rows)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the buffers
        got = vae.embed(model, y, with_variance=True, batch_rows=rows, workspace=ws)
        assert got.logvar is not None
        assert torch.equal(got.z, want.mu) and torch.equal(got.logvar, want.logvar)
    # column-major rows (a pandas/Parquet batch) are standardized into a column-major buffer, as
    # model.standardize allocates it: the same numbers as encode on them (BLAS may round the
    # transposed product otherwise than the row-major one)
    columns = y.T.contiguous().T
    assert columns.stride() == (1, y.shape[0])
    got = vae.embed(model, columns, batch_rows=rows, workspace=ws).z
    assert torch.equal(got, _reference(model, columns, rows).mu)
    torch.testing.assert_close(got, want.mu, rtol=1e-6, atol=1e-6)
    # the result owns its memory: a later call does not change it
    first = vae.embed(model, y[:300], batch_rows=rows, workspace=ws).z
    kept = first.clone()
    vae.embed(model, y[300:], batch_rows=rows, workspace=ws)
    assert torch.equal(first, kept)


def test_blocks_do_not_change_the_numbers_beyond_rounding() -> None:
    """embed.batch_rows no longer sets the CPU's block: results agree across batch sizes."""
    model = _model(hidden_dims=(64, 64))
    y = curved_rows(n=5000, d=6, seed=4)
    whole = _reference(model, y, 5000).mu
    for rows in (7, 4096, 65536):
        torch.testing.assert_close(vae.embed(model, y, batch_rows=rows).z, whole, rtol=1e-6, atol=1e-6)


def test_the_block_keeps_the_widest_layer_near_one_mebibyte() -> None:
    assert _cache_rows(_model(hidden_dims=(128, 128))) == 2048
    assert _cache_rows(_model(hidden_dims=(4096,))) == 256
    assert _cache_rows(_model(hidden_dims=())) == (1 << 18) // 6  # 2 x latent_dim outputs


def test_other_encoders_take_the_module_path() -> None:
    model = _model(hidden_dims=(8,)).double()
    assert not _plain_cpu_mlp(model)
    y = curved_rows(n=50, d=6)
    with torch.inference_mode():
        want = model.encode(*model.standardize(y)).mu.float()
    assert torch.equal(vae.embed(model, y).z, want)


def test_a_workspace_buffer_grows_and_keeps_its_layout() -> None:
    ws = Workspace()
    a = ws.buffer(0, 10, 4)
    assert a.shape == (10, 4) and a.is_contiguous()
    assert ws.buffer(0, 6, 4).data_ptr() == a.data_ptr()  # smaller: the same memory
    assert ws.buffer(0, 20, 4).shape == (20, 4)  # larger: grown
    c = ws.buffer(1, 10, 4, column_major=True)
    assert c.shape == (10, 4) and c.stride() == (1, 10)
    assert ws.buffer(1, 5, 4, column_major=True).stride() == (1, 10)
