"""Outputs that appear whole or not at all: a temporary sibling renamed over the path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError, output_error
from vae import VAEError
from vae.atomic import atomic_file


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write; renamed over path if the block succeeds, removed otherwise
    (vae.atomic.atomic_file: a writer killed outright leaves a temporary the next writer of path
    on this host removes). An OS error of the file system (full disk, read-only, permissions)
    becomes a PipelineError naming path."""
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except (PipelineError, VAEError):
        raise
    except OSError as exc:
        raise output_error(path, exc) from None

