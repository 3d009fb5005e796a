"""The train stage: a table in, a self-contained, resumable model directory out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params, drop_columns
from pipeline.contract.columns import float32_collapsed, split_features, to_tensor
from pipeline.contract.schema import Schema
from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256
from pipeline.io.outputs import TRAIN_LOCK, busy_message, claimed_dir
from pipeline.io.tables import read_table, table_shape
from pipeline.stages import validate
from vae import (
    VAE,
    EpochStats,
    VAEError,
    anomaly_threshold,
    check_log_domain,
    check_values,
    describe_table,
    fit,
    fit_baselines,
    load_checkpoint,
    save_checkpoint,
    save_model,
    score_rows,
)
from vae import distributed as data_parallel
from vae.calibration import fit_missing_adjustment
from vae.inference import tail_rows
from vae.precision import resolve_precision
from vae.probe import precision_gap
from vae.store import CHECKPOINT, MANIFEST, write_atomic
from vae.train import (
    FitResult,
    calibration_count,
    calibration_split,
    held_out_rows,
    selection_model,
    validation_count,
    will_refit,
)

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # what a resumed run must match: params and data
MAX_THRESHOLD_ROWS = 20_000  # rows scored to place the anomaly threshold
PROBE_ROWS = 4096  # rows of the bf16-vs-fp32 probe
MIN_ROWS_PER_COLUMN = 2  # rows to fit per (feature column + 1): the full Gaussian start has d(d+3)/2 numbers
CALIBRATION_ROWS = "calibration rows (held out from the selection fit)"


@dataclass(frozen=True)
class TrainSummary:
    directory: Path
    epochs: int
    best_epoch: int
    stopped_early: bool
    best_val_log_likelihood: float | None  # early stopping's figure: IWAE at train.val_iw_samples draws a row
    anomaly_threshold: float | None
    seconds: float
    refit_epochs: int = 0  # epochs of the refit on all rows (train.refit), after `epochs`


def _load(path: Path, params: Params, schema: Schema | None = None) -> tuple[torch.Tensor, Schema]:
    df = drop_columns(read_table(path), params.data, str(path))
    if schema is not None:
        schema.check(df, str(path))
        df = df[[*schema.id_columns, *schema.features]]
    _, features = split_features(df, params.data.id_columns, str(path))
    for name, why in float32_collapsed(features):
        raise PipelineError(f"{path}: column {name!r} {why}")
    schema = schema or Schema.from_frame(df, params.data.id_columns, str(path), params.data.drop_columns)
    if schema.categorical:  # text columns as their level codes (an unseen level is named)
        to_tensor(features[[c for j, c in enumerate(schema.features) if not schema.levels_of(j)]], str(path))
        y = torch.from_numpy(np.ascontiguousarray(schema.codes(df, str(path))))
    else:
        y = to_tensor(features, str(path))
    if not bool(torch.isfinite(y.sum())):  # a NaN or inf cell: named here, against its own file
        try:
            check_values(y, [str(c) for c in features.columns], params.data.missing)
        except VAEError as exc:
            raise PipelineError(f"{path}: {exc}") from None
    return y, schema


def check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; give the path of a new directory for the model")
    busy = busy_message(out) if data_parallel.launched().is_main else None  # torchrun: rank 0 holds OUT
    if busy is not None:
        raise PipelineError(busy)
    _check_contents(out, resume)


def _check_contents(out: Path, resume: bool) -> None:
    finished, interrupted = (out / MANIFEST).exists(), (out / CHECKPOINT).exists()
    if resume and finished:
        raise PipelineError(f"{out} already holds a finished model; nothing to resume")
    if resume and not interrupted:
        raise PipelineError(f"{out} holds no interrupted run to resume ({CHECKPOINT} is missing)")
    if not resume and finished:
        raise PipelineError(f"{out} already holds a trained model; choose another --out or delete it")
    if not resume and interrupted:
        raise PipelineError(f"{out} holds an interrupted run; continue it with --resume or delete it")
    if not resume and out.exists() and any(p.name != TRAIN_LOCK for p in out.iterdir()):
        raise PipelineError(f"--out {out} exists and is not empty; choose a new directory")


def _run_record(params: Params, data_path: Path, val_path: Path | None) -> dict[str, Any]:
    return {
        "params": params.to_dict(),
        "data": {"path": str(data_path), "sha256": file_sha256(data_path)},
        "val": None if val_path is None else {"path": str(val_path), "sha256": file_sha256(val_path)},
    }


def _check_resume(out: Path, record: dict[str, Any]) -> None:
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"--resume into {out}: {out / RUN_FILE} is missing or unreadable "
                            f"({exc.__class__.__name__}); delete {out} and train again") from None
    if not isinstance(saved, dict):
        raise PipelineError(f"--resume into {out}: {out / RUN_FILE} is not a vaepipe run record; delete {out} and train again")
    changed = _first_difference(saved.get("params"), record["params"])
    if changed is not None:
        key, then, now = changed
        if then is None and isinstance(saved.get("params"), dict):  # a key this version added
            raise PipelineError(f"--resume into {out}: the interrupted run was started by an older vaepipe, "
                                f"which had no {key} (now {now!r}); delete {out} and train again")
        raise PipelineError(f"--resume into {out}: {key} is {now!r}, the interrupted run had {then!r}; "
                            "resume with the same params")
    for key, what in (("data", "the training table"), ("val", "the --val table")):
        old, new = saved.get(key), record.get(key)
        if (old and old.get("sha256")) != (new and new["sha256"]):
            raise PipelineError(f"--resume into {out}: {what} differs from the interrupted run's "
                                f"({(old or {}).get('path')}); resume with the same table")


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first place two params trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            found = _first_difference(old.get(name), new.get(name), f"{key}.{name}" if key else name)
            if found is not None:
                return found
        return None
    return None if old == new else (key or "params", old, new)


def train_model(
    data_path: Path,
    out: Path,
    params: Params,
    *,
    resume: bool = False,
    val_path: Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    validated: bool = False,
) -> TrainSummary:
    """Fit a VAE on DATA into OUT; checkpoints (train.checkpoint_every_s) so that --resume can continue.

    validated: the caller validated DATA (recorded in the model's metadata for the registry).
    """
    data_path, out = Path(data_path), Path(out)
    ranks = data_parallel.init(params.train.device)  # under torchrun: every rank trains, rank 0 writes
    check_out_dir(out, resume)
    with claimed_dir(out) if ranks.is_main else contextlib.nullcontext(False) as created:
        _check_contents(out, resume)  # again, holding OUT: another run may have finished there meanwhile
        return _train_claimed(data_path, out, params, resume, val_path, on_epoch, validated, ranks, created)


def _train_claimed(data_path: Path, out: Path, params: Params, resume: bool, val_path: Path | None,
                   on_epoch: Callable[[EpochStats], None] | None, validated: bool, ranks: data_parallel.Ranks,
                   created: bool) -> TrainSummary:
    y, schema = _load(data_path, params)
    y_val = None if val_path is None else _load(Path(val_path), params, schema)[0]
    record = _run_record(params, data_path, val_path)
    try:
        spec = describe_table(
            y, schema.features, likelihood=params.model.likelihood,
            standardize=params.data.standardize, missing=params.data.missing,
            levels=schema.levels or None, log_columns=params.model.log_columns, seed=params.train.seed,
        )
        if y_val is not None:
            check_log_domain(y_val, spec)
        vae = VAE(spec, params.model, seed=params.train.seed)
    except VAEError as exc:
        raise PipelineError(f"{data_path}: {exc}") from None
    state = None
    if resume:
        _check_resume(out, record)
        try:
            state = load_checkpoint(out, vae)
        except VAEError as exc:
            raise PipelineError(str(exc)) from None
    data_parallel.barrier()  # every rank checked OUT before rank 0 writes into it
    # the same seeded rows on every rank and on --resume (train.seed and calibration_fraction are in run.json)
    y_fit, y_cal, calibration = _carve_calibration(vae, y, y_val is not None, params)
    try:
        if ranks.is_main:
            write_atomic(out / RUN_FILE, json.dumps(record, indent=2).encode())
        # train.refit auto decided on all of DATA's rows (and --val's), calibration rows included, which fit()
        # sees only when it refits: fit() is told the decision
        refits = will_refit(vae, params.train, y_val is not None or params.train.val_fraction > 0,
                            y.shape[0] + (0 if y_val is None else y_val.shape[0]))
        result = fit(
            vae, y_fit, dataclasses.replace(params.train, refit=refits), y_val=y_val, resume=state,
            y_refit_extra=y_cal if refits else None,
            on_epoch=on_epoch if ranks.is_main else None,
            on_checkpoint=(lambda state: save_checkpoint(out, state)) if ranks.is_main else None,
        )
        if not ranks.is_main:
            return _after_rank_0(out, result)
        anomaly = _place_anomaly_threshold(vae, result, y_fit, y_val, y_cal, params) | {"calibration": calibration}
        threshold = anomaly["threshold"]
        precision = _precision_record(vae, y, params)
    except VAEError as exc:
        if created and ranks.is_main:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written
        raise PipelineError(f"{data_path}: {exc}") from None
    except Exception:
        if ranks.is_main and not resume and not (out / CHECKPOINT).exists():  # no epoch to resume from: leave nothing behind
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                (out / RUN_FILE).unlink(missing_ok=True)
        raise
    metadata = {
        "schema": schema.to_dict(),
        "params": params.to_dict(),
        "data": {**record["data"], "rows": int(y.shape[0])},
        "fit": fit_marks(result),
        "validation": {"success": validated},
        "anomaly": anomaly,
        "train_processes": ranks.world_size,
        "precision": precision,
    }
    # the baselines see DATA's rows (and the validation table's after a refit): the rows the final
    # model was fitted on after a refit; without one, more than it (its validation and calibration rows)
    rows = y if y_val is None or result.state.phase != "refit" else torch.cat([y, y_val])
    save_model(out, vae, params.train, result.history, metadata, fit_baselines(rows, spec, params.model.latent_dim))
    data_parallel.barrier()  # the other ranks return once the model directory is complete
    chosen = result.state.selected_val if result.state.phase == "refit" else result.state.best_val
    best_val = chosen if math.isfinite(chosen) else None  # the selection's, out of sample
    refit = sum(h.phase == "refit" for h in result.history)
    return TrainSummary(out, len(result.history) - refit, result.best_epoch, result.stopped_early,
                        best_val, threshold, sum(h.seconds for h in result.history), refit)


def fit_marks(result: FitResult) -> dict[str, Any]:
    """Where the curves' events fall, in total_epoch (history.csv's count over both stages):
    the epoch whose weights the model keeps, the refit's first epoch, the noise head's openings."""
    history, state = result.state.history, result.state
    selection = sum(h["phase"] == "select" for h in history)
    if state.phase == "refit":  # the refit's best epoch on the validation rows, unless the selection's weights stayed
        kept = state.best_val < state.selected_val or (state.refit_start == "selected" and state.best_epoch == 0)
        chosen = state.selected_epoch if kept else selection + state.best_epoch
    else:
        chosen = state.best_epoch  # 0: the closed-form start
    return {"chosen_epoch": chosen, "selection_epochs": selection, "selected_epoch": state.selected_epoch,
            "noise_opened": [i + 1 for i, h in enumerate(history) if h.get("noise_opened")]}


def _after_rank_0(out: Path, result: FitResult) -> TrainSummary:
    """A rank other than 0: wait until rank 0 wrote the model directory, then report the same run."""
    data_parallel.barrier()
    chosen = result.state.selected_val if result.state.phase == "refit" else result.state.best_val
    best_val = chosen if math.isfinite(chosen) else None  # the selection's, out of sample
    refit = sum(h.phase == "refit" for h in result.history)
    return TrainSummary(out, len(result.history) - refit, result.best_epoch, result.stopped_early,
                        best_val, None, sum(h.seconds for h in result.history), refit)


def _carve_calibration(vae: VAE, y: torch.Tensor, val_table: bool,
                       params: Params) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(rows the selection fits on, calibration rows or None, what was decided): the
    train.calibration_fraction of DATA that neither the selection's training nor early stopping
    sees, on which the anomaly threshold is placed; a refit (train.refit) trains on them, without
    one no model does. Carved only where rows are scored (embed.score_samples > 0), and only if the
    rest still has MIN_ROWS_PER_COLUMN x (features + 1) rows to fit after the validation split;
    otherwise none, and the threshold goes on the validation rows."""
    t = params.train
    record: dict[str, Any] = {"fraction": t.calibration_fraction, "rows": 0}
    n_cal = calibration_count(y.shape[0], t)
    rest = y.shape[0] - n_cal
    fit_rows = rest if val_table else rest - validation_count(rest, t)
    need = MIN_ROWS_PER_COLUMN * (y.shape[1] + 1)
    why = ("train.calibration_fraction is 0" if t.calibration_fraction == 0
           else "embed.score_samples is 0" if params.embed.score_samples == 0
           else f"{rest} rows would be left, {fit_rows} to fit, below {need}" if n_cal < 1 or fit_rows < need
           else None)
    if why is not None:
        return y, None, record | {"skipped": why}
    keep, cal = calibration_split(y.shape[0], t)
    return y[keep], y[cal], record | {"rows": n_cal}


def _place_anomaly_threshold(vae: VAE, result: FitResult, y: torch.Tensor, y_val: torch.Tensor | None,
                             y_cal: torch.Tensor | None, params: Params) -> dict[str, Any]:
    """Where `embed` flags a row, and how that was placed (recorded in the model directory): the
    embed.anomaly_quantile of held-out rows' scores (embed.score_samples importance samples each,
    common draws: the scores `embed` gives), by vae.anomaly_threshold (plotting positions, an
    exponential tail below the least score).

    A model scores its training rows higher than new rows (breast_cancer, the default model: 46.3
    against 38.6 nats/row), so a threshold placed on them flagged 29 % of the test rows at quantile
    0.1 (three splits). The rows: the calibration rows (train.calibration_fraction of DATA, y_cal),
    which the selection neither trained on nor chose its epoch on, scored by the selected model
    (vae.train.selection_model). The validation rows were used before: early stopping chose its
    epoch on their mean ELBO, which their worst rows rule, so their low tail looked better than
    new rows' (one split: the lowest validation row scored 13 nats under the model selected on it,
    -26 under one selected on other rows). On breast_cancer (default settings, ten splits,
    benchmarks/anomaly_rate.py) quantile 0.01 flagged 5.0 % of the test rows placed on the 46
    validation rows with the empirical quantile, 1.5 % on 82 calibration rows (0.2; 41 rows, 0.1:
    3.4 %, too few to extrapolate a 1 % tail from). After train.refit the final model has trained
    on the calibration rows too; it is the same recipe run for the same number of epochs on a
    little more data, so new rows score about as under the selection, and the selection's
    threshold in nats carries over (the rate at 0.1: 11.6 %).
    Without calibration rows (train.calibration_fraction 0, no refit, too few rows): the
    validation rows (--val, or the train.val_fraction of DATA that fit() holds out), as before.
    With missing cells (data.missing: mask) the same rows give the adjustment for the row's
    missing cells (vae.calibration). No row held out (train.val_fraction 0, no --val): training
    rows, with a warning.
    """
    e = params.embed
    record: dict[str, Any] = {"quantile": e.anomaly_quantile, "threshold": None, "score_samples": e.score_samples,
                              "seed": e.seed}
    if e.score_samples == 0:
        return record
    held = y_val if y_val is not None else held_out_rows(y, params.train)
    if y_cal is not None:
        rows, model, placed_on = y_cal, selection_model(vae, result), CALIBRATION_ROWS
        scored_by = "selected model (before train.refit)" if model is not vae else "final model"
    elif held is None:
        log.warning("no rows held out (train.val_fraction is 0 and no --val table): the anomaly threshold is placed "
                    "on training rows, which the model fits better; embed will flag more than embed.anomaly_quantile "
                    "of new rows")
        rows, model, placed_on, scored_by = y, vae, "training rows", "final model"
    else:
        rows, model, placed_on = held, selection_model(vae, result), "validation rows (held out)"
        scored_by = "selected model (before train.refit)" if model is not vae else "final model"
    if rows.shape[0] > MAX_THRESHOLD_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(e.seed))[:MAX_THRESHOLD_ROWS]]
    scores = score_rows(model, rows, e.score_samples, e.seed, common_eps=True)
    record |= {"threshold": anomaly_threshold(scores.log_likelihood, e.anomaly_quantile), "rows": int(rows.shape[0]),
               "placed_on": placed_on, "scored_by": scored_by}
    if (rows.shape[0] + 1) * e.anomaly_quantile < 1:
        log.info("the anomaly threshold rests on %d held-out rows, fewer than 1 / embed.anomaly_quantile - 1: it "
                 "is extrapolated below the least of their scores (an exponential tail fitted to the %d least)",
                 rows.shape[0], tail_rows(rows.shape[0]))
    if vae.masked:
        adjustment = fit_missing_adjustment(model, rows, scores.log_likelihood, e.score_samples, e.seed)
        record["missing"] = adjustment.to_dict()
    return record


def _precision_record(vae: VAE, y: torch.Tensor, params: Params) -> dict[str, Any]:
    """The precision training ran in; under bf16, what it changes: the ELBO of up to PROBE_ROWS
    training rows under bf16 minus fp32, same eps (nats per row)."""
    used = resolve_precision(params.train.precision, next(vae.parameters()).device)
    if used == "fp32":
        return {"train": used}
    gap = precision_gap(vae, y[:PROBE_ROWS], seed=params.train.seed)
    log.info("bf16 minus fp32 ELBO on %d rows: %.4g nats/row (max |diff| %.3g)", gap.rows, gap.diff, gap.max_abs_diff)
    return {"train": used, "probe_rows": gap.rows, "elbo_fp32": gap.elbo_fp32,
            "elbo_bf16_minus_fp32": gap.diff, "max_abs_diff": gap.max_abs_diff}


def run(path: Path, out: Path, params: Params, *, resume: bool = False, val_path: Path | None = None,
        validated: bool = False, on_epoch: Callable[[EpochStats], None] | None = None) -> TrainSummary:
    """`vaepipe train`: validate the table (data.* and validate.* policies) unless the caller did
    (validated), then fit into OUT (train_model)."""
    check_out_dir(Path(out), resume)  # before the minutes validation may take
    check_enough_rows(Path(path), params, val_table=val_path is not None)
    if not validated:
        validate.run(path, params)
    return train_model(Path(path), Path(out), params, resume=resume, val_path=val_path, on_epoch=on_epoch,
                       validated=True)


def check_enough_rows(path: Path, params: Params, val_table: bool = False) -> None:
    """A table with fewer rows to fit than 2 x (feature columns + 1) is refused at once, from its
    metadata or header: its closed-form start (the full-covariance Gaussian) is not identified and
    the model would be reported as trained (10 rows x 5 columns: best validation ELBO -388,206)."""
    rows, columns = table_shape(path)
    features = columns - len(params.data.id_columns)
    fit_rows = rows if val_table else rows - int(round(rows * params.train.val_fraction))  # --val: all of them
    need = MIN_ROWS_PER_COLUMN * (features + 1)
    if rows > 0 and fit_rows < need:
        raise PipelineError(
            f"{path} has {features:,} feature columns and {rows:,} rows ({fit_rows:,} to fit after train.val_fraction): "
            f"a model of how the columns vary together needs at least {MIN_ROWS_PER_COLUMN} x (columns + 1) = "
            f"{need:,} rows to fit; add rows, or reduce the columns first (select them, or project them with PCA)")


def result_line(s: TrainSummary) -> str:
    """What a finished training run did, in one line."""
    best = ("" if s.best_val_log_likelihood is None
            else f", best validation log-likelihood {s.best_val_log_likelihood:.3f} at epoch {s.best_epoch}")
    refit = f"; then {s.refit_epochs} epochs on all rows (train.refit)" if s.refit_epochs else ""
    return f"trained {s.directory}: {s.epochs} epochs{' (stopped early)' if s.stopped_early else ''}{best}{refit}"
