"""Whether a table or a model may be compared with @champion: the same table contract.

A table or model whose columns differ from the champion's cannot be gated against it nor
registered under its name; the error says how to give it a name of its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.contract.model import LoadedModel, load_model_dir
from pipeline.errors import PipelineError
from pipeline.registry.versions import CHAMPION, current_champion, download_model_dir


def version_model(name: str, version: str) -> LoadedModel:
    """A registered version, downloaded into the store's cache and loaded."""
    return load_model_dir(download_model_dir(f"models:/{name}/{version}"))


def contract_frame(schema: Any) -> pd.DataFrame:
    """An empty frame with a schema's id and feature columns and dtypes: what Schema.problems reads."""
    columns = {c: pd.Series(dtype="object") for c in schema.id_columns}
    for c, t in zip(schema.features, schema.dtypes, strict=True):
        try:
            columns[c] = pd.Series(dtype=t)
        except TypeError:
            columns[c] = pd.Series(dtype="object")
    return pd.DataFrame(columns)


def check_champion_contract(frame: pd.DataFrame, name: str, what: str, source: str = "") -> None:
    """Refuse (exit 2) a table or model whose columns are not those of NAME's @champion: it cannot
    be compared with that champion, nor registered under its name, unless the user names it apart."""
    version = current_champion(name)
    if version is None:
        return
    champion = version_model(name, version).schema
    problems = champion.problems(frame)
    if problems:
        raise contract_error(what, name, version, champion, problems, source, "or registered under its name")


def contract_error(what: str, name: str, version: str, champion: Any, problems: list[str], source: str,
                   also: str) -> PipelineError:
    base = source.split(":", 1)[1] if source.startswith("sklearn:") else "" if ":" in source else Path(source).stem
    stem = re.sub(r"[^\w-]+", "-", base).strip("-")
    suggestion = f"{stem}-vae" if stem else f"{name}-2"
    return PipelineError(
        f"{what} has another table contract than @{CHAMPION} version {version} of {name} ({'; '.join(problems)}, "
        f"against that champion's {len(champion.features)} columns {', '.join(map(repr, champion.features[:4]))}"
        f"{', ...' if len(champion.features) > 4 else ''}): it cannot be compared with that champion {also}. "
        f"Give this table's models a name of their own: set register.model_name in params.yaml "
        f"(or --set register.model_name={suggestion})")

