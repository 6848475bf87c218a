"""Migrations across every tenant schema: files, the ledger, the rollout runner, progress.

``files`` (NNNN_name.sql, directives, checksums, lint), ``ledger`` (control-schema tables),
``runner`` (plan/apply/rollback/status), ``progress`` (rich bar or JSON lines), ``commands``
(the ``pgtenant migrate`` CLI).
"""
