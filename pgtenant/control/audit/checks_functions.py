"""Checks of SECURITY DEFINER functions a tenant can call.

Such a function runs with its owner's rights (usually an admin's, which row-level security
does not restrict). Two ways it leaks: names in its body resolve through a ``search_path``
the caller controls, or through a schema a tenant can create objects in (the caller's own
code then runs as the owner); or it writes tenant tables from its arguments without ever
reading the tenant context (the seed story's router takes ``p_org_id``: any caller names
any organization).
"""

from __future__ import annotations

import re

from ..safe_settings import is_safe_set_config
from .catalog import Function, Relation
from .checks_tables import reads_tenant
from .findings import Finding, Severity
from .model import Model

__all__ = ["function_checks"]

_WRITE = re.compile(r"\b(?:insert\s+into|update|delete\s+from|merge\s+into)\s+(?:only\s+)?"
                    r"((?:\"[^\"]+\"|[a-z_][a-z0-9_$]*)(?:\s*\.\s*(?:\"[^\"]+\"|[a-z_][a-z0-9_$]*))?)",
                    re.IGNORECASE)


def _unquote(name: str) -> str:
    return name.strip().strip('"') if name.strip().startswith('"') else name.strip().lower()


def _written(fn: Function) -> set[tuple[str | None, str]]:
    """Returns: (schema or None, table) of every table the body writes, by its text."""
    out: set[tuple[str | None, str]] = set()
    for match in _WRITE.finditer(fn.source):
        parts = [_unquote(p) for p in re.split(r"\s*\.\s*", match.group(1))]
        out.add((parts[0], parts[1]) if len(parts) == 2 else (None, parts[0]))
    return out


def _bypasses(model: Model, owner: int, table: Relation) -> bool:
    role = model.snapshot.roles.get(owner)
    if role is None or role.superuser or role.bypassrls or not table.rls:
        return True
    return table.owner == owner and not table.force_rls


def function_checks(model: Model, tenant_tables: dict[tuple[str, str], Relation]) -> list[Finding]:
    """Returns: the findings of every SECURITY DEFINER function some tenant role may call.

    ``tenant_tables``: (schema, name) -> tenant tables more than one tenant reaches.
    """
    findings: list[Finding] = []
    creatable: dict[str, list[str]] = {}
    for nsp in model.snapshot.schemas.values():
        holders = model.holding(nsp.grants, frozenset({"CREATE"}))
        if holders:
            creatable[nsp.name] = sorted(model.by_oid[o].name for o in holders)
    temp_users = sorted(model.by_oid[o].name for o in model.holding(
        model.snapshot.database_grants, frozenset({"TEMPORARY"})))
    by_name: dict[str, list[Relation]] = {}
    for (_, name), rel in tenant_tables.items():
        by_name.setdefault(name, []).append(rel)
    for fn in model.snapshot.functions:
        if not fn.security_definer:
            continue
        callers = model.reach(fn.grants, fn.schema, frozenset({"EXECUTE"}))
        if not callers:
            continue
        who = ", ".join(sorted(model.by_oid[o].label for o in callers))
        sig = fn.signature
        path = fn.search_path
        if path is None and is_safe_set_config(fn.schema, fn.name, fn.source):
            pass  # a SET clause would undo its SET LOCALs; every name in it is qualified
        elif path is None:
            findings.append(Finding(
                "definer_search_path_mutable", Severity.ERROR, sig,
                f"SECURITY DEFINER {sig} sets no search_path and {who} can call it",
                f"ALTER FUNCTION {sig} SET search_path = pg_catalog, pg_temp;\n-- and "
                "schema-qualify every name in its body", kind="function"))
        else:
            entries = [e.strip().strip('"') for e in path.split(",")]
            open_ = [e for e in entries if e in creatable]
            if temp_users and entries[-1:] != ["pg_temp"]:
                # Not listed, pg_temp is searched *first* for tables (listed, where it
                # stands): a tenant's temporary table shadows the one the body names.
                open_.append("pg_temp")
                creatable.setdefault("pg_temp", temp_users)
            if open_:
                findings.append(Finding(
                    "definer_search_path_mutable", Severity.ERROR, sig,
                    f"SECURITY DEFINER {sig} resolves names through schema "
                    f"{', '.join(open_)}, where tenant roles "
                    f"{', '.join(sorted({r for e in open_ for r in creatable[e]}))} can create "
                    f"objects; {who} can call it",
                    f"ALTER FUNCTION {sig} SET search_path = pg_catalog, pg_temp;\n-- or "
                    f"revoke CREATE (TEMPORARY for pg_temp) from "
                    f"{', '.join(sorted({r for e in open_ for r in creatable[e]}))}",
                    kind="function"))
        if reads_tenant(fn.source):
            continue
        path_schemas = [e.strip().strip('"') for e in (path or "public").split(",")]
        hit: list[str] = []
        for schema, name in _written(fn):
            for rel in by_name.get(name, []):
                if (schema == rel.schema or (schema is None and rel.schema in path_schemas)) \
                        and _bypasses(model, fn.owner, rel):
                    hit.append(rel.qualified)
        if hit:
            findings.append(Finding(
                "definer_writes_unchecked", Severity.ERROR, sig,
                f"SECURITY DEFINER {sig} writes {', '.join(sorted(set(hit)))} as "
                f"{model.snapshot.role_name(fn.owner)} (exempt from row-level security there) "
                f"and never reads the tenant context; {who} can call it",
                "-- take the tenant from the context, never from an argument:\n"
                "--   v_org uuid := (SELECT pgtenant.current_tenant());\n"
                "--   IF v_org IS NULL THEN RAISE EXCEPTION 'no tenant context'; END IF;\n"
                f"-- or run it as the caller: ALTER FUNCTION {sig} SECURITY INVOKER;",
                kind="function"))
    return findings
