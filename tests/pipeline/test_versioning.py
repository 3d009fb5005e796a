"""dvc.yaml describes the pipeline once: `vaepipe run --dvc` reads its stages and the paths they
write from it (pipeline.orchestration.versioning), and refuses a dvc.yaml it could not follow. The
flow and `dvc repro` running for real: test_scheduled.py and test_user_table.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.orchestration import versioning

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _written(stage: dict) -> list[str]:
    """What a stage of dvc.yaml writes: its outs, metrics and plots files."""
    return [next(iter(e)) if isinstance(e, dict) else e for key in ("outs", "metrics", "plots")
            for e in stage.get(key) or []]


def test_the_flow_writes_every_output_of_dvc_yaml_and_commits_every_stage() -> None:
    stages = versioning.read_stages(ROOT / "dvc.yaml")
    assert sorted(map(str, stages.outputs)) == sorted(p for s in SPEC.values() for p in _written(s))
    assert stages.names == tuple(SPEC) and set(stages.training) | {versioning.REGISTER} == set(SPEC)
    assert stages.tables == Path("data/tables") and str(stages.tables) in SPEC["prepare"]["cmd"]


def test_each_stage_command_writes_where_dvc_yaml_says() -> None:
    """The outs dvc.yaml declares are where its commands (the CLI) write: the paths in the command,
    and for prepare the splits' folder data.prepared_dir of params.yaml."""
    prepared = load_params(ROOT / "params.yaml", []).data.prepared_dir
    for name, stage in SPEC.items():
        for path in _written(stage):
            assert path in stage["cmd"] or (name == "prepare" and path == prepared), (name, path)


def test_the_orchestration_code_repeats_no_path_of_dvc_yaml() -> None:
    code = {p.name: p.read_text() for p in (ROOT / "pipeline" / "orchestration").glob("*.py")}
    for path in [p for s in SPEC.values() for p in _written(s)]:
        assert not [name for name, text in code.items() if path in text], path


def _with(tmp_path: Path, change) -> Path:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    change(spec["stages"])
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(report={"cmd": "vaepipe summary", "outs": ["reports/summary.txt"]}),
     r"has the stages prepare, validate, train, evaluate, register, report; `vaepipe run --dvc` writes prepare, "),
    (lambda s: s.pop("register"), r"has the stages prepare, validate, train, evaluate; "),
    (lambda s: s["validate"]["outs"].append("reports/more.json"),
     r"`vaepipe run --dvc` needs one out in stage validate, not 2 \(reports/validation.json, reports/more.json\)"),
    (lambda s: s["train"]["outs"].pop(), r"stage train has 1 outs; `vaepipe run --dvc` writes 2: the model directory"),
    (lambda s: s["prepare"]["deps"].remove("data/tables"), r"needs one data dependency besides the code in stage prepare, not 0 \(none\)"),
])
def test_a_dvc_yaml_the_flow_could_not_follow_is_refused(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        versioning.read_stages(_with(tmp_path, change))


def test_moved_outputs_are_followed(tmp_path: Path) -> None:
    def move(stages: dict) -> None:
        stages["evaluate"]["metrics"] = [{"out/metrics.json": {"cache": False}}]
        stages["train"]["outs"][0] = "out/model"

    stages = versioning.read_stages(_with(tmp_path, move))
    assert (stages.metrics, stages.model) == (Path("out/metrics.json"), Path("out/model"))
