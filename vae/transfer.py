"""Rows to the device and results back without stalling it: pinned buffers, a copy stream.

On CUDA, batch i + 1 is copied into a pinned buffer and sent on a side stream while the device
computes batch i; results come back by non-blocking copies into pinned host memory and the host
waits once, at the end. On the CPU, or for rows already on the device, these are plain slices.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def device_batches(y: torch.Tensor, batch_rows: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows y[start : start + batch_rows] as float32 on device), in order."""
    n = y.shape[0]
    if device.type != "cuda" or y.device == device:
        for start in range(0, n, batch_rows):
            yield start, y[start : start + batch_rows].to(device, torch.float32)
        return
    yield from _pinned_batches(y, batch_rows, device)


def _pinned_batches(y: torch.Tensor, batch_rows: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    rows = min(batch_rows, y.shape[0])
    pinned = [torch.empty((rows, *y.shape[1:]), dtype=torch.float32, pin_memory=True) for _ in range(2)]
    sent: list[torch.cuda.Event | None] = [None, None]  # the copy that last read each buffer
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def send(start: int, k: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        part = y[start : start + batch_rows]
        event = sent[k]
        if event is not None:
            event.synchronize()  # that copy is long done: it was two batches ago
        buf = pinned[k][: part.shape[0]]
        buf.copy_(part)
        with torch.cuda.stream(copy_stream):
            on_device = buf.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        sent[k] = done
        return on_device, done

    starts = list(range(0, y.shape[0], batch_rows))
    upcoming = send(starts[0], 0) if starts else None
    for i, start in enumerate(starts):
        assert upcoming is not None
        batch, done = upcoming
        if i + 1 < len(starts):
            upcoming = send(starts[i + 1], (i + 1) % 2)  # the next copy overlaps this batch's compute
        compute.wait_event(done)
        batch.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        yield start, batch


class HostSink:
    """Collects per-batch results (rows, ...) into one host tensor; non-blocking from CUDA."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.cuda = device.type == "cuda"
        self.out = torch.empty((n, *shape), dtype=dtype, pin_memory=self.cuda)

    def put(self, start: int, values: torch.Tensor) -> None:
        self.out[start : start + values.shape[0]].copy_(values, non_blocking=self.cuda)

    def result(self) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()  # the one wait: every copy back has landed
        return self.out
