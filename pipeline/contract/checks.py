"""One finding of the validate stage: a named check on a column or the table, pass or fail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]
MAX_ROWS_SHOWN = 5  # offending row positions a check names


@dataclass(frozen=True)
class Check:
    name: str
    column: str | None
    success: bool
    severity: Severity
    message: str
    rows: tuple[int, ...] = ()  # up to MAX_ROWS_SHOWN offending row positions
    brief: str = ""  # the measured effect in a few words, for one-line errors (drift)

    def line(self) -> str:
        tag = "PASS" if self.success else ("FAIL" if self.severity == "error" else "WARN")
        col = f" column {self.column!r}" if self.column is not None else ""
        more = f" (rows {', '.join(map(str, self.rows))})" if self.rows else ""
        return f"{tag} {self.name}{col}: {self.message}{more}"
