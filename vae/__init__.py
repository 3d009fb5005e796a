"""vae: a Gaussian variational autoencoder for tables of i.i.d. measurements (torch only)."""

from vae.baselines import Baselines, fit_baselines
from vae.config import ModelConfig, TrainConfig, config_from_dict
from vae.elbo import LossTerms, kl_per_dim, kl_weight, loss_terms, reparameterize
from vae.errors import ConfigError, DataError, ModelDirError, TrainingDivergedError, VAEError
from vae.evaluate import Evaluation, RowScores, evaluate, score_rows, summarize
from vae.inference import Embedding, anomaly_threshold, embed, reconstruct, sample, traversals
from vae.init import init_linear_gaussian
from vae.model import VAE, DecoderOut, Posterior
from vae.probe import PrecisionGap, precision_gap
from vae.store import (
    load_baselines,
    load_checkpoint,
    load_model,
    read_manifest,
    save_checkpoint,
    save_model,
)
from vae.table import TableSpec, check_log_domain, check_values, describe_table
from vae.train import EpochStats, FitResult, TrainState, fit, resolve_device

__all__ = [
    "VAE", "Baselines", "ConfigError", "DataError", "DecoderOut", "Embedding", "EpochStats", "Evaluation",
    "FitResult", "LossTerms", "ModelConfig", "ModelDirError", "Posterior", "PrecisionGap", "RowScores", "TableSpec",
    "TrainConfig", "TrainState", "TrainingDivergedError", "VAEError", "anomaly_threshold",
    "check_log_domain", "check_values", "config_from_dict", "describe_table", "embed", "evaluate", "fit", "fit_baselines", "init_linear_gaussian", "kl_per_dim",
    "kl_weight", "load_baselines", "load_checkpoint", "load_model", "loss_terms", "precision_gap", "read_manifest", "reconstruct",
    "reparameterize", "resolve_device", "sample", "save_checkpoint", "save_model", "score_rows",
    "summarize", "traversals",
]
