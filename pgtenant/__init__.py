"""pgtenant: a tenant-aware, transaction-mode PostgreSQL connection proxy."""

from .compiled import build_kind, install

__all__ = ["__version__", "build_kind"]

__version__ = "0.1.0"

# Before any protocol module is imported: PGTENANT_PURE (or stale compiled modules) must
# send every one of them to its .py source (pgtenant/compiled.py).
install()
