"""Placeholder for the audit runner (written in parallel on another branch).

Only the ``AuditReport`` dataclass and the ``run_audit`` signature live here, so that the
report formats and the CLI type-check; the real module replaces this one at merge.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ...config import Config
from .findings import Finding

__all__ = ["AuditReport", "run_audit"]


@dataclass(frozen=True, slots=True)
class AuditReport:
    """One audit of one database: its findings, sorted worst first, and what was read."""

    database: str
    findings: list[Finding]
    stats: dict[str, int]
    seconds: float


async def run_audit(admin_dsn: str, config: Config, *,
                    schemas: Collection[str] | None = None) -> AuditReport:
    """Placeholder: the real runner reads the catalogs and runs every check."""
    raise NotImplementedError
