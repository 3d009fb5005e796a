"""Random draws for tensors on one device from a generator that may live on another.

A torch.Generator draws only on its own device. The draws are made there and moved, so that a
CPU generator (a seed in the pipeline) gives the same rows whatever device the model is on, and
a device generator costs no copy. Without a generator: the global RNG of the target device.
"""

from __future__ import annotations

import torch


def _source(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return device if generator is None else generator.device


def standard_normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps ~ N(0, I) of shape on device."""
    return torch.randn(shape, generator=generator, device=_source(generator, device), dtype=dtype).to(device)


def uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """u ~ U(0, 1) of shape on device (float32)."""
    return torch.rand(shape, generator=generator, device=_source(generator, device)).to(device)
