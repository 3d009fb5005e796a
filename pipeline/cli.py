"""`vaepipe`: the command line (README "Commands", docs/architecture.md). Exit 0 ok, 1 data invalid or gate refused, 2 usage/input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from pipeline.config import Params, load_params
from pipeline.errors import PipelineError, user_error
from pipeline.io.outputs import check_output, same_path
from vae import EpochStats


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # examples and --version as written, not re-wrapped
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"vaepipe: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """vaepipe's version and the stack it runs on, from the installed metadata (no imports)."""
    from importlib import metadata

    def of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{d} {of(d)}" for d in ("torch", "mlflow", "prefect", "dvc", "great-expectations"))
    return f"vaepipe {of('vaepipe')} (Python {sys.version.split()[0]}; {stack})"


def _progress(total_epochs: int) -> Callable[[EpochStats], None]:
    """Epochs with ELBO: one rewritten line on a terminal, a few plain log lines otherwise."""
    from pipeline.orchestration.progress import TrainingProgress, epoch_line

    if not sys.stderr.isatty():
        return TrainingProgress(lambda line: print(line, file=sys.stderr, flush=True))

    def show(s: EpochStats) -> None:
        print(f"\r{epoch_line(s, total_epochs)}\033[K", end="", file=sys.stderr, flush=True)

    return show


def _print_json(obj: Any) -> None:
    from pipeline.stages.evaluate import metrics_json

    print(metrics_json(obj))


def cmd_prepare(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import prepare

    for name, path in prepare.run(p, a.tables).items():
        print(f"{name}: {path}")
    return 0


def cmd_validate(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import validate

    if a.report is not None:
        check_output(a.report, [] if a.data.startswith(("sklearn:", "synthetic:")) else [Path(a.data)], None)
    report = validate.run(a.data, p, against=a.against, report_path=a.report, raise_on_failure=False)
    for line in report.summary_lines():
        print(line)
    return 0 if report.success else 1


def cmd_train(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import train
    from vae import distributed as data_parallel

    try:  # under torchrun every rank runs this; rank 0 reports and writes
        s = train.run(Path(a.data), Path(a.out), p, resume=a.resume, val_path=a.val, validated=a.prevalidated,
                      on_epoch=_progress(p.train.epochs))
        if not data_parallel.current().is_main:
            return 0
    finally:
        data_parallel.shutdown()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(train.result_line(s))
    return 0


def cmd_evaluate(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import evaluate

    if a.json is not None:
        check_output(a.json, [Path(a.data)], None)
    _print_json(evaluate.run(a.model, Path(a.data), p, json_path=a.json))
    return 0


def cmd_embed(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import embed

    if a.with_variance:
        p = replace(p, embed=replace(p.embed, with_variance=True))
    if p.embed.dask_address and Path(a.input).is_dir():
        from pipeline.orchestration.flows import embedding_flow

        embed.check_embed_output(Path(a.input), Path(a.output))  # before the cluster starts

        result = embedding_flow(a.model, Path(a.input), Path(a.output), p)
        print(f"wrote {result['rows']} rows in {result['parts']} parts to {a.output} ({result['model_version']})")
        return 0
    rows = embed.run(a.model, Path(a.input), Path(a.output), p, on_batch=_rows_progress("embedded"))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"wrote {rows} rows to {a.output}")
    return 0


def _rows_progress(verb: str) -> Callable[[int], None]:
    """Rows done: one rewritten line on a terminal, plain log lines otherwise."""
    tty = sys.stderr.isatty()
    return lambda n: print(f"\r{verb} {n} rows\033[K" if tty else f"{verb} {n} rows",
                           end="" if tty else "\n", file=sys.stderr, flush=True)


def cmd_sample(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import sample

    several = a.n > sample.SAMPLE_BATCH_ROWS  # progress where there is more than one batch
    rows = sample.run(a.model, a.n, Path(a.output), p, on_batch=_rows_progress("sampled") if several else None)
    if sys.stderr.isatty() and several:
        print(file=sys.stderr)
    print(f"wrote {rows} rows to {a.output}")
    return 0


def _read_metrics(path: Path) -> dict[str, Any]:
    """--metrics: a metrics JSON object as `evaluate --json` writes it."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"--metrics {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise PipelineError(f"--metrics {path} is not JSON{where}; give the file `vaepipe evaluate --json` wrote") from None
    if not isinstance(metrics, dict) or not all(isinstance(v, int | float | list | dict | None) for v in metrics.values()):
        raise PipelineError(f"--metrics {path} is not a metrics JSON object; give the file `vaepipe evaluate --json` wrote")
    return metrics


def cmd_register(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import register

    register.check_alias(a.alias)
    if a.output is not None:
        check_output(a.output, [f for f in (a.metrics, a.table, a.data) if f is not None], None)
    metrics = _read_metrics(a.metrics) if a.metrics else None
    experiment = register.dvc_experiment()  # `dvc exp run`: no alias moves, no gate
    v = register.run(Path(a.model), p, alias=None if experiment else a.alias, metrics=metrics, table=a.table,
                 tags=experiment)
    if experiment:
        name = experiment["dvc_experiment"]
        print(f"registered {v.name} version {v.version} for DVC experiment {name}, without an alias ({v.model_uri}); "
              f"@challenger and @champion stay where they are. To promote it on purpose: "
              f"vaepipe promote --version {v.version} (behind the gate)")
    else:
        print(f"registered {v.name} version {v.version} as @{v.alias} ({v.model_uri})")
    if a.promote and not experiment:
        result = register.promote(p, version=v.version, data=a.data, refuse_raises=False)
        print(result["message"])
    if a.output:
        from vae.store import write_atomic

        write_atomic(Path(a.output),
                     register.registration_json(v.name, v.version, experiment["dvc_experiment"] if experiment else None))
    return 0


def cmd_promote(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import register

    print(register.promote(p, version=a.version, data=a.data)["message"])
    return 0


def cmd_run(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stores import check_prefect_api, check_store

    check_store()  # the flow ends in the registry: a dead server fails now, not after training
    check_prefect_api()
    if not os.environ.get("PREFECT_API_URL"):
        # Prefect starts a temporary server for this run; on a fresh PREFECT_HOME its telemetry task
        # races the database migration and prints a "database is locked" traceback. A server that
        # lives for one run has nothing to report: off unless the user set it.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipeline.orchestration.flows import training_flow

    _quiet_user_tracebacks(a.debug)

    # the flow ends in a State named for the gate's decision; calling it gives that state's result
    result = cast(dict[str, Any], training_flow(params_path=a.params, overrides=a.set, out=a.out, dvc=a.dvc))
    _print_json({k: result[k] for k in ("model_dir", "source", "version", "promotion", "metrics")})
    return 0


def cmd_summary(a: argparse.Namespace, p: Params) -> int:
    from pipeline.stages import summary

    for line in summary.summary_lines(*_summary_paths(a), p.register.model_name):
        print(line)
    return 0


def _summary_paths(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """--metrics, --registered, --model; where not given, the outputs ./dvc.yaml names (one place)."""
    from pipeline.orchestration.versioning import PIPELINE, read_stages

    if a.metrics and a.registered and a.model:
        return a.metrics, a.registered, a.model
    if not PIPELINE.exists():
        raise PipelineError(f"no {PIPELINE} here to find the pipeline's outputs in: run `vaepipe summary` in the "
                            "project, or give --metrics, --registered and --model")
    stages = read_stages()
    return a.metrics or stages.metrics, a.registered or stages.registered, a.model or stages.model


def cmd_serve(a: argparse.Namespace, p: Params) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise PipelineError("serve needs a Prefect server: run `prefect server start` and set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from pipeline.stores import check_prefect_api

    check_prefect_api()
    from pipeline.orchestration import schedule, versioning

    dvc = not a.no_dvc
    if dvc:
        versioning.check_project(p.data.prepared_dir, p.data.source)
    _quiet_user_tracebacks(a.debug)
    schedule.serve(a.cron, a.params, a.set, dvc)
    return 0


def cmd_models(a: argparse.Namespace, p: Params) -> int:
    from pipeline.registry.versions import CHAMPION, list_versions
    from pipeline.stores import tracking_uri

    name = a.name or p.register.model_name
    rows = list_versions(name)
    if not rows:
        print(f"no version of {name} is registered in {tracking_uri()} (vaepipe register, make run)")
        return 0
    print(f"{name} in {tracking_uri()}")
    print(f"{'version':>7}  {'aliases':<22} {'registered (UTC)':<16}  {'held-out nats/row':>17}  {'gate':<9} schema")
    for r in rows:
        ll = "" if r.log_likelihood is None else f"{r.log_likelihood:.4f}"
        aliases = ", ".join(f"@{x}" for x in r.aliases)
        print(f"{r.version:>7}  {aliases:<22} {r.created:<16}  {ll:>17}  {r.gate:<9} {r.schema_hash}")
    champion = next((r.version for r in rows if CHAMPION in r.aliases), None)
    print(f"@{CHAMPION}: " + (f"version {champion} (models:/{name}@{CHAMPION})" if champion else "none yet"))
    return 0


_EXAMPLES = {
    "prepare": "vaepipe prepare --set data.source=data/measurements.csv",
    "validate": "vaepipe validate data/new.parquet --against models:/measurement-vae@champion",
    "train": "vaepipe train data/prepared/train.parquet --out models/vae --set train.epochs=300",
    "evaluate": "vaepipe evaluate models/vae data/prepared/test.parquet --json reports/metrics.json",
    "embed": "vaepipe embed models:/measurement-vae@champion data/new.parquet out/embedding.parquet",
    "sample": "vaepipe sample models/vae 1000 out/samples.parquet",
    "register": "vaepipe register models/vae --metrics reports/metrics.json --promote",
    "promote": "vaepipe promote --version 3 --data data/prepared/test.parquet",
    "models": "vaepipe models --set register.model_name=measurement-vae",
    "run": "vaepipe run --set train.epochs=200",
    "serve": 'vaepipe serve --cron "0 3 * * 1"',
    "summary": "vaepipe summary --metrics reports/metrics.json",
}


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--params", metavar="PATH",
                        help="params file (default ./params.yaml, else built-in defaults), e.g. --params my.yaml")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (value parsed as YAML); repeatable, "
                             "e.g. --set model.hidden_dims=[] --set train.epochs=300")
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    parser = _Parser(prog="vaepipe", description="Gaussian VAEs for tables of i.i.d. measurements.",
                     epilog="example: vaepipe train data.csv --out models/vae; vaepipe <command> --help for more")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def add(name: str, fn: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_, description=help_,
                             epilog=f"example: {_EXAMPLES[name]}")
        cmd.set_defaults(fn=fn)
        return cmd

    model_help = "a model directory written by `vaepipe train`, or models:/NAME@ALIAS or models:/NAME/VERSION"
    c = add("prepare", cmd_prepare, "load data.source and write the train/val/test splits (data.prepared_dir)")
    c.add_argument("--tables", type=Path, metavar="DIR",
                   help="refuse a file data.source outside DIR (the folder the DVC stage depends on)")
    c = add("validate", cmd_validate, "check a table (exit 0 valid, 1 invalid)")
    c.add_argument("data", help="a table, or any data.source (folder, sklearn:NAME, synthetic:RxC), as recorded")
    c.add_argument("--against", metavar="MODEL", help="also check columns, ranges and drift against a model: " + model_help)
    c.add_argument("--report", type=Path, metavar="PATH", help="write the full result as JSON to PATH")
    c = add("train", cmd_train, "train a model into a self-contained directory")
    c.add_argument("data", help="the training table: a CSV or Parquet file")
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="the model directory to write (must not hold "
                   "anything but an earlier model of vaepipe)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last checkpoint")
    c.add_argument("--val", type=Path, metavar="PATH",
                   help="a validation table for early stopping (else train.val_fraction of DATA's rows)")
    c.add_argument("--prevalidated", action="store_true",
                   help="DATA already passed `vaepipe validate` (an earlier dvc stage): don't validate it again")
    c = add("evaluate", cmd_evaluate, "print the metrics JSON of MODEL on DATA (nats/row)")
    c.add_argument("model", help=model_help)
    c.add_argument("data", help="the table to score: a CSV or Parquet file with the model's columns")
    c.add_argument("--json", type=Path, metavar="PATH", help="also write the metrics JSON to PATH")
    c = add("embed", cmd_embed, "stream INPUT and write its embedding to OUTPUT (Parquet)")
    c.add_argument("model", help=model_help)
    c.add_argument("input", help="a CSV or Parquet file, or a folder of Parquet files")
    c.add_argument("output", help="a Parquet file, or a folder of parts when INPUT is a folder")
    c.add_argument("--with-variance", action="store_true", help="also write z_logvar_0 .. (the posterior variances)")
    c = add("sample", cmd_sample, "draw N synthetic rows from p(y)")
    c.add_argument("model", help=model_help)
    c.add_argument("n", type=int, help="how many rows to draw")
    c.add_argument("output", help="the Parquet file to write")
    c = add("register", cmd_register, "log MODEL to MLflow and register it under an alias")
    c.add_argument("model", help="a model directory written by `vaepipe train`")
    c.add_argument("--alias", default="challenger", help="the alias the new version gets (default challenger; "
                   "champion is moved only by the gate)")
    c.add_argument("--metrics", type=Path, metavar="PATH", help="metrics JSON (`vaepipe evaluate --json`) to log with the run")
    c.add_argument("--table", type=Path, metavar="PATH", help="a table for the latent plots (e.g. the test split)")
    c.add_argument("--promote", action="store_true", help="then run the promotion gate; a refusal is reported")
    c.add_argument("--data", type=Path, metavar="PATH", help="with --promote: the evaluation table")
    c.add_argument("--output", type=Path, metavar="PATH", help="write name and version as JSON to PATH")
    c = add("promote", cmd_promote, "move @champion to the challenger if it passes the gate")
    c.add_argument("--version", help="the version to promote (default: @challenger)")
    c.add_argument("--data", type=Path, metavar="PATH", help="evaluation table (default: the prepared test split)")
    c = add("models", cmd_models, "list the registered versions of a model, their aliases and scores")
    c.add_argument("name", nargs="?", help="the registered model (default register.model_name)")
    c = add("run", cmd_run, "the whole training flow as one Prefect flow")
    c.add_argument("--out", metavar="DIR", help="model directory (default models/runs/<time>)")
    c.add_argument("--dvc", action="store_true",
                   help="write the dvc.yaml stages' outputs and record them with dvc commit (and push)")
    c = add("summary", cmd_summary, "what the last pipeline run gave: log-likelihood against the full Gaussian, "
            "where the model, plots and MLflow UI are, the current @champion")
    c.add_argument("--metrics", type=Path, help="the metrics JSON of the held-out rows (default: dvc.yaml's "
                   "evaluate metrics file)")
    c.add_argument("--registered", type=Path, help="the register stage's name and version (default: dvc.yaml's "
                   "register out)")
    c.add_argument("--model", type=Path, help="the model directory (default: dvc.yaml's train out)")
    c = add("serve", cmd_serve, "scheduled retraining: serve vaepipe-train/retrain (needs a Prefect server)")
    c.add_argument("--cron", default="0 3 * * *", help="when to retrain, a cron line (default: 03:00 every day)")
    c.add_argument("--no-dvc", action="store_true",
                   help="don't version data and model with DVC (default: versioned; run from the project root)")
    return parser


class _NoUserTraceback(logging.Filter):
    """Prefect logs a failed task's or flow's traceback; for a user error the one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and user_error(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True


_NO_USER_TRACEBACK = _NoUserTraceback()


def _quiet_user_tracebacks(debug: bool) -> None:
    if not debug:
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(_NO_USER_TRACEBACK)  # once: addFilter skips a filter it holds


def _check_params_file_is_no_output(args: argparse.Namespace) -> None:
    """The params file a command reads is one of its inputs: never an OUTPUT."""
    params = Path(args.params) if args.params else Path("params.yaml")
    for name in ("output", "json", "report"):
        value = getattr(args, name, None)
        if value is not None and same_path(Path(value), params):
            flag = "OUTPUT" if name == "output" and args.command != "register" else f"--{name}"
            raise PipelineError(f"{flag} {value} is the params file this command reads; writing it would destroy it: "
                                "choose another path")


def _fail(args: argparse.Namespace, exc: BaseException, line: str, code: int) -> int:
    if args.debug:
        traceback.print_exception(exc)
    print(f"vaepipe: {line}", file=sys.stderr)
    return code


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              line: str | None = None) -> str:
    return f"vaepipe: warning: {(str(message).strip().splitlines() or [''])[0]}\n"


def _quiet_library_warnings() -> None:
    """A library's warnings (torch's pickle protocol, scipy's precision) reach the terminal only
    with --debug: what they warn of, vaepipe reports in its own words where it matters. vaepipe's
    own warnings stay, as one line. Filters and format only: a caller recording warnings still does."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"(pipeline|vae)(\.|$)")
    warnings.formatwarning = _one_line


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        _quiet_library_warnings()
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat the one error line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    try:
        _check_params_file_is_no_output(args)
        params = load_params(Path(args.params) if args.params else None, args.set)
        return int(args.fn(args, params))
    except KeyboardInterrupt:
        print("\nvaepipe: interrupted" + ("; continue with --resume" if args.command == "train" else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        known = user_error(exc)  # user and environment errors (full disk, read-only path, ...): one line, exit 2
        if known is not None:
            return _fail(args, exc, f"error: {known}", getattr(known, "exit_code", 2))
        # a bug, not a user mistake: one line unless --debug
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(args, exc, f"internal error: {exc.__class__.__name__}: {first} (rerun with --debug)", 3)
