"""Tables and fault injection shared by the training tests (vae only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

import pytest
import torch

import vae
from vae.model import DecoderOut


def curved_rows(n: int = 300, d: int = 6, k: int = 2, seed: int = 0) -> torch.Tensor:
    """n rows of d columns: tanh of k latent directions, times 3, plus noise of std 0.1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    return torch.tanh(z @ torch.randn(k, d, generator=g)) * 3 + 0.1 * torch.randn(n, d, generator=g)


def inject_nan(monkeypatch: pytest.MonkeyPatch, model: vae.VAE, fails: Callable[[int], bool]) -> None:
    """Make the decoder return NaN means on the training calls (1-based) where fails(call)."""
    original, seen = model.decoder.forward, [0]

    def flaky(z: torch.Tensor) -> DecoderOut:
        out = original(z)
        if model.decoder.training:
            seen[0] += 1
            if fails(seen[0]):
                return replace(out, loc=out.loc * float("nan"))  # NaN with a gradient path
        return out

    monkeypatch.setattr(model.decoder, "forward", flaky)


class Interrupt(Exception):
    """Raised from on_checkpoint to stop a run at a checkpoint, as a killed process would."""


def without_seconds(history) -> list[dict]:
    """A run's history without its wall-clock column: what two runs of the same math share."""
    return [{k: v for k, v in asdict(h).items() if k != "seconds"} for h in history]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
