"""User mistakes raise project errors whose message names the culprit and says what to do."""

from __future__ import annotations

import pytest
import torch

import vae

NAMES = ["temp", "pressure", "flow"]


def _table(n: int = 20) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))


def test_wrong_width_names_both_widths():
    with pytest.raises(vae.DataError, match="4 columns but the model expects 3"):
        vae.check_values(torch.zeros(5, 4), NAMES, "reject")
    with pytest.raises(vae.DataError, match="2-D"):
        vae.check_values(torch.zeros(5), NAMES, "reject")


def test_fit_refuses_a_table_of_the_wrong_width():
    model = vae.VAE(vae.describe_table(_table(), NAMES), vae.ModelConfig(latent_dim=1, hidden_dims=()))
    with pytest.raises(vae.DataError, match="expects 3"):
        vae.fit(model, torch.randn(10, 4), vae.TrainConfig(epochs=1, device="cpu"))


def test_nan_without_mask_names_column_and_row_and_the_fix():
    y = _table()
    y[7, 1] = float("nan")
    with pytest.raises(vae.DataError, match=r"column 'pressure' row 7 holds nan.*data\.missing: mask"):
        vae.describe_table(y, NAMES)
    with pytest.raises(vae.DataError, match=r"'pressure' row 7"):
        vae.check_values(y, NAMES, "reject")
    vae.check_values(y, NAMES, "mask")  # allowed with the mask policy


@pytest.mark.parametrize("missing", ["reject", "mask"])
def test_inf_is_refused_under_either_policy(missing):
    y = _table()
    y[3, 2] = float("-inf")
    with pytest.raises(vae.DataError, match=r"column 'flow' row 3 holds -inf; values must be finite") as err:
        vae.check_values(y, NAMES, missing)
    assert "data.missing" not in str(err.value)  # masking would not help


def test_constant_column_is_named():
    y = _table()
    y[:, 2] = 4.5
    with pytest.raises(vae.DataError, match=r"column 'flow' is constant \(4.5\); drop it"):
        vae.describe_table(y, NAMES)


def test_fully_missing_column_is_named():
    y = _table()
    y[:, 0] = float("nan")
    with pytest.raises(vae.DataError, match="column 'temp' has no observed value"):
        vae.describe_table(y, NAMES, missing="mask")


def test_bernoulli_on_a_non_binary_column_names_it():
    y = (_table() > 0).float()
    y[5, 1] = 0.5
    with pytest.raises(vae.DataError, match=r"column 'pressure' row 5 holds 0.5; model.likelihood: bernoulli"):
        vae.describe_table(y, NAMES, likelihood="bernoulli")


def test_too_few_rows():
    with pytest.raises(vae.DataError, match="1 rows"):
        vae.describe_table(torch.randn(1, 3), NAMES)


@pytest.mark.parametrize(
    ("cls", "section", "values", "culprit"),
    [
        (vae.ModelConfig, "model", {"latent_dim": 2, "hiden_dims": [8]}, "model.hiden_dims"),
        (vae.TrainConfig, "train", {"epoch": 3}, "train.epoch"),
        (vae.ModelConfig, "model", {"decoder_variance": "foo"}, "model.decoder_variance"),
        (vae.ModelConfig, "model", {"likelihood": "poisson"}, "model.likelihood"),
        (vae.ModelConfig, "model", {"latent_dim": 0}, "model.latent_dim"),
        (vae.ModelConfig, "model", {"hidden_dims": [8, 0]}, "model.hidden_dims"),
        (vae.ModelConfig, "model", {"min_sigma": -1.0}, "model.min_sigma"),
        (vae.TrainConfig, "train", {"val_fraction": 1.0}, "train.val_fraction"),
        (vae.TrainConfig, "train", {"lr": 0.0}, "train.lr"),
        (vae.TrainConfig, "train", {"batch_size": 0}, "train.batch_size"),
        (vae.TrainConfig, "train", {"device": "tpu"}, "train.device"),
        (vae.TrainConfig, "train", {"lr_backoff": 1.0}, "train.lr_backoff"),
    ],
)
def test_config_errors_name_section_and_key(cls, section, values, culprit):
    with pytest.raises(vae.ConfigError, match=culprit.replace(".", r"\.")):
        vae.config_from_dict(cls, section, values)


def test_wrong_value_type_is_a_config_error():
    with pytest.raises(vae.ConfigError, match="model"):
        vae.config_from_dict(vae.ModelConfig, "model", {"latent_dim": "eight"})


def test_bad_value_in_the_constructor_lists_the_choices():
    with pytest.raises(vae.ConfigError, match=r"model\.decoder_variance is 'foo'; choose one of fixed, shared"):
        vae.ModelConfig(decoder_variance="foo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(vae.ConfigError, match=r"train\.device is 'cuda' but no CUDA device"):
        vae.resolve_device("cuda")
    model = vae.VAE(vae.describe_table(_table(), NAMES), vae.ModelConfig(latent_dim=1, hidden_dims=()))
    with pytest.raises(vae.ConfigError, match="auto or cpu"):
        vae.fit(model, _table(), vae.TrainConfig(epochs=1, device="cuda"))


def test_val_fraction_that_leaves_an_empty_split():
    y = _table(n=3)
    model = vae.VAE(vae.describe_table(y, NAMES), vae.ModelConfig(latent_dim=1, hidden_dims=()))
    with pytest.raises(vae.DataError, match=r"train\.val_fraction 0.1 of 3 rows"):
        vae.fit(model, y, vae.TrainConfig(epochs=1, val_fraction=0.1, device="cpu"))


def test_errors_share_the_project_base_and_the_builtin_kinds():
    assert issubclass(vae.DataError, vae.VAEError) and issubclass(vae.DataError, ValueError)
    assert issubclass(vae.ConfigError, ValueError) and issubclass(vae.ModelDirError, OSError)
    assert issubclass(vae.TrainingDivergedError, RuntimeError)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"missing": "refuse"}, "data.missing is 'refuse'; choose one of"),
    ({"likelihood": "poisson"}, "model.likelihood is 'poisson'; choose one of"),
    ({"log_columns": "all"}, "model.log_columns is 'all'; choose auto, none or a list"),
])
def test_describe_table_refuses_an_unknown_choice_by_name(kwargs, says):
    from vae import ConfigError, describe_table

    with pytest.raises(ConfigError, match=says):
        describe_table(torch.randn(20, 3), **kwargs)
