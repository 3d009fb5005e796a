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
