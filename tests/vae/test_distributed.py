"""vae.fit under a two-process gloo group: shards, averaged gradients, identical weights on every rank."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vae
from vae import distributed as data_parallel


def _rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(401, 2, generator=gen)  # odd: the shards must still take the same steps
    return z @ torch.randn(2, 6, generator=gen) + 0.3 * torch.randn(401, 6, generator=gen)


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    y = _rows()
    model = vae.VAE(vae.describe_table(y), vae.ModelConfig(latent_dim=2, hidden_dims=(8,)), seed=rank)  # differ
    cfg = vae.TrainConfig(epochs=4, batch_size=64, val_fraction=0.2, kl_warmup_steps=0, device="cpu", num_threads=1)
    result = vae.fit(model, y, cfg)
    torch.save({"weights": model.state_dict(), "shard": data_parallel.shard(y).shape[0],
                "elbo": [h.train_elbo for h in result.history], "val": [h.val_elbo for h in result.history]},
               f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_train_one_model_on_their_shards(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["shard"] == r1["shard"] == 200  # 401 rows: 200 each, the last one left out
    for key, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][key]), key  # same start (rank 0's) and the same steps
    assert r0["elbo"] == r1["elbo"] and r0["val"] == r1["val"]  # means over both shards; one validation
