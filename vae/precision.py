"""Numeric precision of training: bf16 autocast for the networks, fp32 for every log-density.

What bf16 costs is measured by vae.probe.precision_gap. This module imports nothing of vae but
its config: the model, the noise and the ELBO import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from vae.config import Precision

Resolved = Literal["fp32", "bf16"]


def resolve_precision(precision: Precision, device: torch.device) -> Resolved:
    """auto: bf16 on CUDA (tensor cores), fp32 on CPU (bf16 is slower there without AMX)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: Resolved, cache: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on the device, or nothing; cache=False inside CUDA graph capture."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off (a no-op when it is not on): densities, Cholesky factors and solves in fp32."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
