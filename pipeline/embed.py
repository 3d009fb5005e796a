"""The embed and sample steps: posterior means and anomaly scores for new rows; synthetic rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import EmbedParams
from pipeline.errors import PipelineError
from pipeline.model import LoadedModel
from pipeline.tables import atomic_path, iter_table_batches, to_tensor, write_table_atomic
from vae import VAEError, check_values, embed, sample, score_rows


def embed_frame(model: LoadedModel, df: pd.DataFrame, params: EmbedParams, where: str = "table") -> pd.DataFrame:
    """One output row per input row, in order: ids, z_*, [z_logvar_*], [log_likelihood, anomaly]."""
    model.schema.check(df, where)
    y = to_tensor(model.schema.features_in_order(df))
    try:
        check_values(y, model.schema.features, model.vae.spec.missing)
    except VAEError as exc:
        raise PipelineError(f"{where}: {exc}") from None
    emb = embed(model.vae, y, with_variance=params.with_variance, batch_rows=params.batch_rows)
    out = {c: df[c].to_numpy() for c in model.id_columns}
    out |= {f"z_{j}": emb.z[:, j].numpy() for j in range(emb.z.shape[1])}
    if emb.logvar is not None:
        out |= {f"z_logvar_{j}": emb.logvar[:, j].numpy() for j in range(emb.logvar.shape[1])}
    if params.score_samples > 0:
        ll = score_rows(model.vae, y, params.score_samples, params.seed).log_likelihood.numpy()
        out["log_likelihood"] = ll
        threshold = model.anomaly_threshold
        out["anomaly"] = ll < threshold if threshold is not None else np.zeros(len(ll), dtype=bool)
    return pd.DataFrame(out, index=range(len(df)))


def embed_file(
    model: LoadedModel,
    input_path: Path,
    output_path: Path,
    params: EmbedParams,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Stream INPUT in row batches into OUTPUT (Parquet); the file appears whole or not at all."""
    writer: pq.ParquetWriter | None = None
    rows = 0
    with atomic_path(Path(output_path)) as tmp:
        try:
            for batch in iter_table_batches(Path(input_path), params.batch_rows):
                frame = embed_frame(model, batch, params, where=f"{input_path} (rows {rows}..)")
                table = pa.Table.from_pandas(frame, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += len(frame)
                if on_batch is not None:
                    on_batch(rows)
        finally:
            if writer is not None:
                writer.close()
    return rows


def sample_file(model: LoadedModel, n: int, output_path: Path, seed: int = 0) -> pd.DataFrame:
    """N synthetic rows from p(z) p(y|z), feature columns in the schema's order and dtypes."""
    if n < 1:
        raise PipelineError(f"N is {n}; ask for at least one row")
    y = sample(model.vae, n, generator=torch.Generator().manual_seed(seed))
    df = pd.DataFrame(y.numpy(), columns=list(model.schema.features))
    for name, dtype in zip(model.schema.features, model.schema.dtypes, strict=True):
        if dtype.startswith(("int", "uint", "bool", "Int", "UInt")):
            df[name] = df[name].round().astype(dtype)
    write_table_atomic(df, Path(output_path))
    return df
