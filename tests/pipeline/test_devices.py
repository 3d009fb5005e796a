"""Pipeline side of the GPU work, on the CPU: train.precision and its probe in the model's metadata,
embed.device, and the Parquet read-ahead thread of the embed step."""

from __future__ import annotations

import math
import threading
import time

import pandas as pd
import pytest
import torch

import vae
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.io.prefetch import prefetch
from tests.pipeline.helpers import FAST, clean_table

ARGS = [a for s in [*FAST, "data.id_columns=[sample_id]"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-model")
    clean_table(seed=1).to_parquet(root / "train.parquet", index=False)
    assert main(["train", str(root / "train.parquet"), "--out", str(root / "model"), *ARGS,
                 "--set", "train.precision=bf16"]) == 0
    return root


def test_bf16_training_records_the_probe(bf16_model):
    record = vae.read_manifest(bf16_model / "model")["metadata"]["precision"]
    assert record["train"] == "bf16" and record["probe_rows"] == 300  # all rows (up to PROBE_ROWS)
    assert math.isfinite(record["elbo_fp32"])
    assert 0 < abs(record["elbo_bf16_minus_fp32"]) <= record["max_abs_diff"] < 1.0


def test_embed_device_option(bf16_model, tmp_path, capsys):
    table = bf16_model / "train.parquet"
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(bf16_model / "model"), str(table), str(out), *ARGS, "--set", "embed.device=cpu"]) == 0
    assert len(pd.read_parquet(out)) == 300
    capsys.readouterr()
    assert main(["embed", str(bf16_model / "model"), str(table), str(tmp_path / "x.parquet"), *ARGS,
                 "--set", "embed.device=gpu"]) == 2
    assert "embed.device is 'gpu'; choose one of auto, cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["embed", str(bf16_model / "model"), str(table), str(tmp_path / "x.parquet"), *ARGS,
                     "--set", "embed.device=cuda"]) == 2
        assert "embed.device is 'cuda' but no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_prefetch_keeps_order_and_reads_a_bounded_way_ahead():
    produced: list[int] = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    seen, ahead = [], []
    for item in prefetch(items(), depth=2):
        time.sleep(0.02)  # the reader runs ahead while this item is used, by at most depth + 1
        assert len(produced) <= item + 4
        ahead.append(len(produced) - (item + 1))
        seen.append(item)
    assert seen == list(range(10))
    assert max(ahead) >= 1, ahead  # it does read ahead (a plain generator passed the bound above)


def test_prefetch_raises_the_readers_error_in_order_and_stops_its_thread():
    def items():
        yield 1
        yield 2
        raise PipelineError("table.parquet: row group 3 is corrupt")

    got = []
    with pytest.raises(PipelineError, match="row group 3"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]
    before = threading.active_count()
    stream = prefetch(iter(range(1000)), depth=1)
    assert next(stream) == 0
    stream.close()  # the consumer stops early: the reader thread ends
    assert threading.active_count() <= before
