"""benchmarks/grad_norms.py: one norm per optimizer step, the norms clipping saw, and the
optimizer left as it was."""

from __future__ import annotations

import numpy as np

from benchmarks.grad_norms import step_norms
from vae.adam import FlatAdam


def test_one_norm_a_step_and_the_clip_restored():
    clip = FlatAdam.clip_grad_norm
    # wine's split: 142 training rows, 20 % calibration and 10 % validation leave 103: one step an epoch
    norms, limit = step_norms("wine", ["train.epochs=3", "train.refit=false", "train.grad_clip=2",
                                       "train.num_threads=1"], seed=0)
    assert len(norms) == 3 and limit == 2.0
    assert np.all(np.isfinite(norms)) and np.all(norms > 2.0)  # above the limit: every step was scaled down
    assert FlatAdam.clip_grad_norm is clip
