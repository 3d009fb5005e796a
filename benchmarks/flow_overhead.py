"""Prefect + MLflow overhead of one training run: the flow's wall time against the same steps called directly.

    python benchmarks/flow_overhead.py [--set section.key=value ...]

Runs in a temporary folder (own MLflow store, own Prefect home) on params.yaml's data, so it
leaves the project's stores alone. Prints seconds per step and the overhead per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vaepipe-bench-"))
    os.environ.update(PREFECT_HOME=str(work / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
                      PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true")
    params_path = str(ROOT / "params.yaml")
    os.chdir(work)
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_params
    from pipeline.orchestration.flows import training_flow
    from pipeline.stages import evaluate, prepare, register, train, validate

    params = load_params(Path(params_path), args.set)
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[name] = time.perf_counter() - t0
        return out

    splits = timed("prepare", prepare.run, params)
    timed("validate", validate.run, splits["train"], params)
    timed("train", train.run, splits["train"], work / "direct", params, val_path=splits["val"], validated=True)
    metrics = timed("evaluate", evaluate.run, str(work / "direct"), splits["test"], params)
    v = timed("register", register.run, work / "direct", params, metrics=metrics, table=splits["test"])
    timed("promote", register.promote, params, version=v.version, data=splits["test"], refuse_raises=False)
    direct = sum(timings.values())
    for name, s in timings.items():
        print(f"direct {name:9s} {s:7.2f} s")
    print(f"direct total     {direct:7.2f} s   (train + evaluate {timings['train'] + timings['evaluate']:.2f} s)")
    for i in (1, 2):
        t0 = time.perf_counter()
        training_flow(params_path=params_path, overrides=args.set, out=str(work / f"flow{i}"))
        wall = time.perf_counter() - t0
        label = "first flow (starts the ephemeral Prefect API)" if i == 1 else "second flow"
        print(f"{label}: {wall:.2f} s; over the direct steps: {wall - direct:+.2f} s; "
              f"Prefect + MLflow share beyond train + evaluate: {wall - timings['train'] - timings['evaluate']:.2f} s")


if __name__ == "__main__":
    main()
