"""Control plane: a throwaway Postgres cluster, `pgtenant init`, tenants, tokens and the demo.

Everything here talks to Postgres as an administrator; nothing here is on the proxy's data path.
"""

from __future__ import annotations

__all__ = ["ControlError"]


class ControlError(Exception):
    """An operator mistake (unknown tenant, duplicate slug, unknown tenant type...)."""
