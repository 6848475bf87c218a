"""pgtenant: a tenant-aware, transaction-mode PostgreSQL connection proxy."""

__all__ = ["__version__"]

__version__ = "0.1.0"
