"""params.yaml and --set: values are YAML, with numbers in exponent form read as numbers; params.yaml and
docs/params.md are written from the settings' declarations; a choice is its Literal's."""

from __future__ import annotations

import re

import pytest

from pipeline.config import load_params, parse_override


@pytest.mark.parametrize(("text", "value"), [("1e-5", 1e-5), ("3E-4", 3e-4), ("-2e3", -2000.0), ("1.5e2", 150.0),
                                             ("'1e-5'", "1e-5"), ("abc1e5", "abc1e5"), ("[]", []), ("off", False)])
def test_override_values_are_yaml_with_exponent_numbers(text, value):
    assert parse_override(f"model.min_sigma={text}") == ("model", "min_sigma", value)


def test_exponent_numbers_reach_the_config_from_set_and_from_the_params_file(tmp_path):
    assert load_params(None, ["model.min_sigma=1e-5"]).model.min_sigma == 1e-5  # PyYAML alone reads a string
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 5e-4\n")
    assert load_params(path, []).train.lr == 5e-4


def test_params_yaml_lists_every_key_at_its_built_in_default():
    """params.yaml is the complete, commented list of settings: every key of every section, each at
    the value the code uses when the file is absent, and nothing else (it once lacked 19 keys,
    the whole drift block among them, and nothing checked that the two agreed)."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    from pipeline.config import SECTIONS

    listed = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert set(listed) == set(SECTIONS)
    for name, section in SECTIONS.items():
        defaults = asdict(section())
        assert set(listed[name]) == set(defaults), (name, set(listed[name]) ^ set(defaults))
        for key, value in defaults.items():
            value = list(value) if isinstance(value, tuple) else value  # YAML has lists
            assert listed[name][key] == value, f"{name}.{key}: params.yaml {listed[name][key]!r}, default {value!r}"


def test_params_yaml_and_docs_params_md_are_written_from_the_declarations():
    """params.yaml (`make params`) and docs/params.md (`make docs`) are generated from the settings'
    declarations: it fails here when a key, default, choice or help changed without them."""
    from pathlib import Path

    from pipeline.params_doc import params_md, params_yaml

    root = Path(__file__).resolve().parents[2]
    assert (root / "params.yaml").read_text(encoding="utf-8") == params_yaml(), "run `make params`"
    docs = (root / "docs" / "params.md").read_text(encoding="utf-8")
    assert docs == params_md(), "run `make docs`"
    assert "| `calibration_fraction` | `0.2` |" in docs
    assert "| `missing` | `reject` | reject \\| mask: " in docs  # the choices come from the Literal
    assert "  cuda_graph: auto\n" in params_yaml() and "# auto | true | false: " in params_yaml()


def test_a_setting_without_help_is_named():
    from dataclasses import dataclass, field, fields

    from pipeline.params_doc import _help

    @dataclass(frozen=True)
    class Section:
        bare: int = 1
        empty: int = field(default=2, metadata={"help": ""})

    for f in fields(Section):
        with pytest.raises(TypeError, match=rf"train\.{f.name} has no help: declare it as {f.name}: TYPE = setting"):
            _help("train", f)


def test_every_choice_key_refuses_what_its_literal_does_not_list():
    """A key annotated with a Literal is checked against it, built from a params file or directly:
    the message names section.key and the choices."""
    import typing
    from dataclasses import fields

    from pipeline.config import SECTIONS
    from pipeline.errors import PipelineError
    from vae import ConfigError
    from vae.config import choices

    checked = []
    for name, section in SECTIONS.items():
        cls = type(section())
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if options := choices(hints[f.name]):
                message = f"{name}.{f.name} is 'nonsense'; choose one of {', '.join(options)}"
                with pytest.raises(ConfigError, match=re.escape(message)):
                    cls(**{f.name: "nonsense"})
                with pytest.raises(PipelineError, match=re.escape(message)):
                    load_params(None, [f"{name}.{f.name}=nonsense"])
                checked.append(f"{name}.{f.name}")
    assert {"data.missing", "validate.iid", "validate.drift", "embed.device", "train.device",
            "model.decoder_variance", "train.cuda_graph"} <= set(checked)


def test_a_bare_off_reads_as_off():
    """YAML 1.1 reads a bare `off` as false: the check keys take it as "off"."""
    from pipeline.config import ValidateParams

    assert load_params(None, ["validate.iid=off", "validate.drift=off"]).validate.iid == "off"
    assert ValidateParams(iid=False, drift=False) == ValidateParams(iid="off", drift="off")  # type: ignore[arg-type]


def test_read_by_names_every_stage_that_reads_a_section():
    """pipeline.config.READ_BY (rendered in docs/params.md) against the code: the stage modules (the
    register stage with its gate) and the sections of Params they read."""
    import re
    from pathlib import Path

    from pipeline.config import READ_BY, SECTIONS

    root = Path(__file__).resolve().parents[2] / "pipeline"
    modules = {stage: [root / "stages" / f"{stage}.py"] for stage in
               ("prepare", "validate", "train", "evaluate", "register", "embed", "sample")}
    modules["register"].append(root / "registry" / "gate.py")
    read = {section: set() for section in SECTIONS}
    for stage, files in modules.items():
        text = "".join(f.read_text(encoding="utf-8") for f in files)
        for section in set(re.findall(rf"\bparams\.({'|'.join(SECTIONS)})\b", text)):
            read[section].add(stage)
    assert {s: set(stages) for s, stages in READ_BY.items()} == read
    assert all(READ_BY[s] for s in SECTIONS)
