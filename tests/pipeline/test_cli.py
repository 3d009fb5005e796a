"""The CLI end to end on good and malformed tables: exit codes, one-line errors, nothing written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from pipeline.cli import main
from pipeline.config import ValidateParams
from tests.pipeline.helpers import FAST_ARGS, IDS, clean_table, run
from tests.vae.closed_form import ppca_heldout_loglik

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-model")
    clean_table(seed=1).to_parquet(root / "train.parquet", index=False)
    assert main(["train", str(root / "train.parquet"), "--out", str(root / "model"), *FAST_ARGS]) == 0
    return root / "model"


def test_train_evaluate_embed_sample(model_dir, tmp_path, capsys):
    test = tmp_path / "test.parquet"
    clean_table(n=120, seed=2).to_parquet(test, index=False)
    code, out, _ = run(capsys, "evaluate", str(model_dir), str(test), "--json", str(tmp_path / "m.json"), *FAST_ARGS)
    assert code == 0
    metrics = json.loads(out)
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_rows"] == 120 and metrics["iw_samples"] == 20
    assert metrics["elbo"] == pytest.approx(metrics["reconstruction"] - metrics["kl"])
    # a bound in expectation: near the closed-form start q is almost exact and the IWAE stderr
    # almost 0, so what is left is the ELBO's own Monte Carlo error (120 rows x 20 draws)
    assert metrics["elbo"] <= metrics["log_likelihood"] + 0.2
    assert list(metrics["per_feature_reconstruction"]) == [f"m{j}" for j in range(5)]

    out_path = tmp_path / "emb.parquet"
    assert run(capsys, "embed", str(model_dir), str(test), str(out_path), "--with-variance", *FAST_ARGS)[0] == 0
    emb = pd.read_parquet(out_path)
    assert list(emb.columns) == ["sample_id", "z_0", "z_1", "z_logvar_0", "z_logvar_1", "log_likelihood", "anomaly"]
    assert emb["sample_id"].tolist() == list(range(120))

    assert run(capsys, "sample", str(model_dir), "50", str(tmp_path / "s.parquet"), *FAST_ARGS)[0] == 0
    assert pd.read_parquet(tmp_path / "s.parquet").shape == (50, 5)


def test_metrics_carry_the_closed_form_baselines_of_the_training_table(model_dir, tmp_path, capsys):
    train = clean_table(seed=1).drop(columns="sample_id").to_numpy(np.float64, copy=True)
    test_df = clean_table(n=120, seed=2)
    test_df.to_parquet(tmp_path / "test.parquet", index=False)
    code, out, _ = run(capsys, "evaluate", str(model_dir), str(tmp_path / "test.parquet"), *FAST_ARGS)
    assert code == 0
    baselines = json.loads(out)["baselines"]
    test = torch.from_numpy(test_df.drop(columns="sample_id").to_numpy(np.float64, copy=True))
    t = torch.from_numpy(train)
    mean, cov = t.mean(0), torch.cov(t.T, correction=0)
    full = MultivariateNormal(mean, cov).log_prob(test).mean()
    diag = Normal(mean, cov.diagonal().sqrt()).log_prob(test).sum(-1).mean()
    assert baselines["full_gauss"] == pytest.approx(float(full), abs=1e-6)
    assert baselines["diag_gauss"] == pytest.approx(float(diag), abs=1e-6)
    # pPCA with the model's latent size (2), variance shared on the standardized scale
    assert baselines["ppca"] == pytest.approx(ppca_heldout_loglik(t, test, 2, standardize=True), abs=1e-6)


def test_scores_use_the_thresholds_settings_whatever_the_batching(model_dir, tmp_path, capsys):
    test = tmp_path / "test.parquet"
    clean_table(n=90, seed=4).to_parquet(test, index=False)
    outs = {}
    for name, extra in (("default", []), ("batched", ["--set", "embed.batch_rows=7"]),
                        ("overridden", ["--set", "embed.score_samples=3", "--set", "embed.seed=9"])):
        argv = ("embed", str(model_dir), str(test), str(tmp_path / f"{name}.parquet"), *FAST_ARGS, *extra)
        if name == "overridden":  # the threshold was placed with 10 samples and seed 0: those are used
            with pytest.warns(UserWarning, match=r"embed.score_samples=10 and embed.seed=0"):
                code, _, err = run(capsys, *argv)
        else:
            code, _, err = run(capsys, *argv)
        assert code == 0, err
        outs[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    for name in ("batched", "overridden"):
        np.testing.assert_allclose(outs[name]["log_likelihood"], outs["default"]["log_likelihood"], rtol=0, atol=1e-4)
        assert outs[name]["anomaly"].tolist() == outs["default"]["anomaly"].tolist()
    # a row's score is the row's alone: the same as when it is scored by itself
    one = tmp_path / "one.parquet"
    clean_table(n=90, seed=4).iloc[[41]].to_parquet(one, index=False)
    assert run(capsys, "embed", str(model_dir), str(one), str(tmp_path / "one_out.parquet"), *FAST_ARGS)[0] == 0
    alone = pd.read_parquet(tmp_path / "one_out.parquet")["log_likelihood"].iloc[0]
    assert alone == pytest.approx(outs["default"]["log_likelihood"].iloc[41], abs=1e-4)


def test_same_seed_same_numbers(model_dir, tmp_path, capsys):
    test = tmp_path / "test.parquet"
    clean_table(n=60, seed=3).to_parquet(test, index=False)
    first = run(capsys, "evaluate", str(model_dir), str(test), *FAST_ARGS)[1]
    assert run(capsys, "evaluate", str(model_dir), str(test), *FAST_ARGS)[1] == first


def _bad_tables(tmp_path):
    base = clean_table()
    nan = base.copy()
    nan.loc[7, "m2"] = np.nan
    inf = base.copy()
    inf.loc[3, "m1"] = np.inf
    text = base.copy()
    text["m4"] = "abc"
    const = base.copy()
    const["m3"] = 1.5
    dup = pd.concat([base.iloc[:150]] * 2, ignore_index=True).assign(sample_id=range(300))
    trend = base.sort_values("m0").assign(sample_id=range(300))
    empty = base.iloc[:0]
    cases = {"nan": (nan, "m2"), "inf": (inf, "m1"), "text": (text, "m4"), "const": (const, "m3"),
             "dup": (dup, "duplicate"), "trend": (trend, "m0"), "empty": (empty, "empty.parquet")}
    for name, (df, _) in cases.items():
        df.to_parquet(tmp_path / f"{name}.parquet", index=False)
    good = tmp_path / "good.parquet"
    base.to_parquet(good, index=False)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notatable.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    culprits = {f"{k}.parquet": v[1] for k, v in cases.items()}
    culprits |= {"truncated.parquet": "truncated.parquet", "notatable.csv": "notatable.csv",
                 "missing.parquet": "missing.parquet"}
    return culprits


def test_malformed_tables_fail_cleanly(tmp_path, capsys):
    culprits = _bad_tables(tmp_path)
    for name, culprit in culprits.items():
        out_dir = tmp_path / f"model-{name}"
        code, _, err = run(capsys, "train", str(tmp_path / name), "--out", str(out_dir), *FAST_ARGS)
        assert code in (1, 2), name
        assert culprit.lower() in err.lower(), (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out_dir.exists(), name
        vcode, vout, verr = run(capsys, "validate", str(tmp_path / name), *IDS)
        assert vcode in (1, 2), name
        assert culprit.lower() in (vout + verr).lower(), (name, vout, verr)


def test_iid_warn_lets_a_trend_through(tmp_path, capsys):
    trend = clean_table().sort_values("m0").assign(sample_id=range(300))
    trend.to_parquet(tmp_path / "trend.parquet", index=False)
    assert run(capsys, "validate", str(tmp_path / "trend.parquet"), *IDS, "--set", "validate.iid=warn")[0] == 0


def test_columns_against_a_model(model_dir, tmp_path, capsys):
    df = clean_table(n=50).drop(columns=["m1"]).assign(extra=1.0)
    df.to_parquet(tmp_path / "other.parquet", index=False)
    code, out, err = run(capsys, "validate", str(tmp_path / "other.parquet"), "--against", str(model_dir), *IDS)
    assert code == 1 and "m1" in out + err and "extra" in out + err
    code, _, err = run(capsys, "embed", str(model_dir), str(tmp_path / "other.parquet"), str(tmp_path / "e.parquet"), *FAST_ARGS)
    assert code == 2 and "m1" in err and "extra" in err
    assert not (tmp_path / "e.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.parquet")]


def test_embed_reports_drift_in_its_output_and_on_stderr(model_dir, tmp_path, capsys, caplog):
    from pipeline.contract.drift import column_drift
    from pipeline.contract.model import load_model_dir
    from pipeline.stages.embed import read_drift

    same = clean_table(seed=1)  # the training table itself: nothing drifts
    shifted = same.assign(m2=same["m2"] + 1.5 * same["m2"].std())
    args = [*FAST_ARGS, "--set", "embed.batch_rows=64"]  # 5 batches: the drift statistics are streamed
    for name, df in (("same", same), ("shifted", shifted)):
        df.to_parquet(tmp_path / f"{name}.parquet", index=False)
        caplog.clear()
        assert run(capsys, "embed", str(model_dir), str(tmp_path / f"{name}.parquet"),
                   str(tmp_path / f"{name}-emb.parquet"), *args)[0] == 0
        warned = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
        report = {d["column"]: d for d in read_drift(tmp_path / f"{name}-emb.parquet")}
        assert list(report) == [f"m{j}" for j in range(5)] and all(d["n_rows"] == 300 for d in report.values())
        if name == "same":
            assert not warned and not any(d["drifted"] for d in report.values())
        else:
            [line] = warned
            assert "'m2' (+1.5" in line and "'m1'" not in line
            assert [c for c, d in report.items() if d["drifted"]] == ["m2"]
    whole = column_drift(load_model_dir(model_dir).schema, shifted, ValidateParams())
    assert [d.ks for d in whole] == pytest.approx([report[d.column]["ks"] for d in whole], abs=1e-12)
    code, _, err = run(capsys, "embed", str(model_dir), str(tmp_path / "shifted.parquet"),
                       str(tmp_path / "off.parquet"), *args, "--set", "validate.drift=off")
    assert code == 0 and read_drift(tmp_path / "off.parquet") == [], err


def test_usage_errors(tmp_path, capsys, table_path):
    code, _, err = run(capsys, "train", str(table_path), "--out", str(tmp_path / "m"), "--set", "train.epoch=3")
    assert code == 2 and "train.epoch" in err and not (tmp_path / "m").exists()
    code, _, err = run(capsys, "evaluate", str(tmp_path / "nope"), str(table_path))
    assert code == 2 and "nope" in err
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2


def test_killed_training_resumes_to_the_same_weights(tmp_path, capsys, table_path):
    import signal
    import time

    import torch

    args = [*FAST_ARGS, "--set", "train.epochs=60", "--set", "train.batch_size=16",
            "--set", "train.early_stopping_patience=1000"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    exe = os.path.join(os.path.dirname(sys.executable), "vaepipe")
    proc = subprocess.Popen([exe, "train", str(table_path), "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.json").exists(), "training finished before it could be killed"
    code, _, err = run(capsys, "train", str(table_path), "--out", str(killed), *args)
    assert code == 2 and "--resume" in err
    assert run(capsys, "train", str(table_path), "--out", str(killed), "--resume", *args)[0] == 0
    assert run(capsys, "train", str(table_path), "--out", str(full), *args)[0] == 0
    a = torch.load(killed / "weights.pt", weights_only=True)
    b = torch.load(full / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    code, _, err = run(capsys, "train", str(table_path), "--out", str(killed), "--resume", *args)
    assert code == 2 and "finished" in err


def test_console_script_exit_code_and_one_line(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "vaepipe")
    r = subprocess.run([exe, "validate", str(tmp_path / "missing.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.csv" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the CLI's own help (issue 17, item 16)


def test_version_names_vaepipe_and_its_stack(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("vaepipe 0.") and "torch 2." in out and "mlflow 3." in out and out.count("\n") == 1


def test_every_argument_has_help_and_every_command_an_example():
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"models", "train", "embed"} <= set(commands)
    for name, cmd in commands.items():
        assert cmd.epilog and cmd.epilog.startswith(f"example: vaepipe {name}"), name
        for action in cmd._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.dest} has no help"


@pytest.mark.parametrize(("argv", "hint"), [([], "(see vaepipe --help)"), (["nonsense"], "(see vaepipe --help)"),
                                            (["train"], "(see vaepipe train --help)")])
def test_a_usage_error_points_at_the_right_help(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and hint in err and "vaepipe vaepipe" not in err


def test_models_lists_versions_aliases_and_the_champion(model_dir, tmp_path, monkeypatch, capsys):
    import mlflow

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store under the cwd: nothing there yet
    code, out, _ = run(capsys, "models")
    assert code == 0 and "no version of measurement-vae is registered" in out
    assert list((tmp_path / "empty").iterdir()) == []  # no mlflow/ folder left behind
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    try:
        code, out, _ = run(capsys, "models")
        assert code == 0 and "no version of measurement-vae is registered" in out
        assert not (tmp_path / "store").exists()  # listing creates no store, not even its folder
        clean_table(n=120, seed=2).to_parquet(tmp_path / "test.parquet", index=False)
        metrics = tmp_path / "m.json"
        assert run(capsys, "evaluate", str(model_dir), str(tmp_path / "test.parquet"), "--json", str(metrics),
                   *FAST_ARGS)[0] == 0
        code, out, err = run(capsys, "register", str(model_dir), "--metrics", str(metrics), "--promote",
                             "--data", str(tmp_path / "test.parquet"), *FAST_ARGS, "--set", "validate.drift=off")
        assert code == 0, out + err
        ll = json.loads(metrics.read_text())["log_likelihood"]
        code, out, _ = run(capsys, "models")
        assert code == 0
        lines = out.splitlines()
        row = next(line for line in lines if line.split()[0] == "1")
        assert "@champion" in row and f"{ll:.4f}" in row and "promoted" in row
        assert lines[-1] == "@champion: version 1 (models:/measurement-vae@champion)"
        code, _, err = run(capsys, "models", "no-such-model")
        assert code == 2 and "no registered model named 'no-such-model'" in err and "measurement-vae" in err
    finally:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def test_after_a_refit_with_val_the_baselines_are_fitted_on_every_row_the_model_saw(tmp_path, capsys):
    """--val and train.refit: the final model trains on the training and validation rows, and so are
    the baselines' closed forms fitted (scoring them on the training table alone went unnoticed)."""
    rows = clean_table(n=360, seed=1)
    rows.iloc[:300].to_parquet(tmp_path / "train.parquet", index=False)
    rows.iloc[300:].to_parquet(tmp_path / "val.parquet", index=False)
    test_df = clean_table(n=120, seed=2)
    test_df.to_parquet(tmp_path / "test.parquet", index=False)
    no_slice = ["--set", "train.calibration_fraction=0"]  # every training row reaches the selection too
    assert main(["train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
                 "--out", str(tmp_path / "m"), *FAST_ARGS, *no_slice]) == 0
    capsys.readouterr()  # train's lines
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "m"), str(tmp_path / "test.parquet"), *FAST_ARGS)
    assert code == 0
    seen = torch.from_numpy(rows.drop(columns="sample_id").to_numpy(np.float64, copy=True))
    test = torch.from_numpy(test_df.drop(columns="sample_id").to_numpy(np.float64, copy=True))
    full = MultivariateNormal(seen.mean(0), torch.cov(seen.T, correction=0)).log_prob(test).mean()
    assert json.loads(out)["baselines"]["full_gauss"] == pytest.approx(float(full), abs=1e-6)


def test_summary_finds_the_outputs_where_dvc_yaml_puts_them(tmp_path, monkeypatch, capsys):
    """The pipeline's output paths live in dvc.yaml alone: `vaepipe summary` reads its defaults there
    (a project that moved its metrics file is followed), and says what to do where there is none."""
    text = (ROOT / "dvc.yaml").read_text()
    assert "reports/metrics.json" in text
    (tmp_path / "dvc.yaml").write_text(text.replace("reports/metrics.json", "elsewhere/held_out.json"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "summary")
    assert code == 2 and "elsewhere/held_out.json does not exist" in err, err
    (tmp_path / "dvc.yaml").unlink()
    code, _, err = run(capsys, "summary")
    assert code == 2 and "no dvc.yaml here" in err and "--metrics" in err, err
