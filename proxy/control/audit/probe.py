"""Placeholder for the live probe (written in parallel on another branch).

Only the ``run_probe`` signature lives here, so that the CLI type-checks; the real module
replaces this one at merge.
"""

from __future__ import annotations

from ...config import Config
from .findings import Finding

__all__ = ["run_probe"]


async def run_probe(admin_dsn: str, config: Config, *, host: str, port: int) -> list[Finding]:
    """Placeholder: the real probe signs in through a running pgtenant as real tenants."""
    raise NotImplementedError
