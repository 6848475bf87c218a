"""What ``pgtenant audit`` reports: the checks it knows, and one finding of one of them.

Owns the vocabulary shared by the checks, the baseline and the report formats: a check's
stable name (what a baseline entry and a SARIF rule refer to), its title and why it matters
for tenant isolation, and the ``Finding`` a check yields for one object (and, for per-role
checks, one role).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

__all__ = ["CHECKS", "Check", "Finding", "Severity", "sort_findings"]


class Severity(IntEnum):
    """Ordered: an ``error`` fails the audit (exit status 1) unless its baseline accepts it."""

    INFO = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        """Returns: the severity named ``text`` (error, warning or info).
        Raises: ValueError for another word."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r}: expected error, warning or info") \
                from None


@dataclass(frozen=True, slots=True)
class Check:
    """One kind of hole. ``why`` is written for a person deciding whether to fix it."""

    name: str
    title: str
    why: str


def _checks(*items: Check) -> dict[str, Check]:
    return {c.name: c for c in items}


CHECKS: Final[dict[str, Check]] = _checks(
    Check("rls_disabled", "Tenant table without row-level security",
          "A tenant role can read or write it, and nothing in the database limits that to "
          "the tenant's own rows: one query without a WHERE clause returns every tenant's."),
    Check("rls_not_forced", "Row-level security not forced on a table its tenants own",
          "The table's owner is exempt from its policies unless FORCE ROW LEVEL SECURITY is "
          "set; the owner here is a role tenant sessions run as (or can become), so they "
          "bypass the policies."),
    Check("rls_no_policy", "Row-level security enabled with no policy",
          "With no policy every row is hidden from tenant roles: the table is unusable "
          "through pgtenant, and the usual 'fix' (a USING (true) policy) is a leak."),
    Check("policy_not_tenant_scoped", "Policies that do not constrain by the tenant",
          "Permissive policies are OR-ed together: if any one that applies to a tenant role "
          "does not compare the tenant column with the tenant context, every tenant sees "
          "every row for that command."),
    Check("policy_write_unchecked", "Writes not checked against the tenant",
          "Without a tenant-scoped WITH CHECK (or with an INSERT policy that has none) a "
          "tenant can write rows carrying another tenant's id, planting data in its tables."),
    Check("policy_unsigned_setting", "Policy reads the raw app.tenant_id setting",
          "Context signing is on: pgtenant.current_tenant() returns the tenant only when the "
          "proxy's signature verifies, while current_setting('app.tenant_id') trusts any "
          "session that managed to set it."),
    Check("policy_per_row_call", "Tenant function called once per row in a policy",
          "Not wrapped in (SELECT ...), the tenant function is evaluated for every row "
          "instead of once per query (Supabase's auth_rls_initplan): tenant-scoped scans of "
          "big tables get many times slower."),
    Check("tenant_index_missing", "No index led by the tenant column",
          "Every tenant query filters on the tenant column; without an index that starts "
          "with it each one scans the whole table, every tenant's rows included."),
    Check("shared_writable_table", "Table written by several tenants with no tenant column",
          "Tenants that share the role or the schema share its rows: what one writes, the "
          "others read and overwrite."),
    Check("cross_type_write", "Table written by more than one tenant type",
          "Tenant types exist to keep different data models apart; a table that two types "
          "can write mixes them (the seed story's 'agencies were writing to SME tables')."),
    Check("rls_bypass_privilege", "A privilege that row-level security does not limit",
          "Policies filter rows, not these: TRUNCATE empties every tenant's rows at once, "
          "TRIGGER lets a tenant attach its own code to every tenant's writes, and REFERENCES "
          "lets it probe other tenants' keys through a foreign key."),
    Check("view_bypasses_rls", "View over tenant data that bypasses row-level security",
          "A view runs with its owner's rights unless security_invoker is on; an owner that "
          "is exempt from the tables' policies returns every tenant's rows."),
    Check("matview_exposes_tenant_data", "Materialized view of tenant data",
          "A materialized view is filled by its owner and has no row-level security: every "
          "tenant role allowed to read it reads every tenant's rows."),
    Check("definer_search_path_mutable", "SECURITY DEFINER function with a mutable "
          "search_path",
          "A tenant can call it, and names in its body are resolved through a search_path "
          "the caller controls (or a schema a tenant can create objects in): a tenant can "
          "make it run the tenant's own code with the owner's rights."),
    Check("definer_writes_unchecked", "SECURITY DEFINER function writes tenant tables "
          "without checking the tenant",
          "It runs with its owner's rights, which bypass row-level security, and nothing in "
          "its body reads the tenant context: a caller writes wherever its arguments say."),
    Check("cross_tenant_access", "A tenant role can use another tenant's object",
          "The privilege matrix: this tenant role (directly, through a role it is a member "
          "of, or through PUBLIC) holds a privilege on an object that belongs to another "
          "tenant."),
    Check("cross_type_access", "A tenant role can use another tenant type's object",
          "The object lives in a schema of another tenant type; writes across types mix "
          "data models, reads are safe only as far as row-level security scopes them."),
    Check("cross_tenant_schema_usage", "A tenant role has USAGE on another tenant's schema",
          "USAGE is the gate in front of every object of the schema: one GRANT on a table, "
          "or a function executable by PUBLIC, and the tenant reaches it."),
    Check("public_grant_in_tenant_schema", "PUBLIC privilege on a tenant's object",
          "Every role, every other tenant's included, holds this privilege; only the schema's "
          "USAGE still stands between them and the object."),
    Check("default_privileges_leak", "Default privileges grant future objects to the wrong "
          "role",
          "ALTER DEFAULT PRIVILEGES applies to objects not created yet: each new table or "
          "function made in that schema will be granted to a role of another tenant (or "
          "tenant type, or PUBLIC) without anyone writing a GRANT."),
    Check("login_role_reaches_bypass", "The proxy's login role can become a role that "
          "bypasses row-level security",
          "Statements run as the login role whenever no tenant context is in force; a role it "
          "is a member of with SUPERUSER or BYPASSRLS is one SET ROLE away from every row."),
    Check("tenant_role_privileged", "A tenant role with cluster-wide powers",
          "SUPERUSER and BYPASSRLS skip every policy; LOGIN, CREATEROLE and CREATEDB let a "
          "tenant act outside pgtenant's context altogether."),
    Check("tenant_create_on_shared_schema", "A tenant role can create objects in a schema "
          "others use",
          "An object a tenant creates in a schema on another tenant's search_path (a "
          "function or table shadowing a name) runs or is read by that other tenant."),
    Check("tenant_temp", "A tenant role may create temporary tables",
          "The config does not allow this tenant type temporary tables (temp_tables = "
          "false, and not in [audit] allow_temp); a temporary table or type shadows "
          "the names a function resolves through a search_path without pg_temp last."),
    Check("lockdown", "The lockdown of pgtenant init is not in place",
          "pgtenant refuses to serve a database without it: the login role must be worth "
          "nothing, tenants must have no dynamic-SQL paths and only the control role may read "
          "the signing key and the registry."),
    Check("probe_read", "Probe: a tenant read another tenant's rows or objects",
          "Through a running pgtenant, signed in as a real tenant, a plain SELECT returned "
          "rows of another tenant (or opened another tenant's object): the hole is live."),
    Check("probe_write", "Probe: a tenant wrote another tenant's rows or objects",
          "Through a running pgtenant, signed in as a real tenant, an INSERT/UPDATE/DELETE "
          "touched another tenant's rows or objects (rolled back by the probe): the hole is "
          "live."),
    Check("probe_cross_type_write", "Probe: a tenant wrote a table of another tenant type",
          "Through a running pgtenant, a tenant inserted a row (with its own id, rolled back) "
          "into a table of another tenant type's schema: the seed story's bug, live."),
    Check("probe_failed", "Probe could not run",
          "The live check through pgtenant did not run for this tenant type, so only the "
          "catalog audit vouches for it."),
    Check("tenant_role_missing", "A tenant's role does not exist",
          "Every login of this tenant fails at its first transaction (SET LOCAL ROLE)."),
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One hole in one object.

    ``object`` is the qualified name (``schema.table``, ``schema.func(argtypes)``,
    ``policy on schema.table``, a role name, ``database app``); ``subject`` is the role or
    tenant type the finding is about ("" when it is about the object alone). ``fix`` is
    SQL that fixes it when one statement set does, else what to do.
    """

    check: str
    severity: Severity
    object: str
    message: str
    fix: str
    subject: str = ""
    kind: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown audit check {self.check!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        """What a baseline entry matches: check, object and subject."""
        return self.check, self.object, self.subject

    @property
    def why(self) -> str:
        return CHECKS[self.check].why

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity.label, "object": self.object,
                "subject": self.subject, "kind": self.kind, "message": self.message,
                "why": self.why, "fix": self.fix}


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Returns: ``findings`` without duplicates (one per key, the worst of them), worst
    first, then by check and object."""
    unique: dict[tuple[str, str, str], Finding] = {}
    for f in findings:
        if f.key not in unique or f.severity > unique[f.key].severity:
            unique[f.key] = f
    return sorted(unique.values(), key=lambda f: (-f.severity, f.check, f.object, f.subject))
