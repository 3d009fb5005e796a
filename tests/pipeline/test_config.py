"""params.yaml and --set: values are YAML, with numbers in exponent form read as numbers."""

from __future__ import annotations

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


def test_docs_params_md_is_rendered_from_params_yaml():
    """docs/params.md is generated (`make docs`): it fails here when params.yaml changed without it."""
    from pathlib import Path

    from pipeline.params_doc import PARAMS, render

    docs = Path(__file__).resolve().parents[2] / "docs" / "params.md"
    assert docs.read_text(encoding="utf-8") == render(PARAMS.read_text(encoding="utf-8")), "run `make docs`"
    assert "| `calibration_fraction` | `0.2` |" in docs.read_text(encoding="utf-8")
