"""Errors the CLI turns into one line on stderr and an exit code (DESIGN.md, "Command line")."""

from __future__ import annotations


class PipelineError(Exception):
    """A user or input mistake: missing file, bad table, unknown key, schema mismatch."""

    exit_code = 2


class ValidationFailed(PipelineError):
    """The table failed validation."""

    exit_code = 1


class GateRefused(PipelineError):
    """The promotion gate kept the champion."""

    exit_code = 1
