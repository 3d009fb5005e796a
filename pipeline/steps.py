"""Entry points shared by the CLI, the Prefect tasks and the dvc.yaml stages.

Each composes a step module's plain function with what every caller needs around it
(resolving MODEL, validating before training, writing outputs), so there is one implementation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import embed as embed_step
from pipeline import evaluate as evaluate_step
from pipeline import prepare as prepare_step
from pipeline import stores
from pipeline import train as train_step
from pipeline import validate as validate_step
from pipeline.config import OUTPUT_COLUMN, Params
from pipeline.contract.model import load_model_dir
from pipeline.errors import GateRefused, PipelineError, ValidationFailed
from pipeline.io.outputs import check_output, check_output_dir
from pipeline.io.tables import PARQUET_SUFFIXES, table_shape
from pipeline.registry.resolve import resolve_model, resolve_ref
from vae import EpochStats, VAEError, resolve_device


def prepare_data(params: Params, tables: Path | None = None) -> dict[str, Path]:
    return prepare_step.prepare(params.data, params.train.val_fraction, Path(params.data.prepared_dir), tables)


def default_eval_table(params: Params) -> Path:
    path = Path(params.data.prepared_dir) / "test.parquet"
    if not path.exists():
        raise PipelineError(f"no evaluation table: {path} does not exist (run `dvc repro` or pass --data)")
    return path


def raise_if_failed(report: validate_step.ValidationReport, path: Path | str) -> None:
    if not report.success:
        failures = report.failures()
        drifted = [f"{c.column!r} ({c.brief})" for c in failures if c.name == "drift"]
        others = [c for c in failures if c.name != "drift"]
        parts = [f"drifted columns {', '.join(drifted)} (validate.drift)"] if drifted else []
        parts += [c.line().removeprefix("FAIL ") if i == 0 and not drifted else (f"{c.name} ({c.column})" if c.column else c.name)
                  for i, c in enumerate(others)]
        head, rest = parts[0], parts[1:]
        also = f"; also {'; '.join(rest[:4])}" + (" ..." if len(rest) > 4 else "") if rest else ""
        raise ValidationFailed(f"{path} failed validation: {head}{also}")


def validate_data(
    path: Path | str, params: Params, against: str | None = None, report_path: Path | None = None,
    raise_on_failure: bool = True,
) -> validate_step.ValidationReport:
    """PATH: a table file, or any data.source (a folder: its newest table; sklearn:NAME; synthetic:)
    validated as recorded, in its own row order, before any split."""
    schema = resolve_model(against).schema if against else None
    report = validate_step.validate_path(path, params, against=schema, report_path=report_path)
    if raise_on_failure:
        raise_if_failed(report, path)
    return report


def validate_against_champion(source: str, params: Params) -> validate_step.ValidationReport | None:
    """data.source against @champion's table contract and training distribution (drift).

    None when there is no champion yet: nothing to compare with.
    """
    from pipeline.io.sources import load_source
    from pipeline.registry.champion import check_champion_contract
    from pipeline.registry.versions import current_champion

    name = params.register.model_name
    version = current_champion(name)
    if version is None:
        return None
    schema = resolve_model(f"models:/{name}/{version}").schema
    df = load_source(source, seed=params.data.seed)
    check_champion_contract(df, name, source, source)  # another table: no drift to speak of, another name
    return validate_step.validate_table(df, data=params.data, params=params.validate, against=schema,
                                        where=f"{source} against {name} version {version} (@champion)")


def train(
    path: Path, out: Path, params: Params, *, resume: bool = False, val_path: Path | None = None,
    validate: bool = True, validated: bool = False, on_epoch: Callable[[EpochStats], None] | None = None,
) -> train_step.TrainSummary:
    """Validate the table (data.* and validate.* policies) unless the caller did, then fit into OUT."""
    train_step.check_out_dir(Path(out), resume)  # before the minutes validation may take
    check_enough_rows(Path(path), params, val_table=val_path is not None)
    if validate:
        validate_data(path, params)
    return train_step.train_model(Path(path), Path(out), params, resume=resume, val_path=val_path,
                                  on_epoch=on_epoch, validated=validate or validated)


MIN_ROWS_PER_COLUMN = train_step.MIN_ROWS_PER_COLUMN


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


def evaluate(model: str, path: Path, params: Params, json_path: Path | None = None) -> dict[str, Any]:
    metrics = evaluate_step.metrics_dict(resolve_model(model), Path(path), params.evaluate)
    if json_path is not None:
        evaluate_step.write_metrics(metrics, Path(json_path))
    return metrics


def embed(model: str, input_path: Path, output: Path, params: Params,
          on_batch: Callable[[int], None] | None = None) -> int:
    """INPUT file -> OUTPUT file, or INPUT folder -> OUTPUT folder of parts, in this process.

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
        return embed_step.embed_folder(loaded, input_path, Path(output), params.embed, resolved.version, on_batch,
                                       drift=params.validate)
    return embed_step.embed_file(loaded, input_path, Path(output), params.embed, on_batch,
                                 {"model_version": resolved.version, "input_file": input_path.name},
                                 drift=params.validate)


def use_threads(n: int) -> None:
    """torch's CPU threads for this process (0 leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def check_embed_output(input_path: Path, output: Path) -> None:
    """OUTPUT of `embed`: a Parquet file, or for a folder INPUT a folder of parts (pipeline.io.outputs)."""
    if input_path.is_dir():
        check_output_dir(output, [input_path])
    else:
        check_output(output, [input_path], PARQUET_SUFFIXES)


def sample(model: str, n: int, output: Path, params: Params, on_batch: Callable[[int], None] | None = None) -> int:
    check_output(Path(output))
    return embed_step.sample_file(resolve_model(model), n, Path(output), params.embed.seed, on_batch)


ALIAS = re.compile(r"[\w-]{1,255}")  # what MLflow takes as an alias name
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)  # MLflow's own: the newest version, version numbers


def check_alias(alias: str) -> str:
    """An alias `register` may set: MLflow's characters, not reserved, and never @champion, which
    only the promotion gate moves."""
    if not ALIAS.fullmatch(alias) or RESERVED_ALIAS.fullmatch(alias):
        raise PipelineError(f"--alias {alias!r}: an alias is 1 to 255 letters, digits, '_' or '-', and not "
                            "'latest' or v<number> (MLflow's own names); e.g. --alias challenger")
    if alias == "champion":
        raise PipelineError("--alias champion: only the promotion gate moves @champion; register as a challenger "
                            "and add --promote (or run `vaepipe promote`)")
    return alias


def register(model_dir: Path, params: Params, *, alias: str | None = "challenger",
             metrics: dict[str, Any] | None = None, table: Path | None = None,
             tags: dict[str, str] | None = None) -> Any:
    """alias None: no alias (a DVC experiment's model); tags: extra version tags."""
    if alias is not None:
        check_alias(alias)
    stores.check_store()  # before the slow imports: a dead server fails in seconds
    from pipeline.registry.register import register_model

    return register_model(Path(model_dir), params, alias=alias, metrics=metrics, table=table, tags=tags)


def promote(params: Params, *, version: str | None = None, data: Path | None = None,
            refuse_raises: bool = True) -> dict[str, Any]:
    """The gate; a refusal raises GateRefused unless refuse_raises is False (then it is reported)."""
    stores.check_store()
    from pipeline.registry.gate import promote as gate

    try:
        result = gate(params, Path(data) if data else default_eval_table(params), version=version)
    except GateRefused as exc:
        if refuse_raises:
            raise
        return {"promoted": False, "message": str(exc), **_gate_figures(exc.promotion)}
    return {"promoted": result.promoted, "message": result.message, **_gate_figures(result)}


def _gate_figures(result: Any) -> dict[str, Any]:
    """The versions and held-out log-likelihoods (nats/row) the gate compared; {} when it scored none."""
    if result is None:
        return {}
    keys = ("challenger_version", "champion_version", "challenger_log_likelihood", "champion_log_likelihood",
            "required")
    return {k: getattr(result, k) for k in keys}


def decision_line(promotion: dict[str, Any], margin: float = 0.0) -> str:
    """The gate's decision in one line: "promoted v3 over v2 (x > y nats/row)" or "refused: ..."."""
    new, old = promotion.get("challenger_version"), promotion.get("champion_version")
    ll_new, ll_old = promotion.get("challenger_log_likelihood"), promotion.get("champion_log_likelihood")
    plus = f" + {margin:g}" if margin else ""
    if promotion.get("promoted") and ll_old is not None:
        return f"promoted v{new} over v{old} ({ll_new:.3f} > {ll_old:.3f}{plus} nats/row held out)"
    if new is not None and new == old:
        return f"v{new} is already @champion: nothing moved"
    if promotion.get("promoted"):
        return f"promoted v{new}, the first champion ({ll_new:.3f} nats/row held out)"
    if ll_new is not None and ll_old is not None:
        return (f"refused: v{new} scores {ll_new:.3f} nats/row held out, not above v{old}'s {ll_old:.3f}{plus}; "
                f"@champion stays v{old}")
    return f"refused: {promotion.get('message', '')}".replace("refused: promotion refused: ", "refused: ")


def new_run_dir(root: Path = Path("models/runs")) -> Path:
    return root / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def train_line(s: train_step.TrainSummary) -> str:
    """What a finished training run did, in one line."""
    best = "" if s.best_val_elbo is None else f", best val ELBO {s.best_val_elbo:.3f} at epoch {s.best_epoch}"
    refit = f"; then {s.refit_epochs} epochs on all rows (train.refit)" if s.refit_epochs else ""
    return f"trained {s.directory}: {s.epochs} epochs{' (stopped early)' if s.stopped_early else ''}{best}{refit}"


def epoch_line(s: EpochStats, epochs: int) -> str:
    val = "" if s.val_elbo is None else f"  val ELBO {s.val_elbo:.3f}"
    if s.phase == "refit":  # its length is the epoch count early stopping chose
        return f"refit on all rows, epoch {s.epoch}  ELBO {s.train_elbo:.3f}  recon {s.train_recon:.3f}  KL {s.train_kl:.3f}"
    return f"epoch {s.epoch}/{epochs}  ELBO {s.train_elbo:.3f}  recon {s.train_recon:.3f}  KL {s.train_kl:.3f}{val}"
