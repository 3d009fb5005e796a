"""Adam (Kingma & Ba 2015) over one flat buffer that holds every trainable parameter.

The model's parameters become views of one float32 vector, their gradients views of another, so
an update is one call of torch's fused Adam kernel on one tensor whatever the number of parameter
tensors (eight elementwise kernels before it: 208 us a step on 45,000 weights on a 2-vCPU CPU,
53 us now). torch.optim.Adam
runs a round of small kernels per tensor (18 in the default model: a fifth of a CPU step at batch
128), and its first step() imports torch._dynamo (2-4 s a process on a 2-vCPU machine, the most of
a small table's training). Gradient clipping is one norm of the flat gradient.

The step count and the learning rate are 0-d tensors on the parameters' device: a CUDA graph
replays the update as it is captured, and a new lr (the warm-up, a fall, a rollback) is written
into the tensor, so the graph stays valid. The math is torch.optim.Adam's (betas 0.9, 0.999,
eps 1e-8, no weight decay), by the kernel of its `fused=True` form.

With `average_steps` W > 0 it also keeps a running average of the weights (Polyak averaging in its
exponential form): after step n, ema <- ema + max(1/W, 1/n) (data - ema), the plain mean of the
steps so far until the window fills. `averaged()` lends the model those weights (to validate, to
keep). Adam's iterates jitter around the optimum at the scale of the lr; their average sits nearer,
and the epoch early stopping picks no longer depends on which side of it the last step landed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
_MOMENTS = ("exp_avg", "exp_avg_sq")
_MOMENTS_AND_AVERAGE = (*_MOMENTS, "ema")


class FlatAdam:
    """Adam on `params` (float32, one device), which it rewires: each `p.data` becomes a view of
    `data` and each `p.grad` a view of `grad` (backward accumulates into it in place; zero_grad
    zeroes it). Rewire again after moving the module: `.to()` replaces the views."""

    def __init__(self, params: list[nn.Parameter], lr: float, average_steps: int = 0):
        if not params:
            raise ValueError("FlatAdam got no parameters")
        device = params[0].device
        for p in params:
            if p.dtype != torch.float32 or p.device != device:
                raise ValueError(f"FlatAdam needs float32 parameters on one device, got {p.dtype} on {p.device}")
        self.params = params
        n = sum(p.numel() for p in params)
        self.data = torch.empty(n, dtype=torch.float32, device=device)
        self.grad = torch.zeros(n, dtype=torch.float32, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                self.data[offset : offset + k].copy_(p.reshape(-1))
                p.data = self.data[offset : offset + k].view_as(p)
                p.grad = self.grad[offset : offset + k].view_as(p)
                offset += k
        self.exp_avg = torch.zeros_like(self.data)
        self.exp_avg_sq = torch.zeros_like(self.data)
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.full((), lr, dtype=torch.float32, device=device)
        if average_steps < 0:
            raise ValueError(f"average_steps must be >= 0, got {average_steps}")
        self.ema = self.data.clone() if average_steps else None
        self._live = torch.empty_like(self.data) if average_steps else None  # averaged()'s copy of the weights
        self.ema_floor = 1.0 / average_steps if average_steps else 0.0

    def set_lr(self, lr: float) -> None:
        """From the next step on; no host sync, and a captured graph reads the new value."""
        self.lr.fill_(lr)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient by min(1, max_norm / (norm + 1e-6)) without a host read; the norm
        (NaN or inf when a gradient is). A factor of 1 leaves the gradient bit for bit."""
        norm = torch.linalg.vector_norm(self.grad)
        self.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        # torch.optim.Adam(fused=True)'s kernel: one pass over the four buffers (on the CPU a sixth
        # of the eight elementwise kernels it replaced), the lr and the step count read from tensors
        torch._fused_adam_([self.data], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.step_count],
                           amsgrad=False, lr=self.lr, beta1=BETA1, beta2=BETA2, weight_decay=0.0, eps=EPS,
                           maximize=False)
        if self.ema is not None:  # the weight a device tensor: a graph replays it as it is
            self.ema.lerp_(self.data, self.step_count.reciprocal().clamp_(min=self.ema_floor))

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The parameters hold the averaged weights inside the block (the live ones without an
        average), the live ones again after it."""
        if self.ema is None or self._live is None:
            yield
            return
        self._live.copy_(self.data)
        self.data.copy_(self.ema)
        try:
            yield
        finally:
            self.data.copy_(self._live)

    def release(self) -> None:
        """Drop the gradients' views (a trained model carries no gradient buffer)."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The live tensors (copy them to keep a snapshot): step, exp_avg, exp_avg_sq (and ema, the
        averaged weights, with average_steps)."""
        state = {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Copy a state into this optimizer's tensors, in place (a captured graph stays valid).

        Takes state_dict()'s form, or torch.optim.Adam's (checkpoints written before this class:
        per-parameter moments in the order of `params`, concatenated; a parameter without state
        has zero moments). A state without averaged weights (written without average_steps)
        starts the average at the current weights: load the model's weights first."""
        if "state" in saved:  # torch.optim.Adam's: {"state": {index: {...}}, "param_groups": [...]}
            saved = _from_torch_adam(saved, self.params)
        if self.ema is not None and "ema" not in saved:
            saved = {**saved, "ema": self.data}
        for key, target in (("step", self.step_count), *((m, getattr(self, m)) for m in _MOMENTS_AND_AVERAGE)):
            if target is None:  # the state's average, where this optimizer keeps none
                continue
            value = torch.as_tensor(saved[key])
            if value.shape != target.shape:
                raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, this model's "
                                 f"{tuple(target.shape)}: the checkpoint belongs to another model")
            target.copy_(value.to(target.device, target.dtype))


def _from_torch_adam(saved: dict[str, Any], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    if len(indices) != len(params):
        raise ValueError(f"the optimizer state holds {len(indices)} parameters, this model {len(params)}: "
                         "the checkpoint belongs to another model")
    state = saved["state"]
    moments = {
        m: torch.cat([state[i][m].detach().reshape(-1).cpu() if i in state else torch.zeros(p.numel())
                      for i, p in zip(indices, params, strict=True)]) for m in _MOMENTS
    }
    steps = [float(state[i]["step"]) for i in indices if i in state]
    return {"step": torch.tensor(max(steps, default=0.0)), **moments}
