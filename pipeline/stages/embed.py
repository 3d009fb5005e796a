"""The embed stage: posterior means and anomaly scores for new rows, streamed from a table or a
folder of Parquet files into Parquet; the same frame is the registered pyfunc's predict."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import OUTPUT_COLUMN, EmbedParams, Params, ValidateParams
from pipeline.contract.drift import DriftStats, drift_summary
from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.hashing import file_sha256
from pipeline.io.outputs import PROVENANCE_KEY, check_output, check_output_dir, parts_dir
from pipeline.io.prefetch import bound_heap_growth, prefetch
from pipeline.io.tables import PARQUET_SUFFIXES, iter_table_batches
from pipeline.registry.resolve import resolve_ref
from vae import VAEError, embed, resolve_device, score_rows
from vae.inference import Workspace

log = logging.getLogger(__name__)
DRIFT_KEY = b"vaepipe.drift"  # Parquet metadata of an embedding output: each column's drift (JSON)


def embed_frame(model: LoadedModel, df: pd.DataFrame, params: EmbedParams, where: str = "table") -> pd.DataFrame:
    """One output row per input row, in order: ids, z_*, [z_logvar_*], [log_likelihood, [anomaly_pvalue], anomaly]."""
    return _embedding(model, df[list(model.id_columns)], model.features(df, where), params)


def _embedding(model: LoadedModel, ids: pd.DataFrame, y: torch.Tensor, params: EmbedParams,
               workspace: Workspace | None = None) -> pd.DataFrame:
    """embed_frame of rows whose id columns are ids and features y (N, D), checked;
    workspace: the encoder's buffers, one for all the batches of a stream (vae.inference)."""
    emb = embed(model.vae, y, with_variance=params.with_variance, batch_rows=params.batch_rows, workspace=workspace)
    out = {c: ids[c].to_numpy() for c in model.id_columns}
    out |= {f"z_{j}": emb.z[:, j].numpy() for j in range(emb.z.shape[1])}
    if emb.logvar is not None:
        out |= {f"z_logvar_{j}": emb.logvar[:, j].numpy() for j in range(emb.logvar.shape[1])}
    if params.score_samples > 0:
        samples, seed = model.score_settings(params.score_samples, params.seed)
        scores = score_rows(model.vae, y, samples, seed, common_eps=True).log_likelihood
        ll = scores.numpy()
        out["log_likelihood"] = ll
        threshold, adjustment = model.anomaly_threshold, model.missing_adjustment
        if adjustment is not None and model.anomaly_quantile is not None:
            # data.missing: mask: the level of log p(y_obs) depends on which cells are observed; the flag
            # compares the row with held-out rows after removing that level (vae.calibration)
            pvalue = adjustment.pvalue(adjustment.adjusted(scores, ~torch.isnan(y))).numpy()
            out["anomaly_pvalue"] = pvalue
            out["anomaly"] = pvalue < model.anomaly_quantile
        else:
            out["anomaly"] = ll < threshold if threshold is not None else np.zeros(len(ll), dtype=bool)
    return pd.DataFrame(out, index=range(len(y)))


def embed_file(
    model: LoadedModel,
    input_path: Path,
    output_path: Path,
    params: EmbedParams,
    on_batch: Callable[[int], None] | None = None,
    provenance: dict[str, str] | None = None,
    drift: ValidateParams | None = None,
) -> int:
    """Stream INPUT in row batches into OUTPUT (Parquet); the file appears whole or not at all.

    provenance: key/values stored in the output's Parquet metadata under PROVENANCE_KEY (JSON).
    drift (unless None or validate.drift off): INPUT's columns against the model's training
    distribution, accumulated over the batches; drifted columns are logged as a warning and every
    column's result is stored in OUTPUT's Parquet metadata under DRIFT_KEY.
    """
    with atomic_path(Path(output_path)) as tmp:
        return _embed_stream(model, Path(input_path), tmp, params, on_batch, provenance, drift)


def _embed_stream(model: LoadedModel, input_path: Path, out: Path, params: EmbedParams,
                  on_batch: Callable[[int], None] | None, provenance: dict[str, str] | None,
                  drift: ValidateParams | None) -> int:
    writer: pq.ParquetWriter | None = None
    stats = DriftStats(model.schema) if drift is not None and drift.drift != "off" else None
    rows, workspace = 0, Workspace()
    bound_heap_growth()
    batches = _checked(model, iter_table_batches(input_path, params.batch_rows), input_path, stats)
    try:
        # the next batches are read, checked and summarized by a thread while this one is embedded
        for batch in prefetch(batches):
            frame = _embedding(model, batch.ids, batch.y, params, workspace)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                meta = {**(table.schema.metadata or {}), **_provenance_meta(provenance)}
                # dictionary encoding for the id columns only: tried on float columns of distinct values it
                # costs most of a batch's write and gives up (then a larger file) when its page fills
                writer = pq.ParquetWriter(out, table.schema.with_metadata(meta), use_dictionary=list(model.id_columns))
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
            rows += len(frame)
            if on_batch is not None:
                on_batch(rows)
        if writer is not None and stats is not None and drift is not None:
            writer.add_key_value_metadata({DRIFT_KEY: _drift_report(stats, drift, input_path)})
    finally:
        if writer is not None:
            writer.close()
    return rows


@dataclass(frozen=True)
class _Checked:
    ids: pd.DataFrame  # (N, id columns)
    y: torch.Tensor  # (N, D) the features as the model reads them (LoadedModel.features)


def _checked(model: LoadedModel, batches: Iterator[pd.DataFrame], path: Path,
             stats: DriftStats | None) -> Iterator[_Checked]:
    """Each batch checked against the contract, converted, and added to the drift statistics;
    run by prefetch's thread, so that the encoder's thread only encodes and writes."""
    rows = 0
    for batch in batches:
        y = model.features(batch, where=f"{path} (rows {rows}..)", first_row=rows)
        if stats is not None:
            stats.update(batch, y)
        rows += len(batch)
        yield _Checked(batch[list(model.id_columns)], y)


def _provenance_meta(provenance: dict[str, str] | None) -> dict[bytes, bytes]:
    return {} if not provenance else {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()}


def read_provenance(path: Path) -> dict[str, str]:
    """The provenance an embedding output carries (empty if none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else {}


def list_partitions(folder: Path) -> list[Path]:
    """The Parquet files of a folder in name order (hidden files skipped): one output part each."""
    folder = Path(folder)
    parts = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in PARQUET_SUFFIXES and not p.name.startswith((".", "_")) and p.is_file())
    if not parts:
        raise PipelineError(f"{folder} holds no Parquet files (*.parquet, *.pq) to embed")
    return parts


def embed_partition(model: LoadedModel, part: Path, out_dir: Path, params: EmbedParams, model_version: str,
                    on_batch: Callable[[int], None] | None = None, drift: ValidateParams | None = None) -> int:
    """One input file into OUT_DIR/<its name>, its sha256 and the model version in the metadata."""
    provenance = {"model_version": model_version, "input_file": part.name, "input_sha256": file_sha256(part)}
    with atomic_path(Path(out_dir) / part.name) as tmp:
        return _embed_stream(model, part, tmp, params, on_batch, provenance, drift)


def embed_folder(model: LoadedModel, input_dir: Path, output_dir: Path, params: EmbedParams, model_version: str,
                 on_batch: Callable[[int], None] | None = None, drift: ValidateParams | None = None) -> int:
    """Every Parquet file of INPUT_DIR into a part of OUTPUT_DIR, in one process; OUTPUT_DIR appears whole."""
    parts, rows = list_partitions(input_dir), 0
    with parts_dir(Path(output_dir), [Path(input_dir)]) as tmp:
        for part in parts:
            rows += embed_partition(model, part, tmp, params, model_version, _offset(on_batch, rows), drift)
    return rows


def _offset(on_batch: Callable[[int], None] | None, done: int) -> Callable[[int], None] | None:
    """Progress of one part as rows of the whole folder."""
    return None if on_batch is None else (lambda n: on_batch(done + n))


def _drift_report(stats: DriftStats, params: ValidateParams, input_path: Path) -> bytes:
    drifts = stats.drifts(params)
    if summary := drift_summary(drifts):
        log.warning("%s drifted from the model's training distribution: %s (validate.drift_max_shift_std "
                    "%g sd, validate.drift_max_ks %g)", input_path, summary, params.drift_max_shift_std,
                    params.drift_max_ks)
    return json.dumps([asdict(d) for d in drifts]).encode()


def read_drift(path: Path) -> list[dict[str, object]]:
    """The drift report an embedding output carries: one dict per column ([] if none)."""
    meta = pq.read_metadata(path).metadata or {}  # the file's key-value metadata, written at close
    return list(json.loads(meta[DRIFT_KEY])) if DRIFT_KEY in meta else []


def run(model: str, input_path: Path, output: Path, params: Params,
        on_batch: Callable[[int], None] | None = None) -> int:
    """`vaepipe embed`: INPUT file -> OUTPUT file, or INPUT folder -> OUTPUT folder of parts, in this process.

    Refused before any work if OUTPUT would destroy INPUT, the model or a folder vaepipe did not write.
    """
    input_path = Path(input_path)
    check_embed_output(input_path, Path(output))
    use_threads(params.embed.num_threads)
    try:
        device = str(resolve_device(params.embed.device, "embed.device"))
    except VAEError as exc:
        raise PipelineError(str(exc)) from None
    resolved = resolve_ref(model)
    loaded = load_model_dir(resolved.directory, device)
    taken = [c for c in loaded.id_columns if OUTPUT_COLUMN.fullmatch(c)]
    if taken:
        raise PipelineError(f"model {model}: its id column {taken[0]!r} would be overwritten by embed's own "
                            "output column; rename it in the table and retrain")
    if input_path.is_dir():
        return embed_folder(loaded, input_path, Path(output), params.embed, resolved.version, on_batch,
                            drift=params.validate)
    return embed_file(loaded, input_path, Path(output), params.embed, on_batch,
                      {"model_version": resolved.version, "input_file": input_path.name}, drift=params.validate)


def use_threads(n: int) -> None:
    """torch's CPU threads for this process (0 leaves torch's default)."""
    if n:
        torch.set_num_threads(n)


def check_embed_output(input_path: Path, output: Path) -> None:
    """OUTPUT of `embed`: a Parquet file, or for a folder INPUT a folder of parts (pipeline.io.outputs)."""
    if input_path.is_dir():
        check_output_dir(output, [input_path])
    else:
        check_output(output, [input_path], PARQUET_SUFFIXES)
