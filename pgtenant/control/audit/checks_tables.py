"""Checks of tenant data at rest: tables, their row-level security and policies, the views
and materialized views over them.

A *tenant table* has a tenant column (``[audit] tenant_columns``). Its row-level security
matters when more than one tenant can reach it (a static role shared by a type's tenants, or
roles of several tenants, each with USAGE on the schema): then every hole below lets one
tenant read or write another's rows. A tenant table that only its own tenant reaches (in
that tenant's schema) needs none of it.

Policies are judged per tenant role and command, as Postgres applies them: the permissive
policies that apply to the role are OR-ed, the restrictive ones AND-ed, so the rows are
confined to the tenant when every permissive one is, or any restrictive one is.
"""

from __future__ import annotations

from collections.abc import Iterable

from .catalog import Policy, Relation
from .findings import Finding, Severity
from .model import WRITE_PRIVILEGES, Model, TenantRole
from .policy_expr import ExprFacts, analyse

__all__ = ["TableChecks", "reads_tenant", "tenant_functions", "tenant_value_sql"]

# Policy command letters (pg_policy.polcmd) by the privilege that runs them.
_COMMAND_OF = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}
_FILTERS = ("SELECT", "UPDATE", "DELETE")   # their USING expression picks the rows
_CHECKS = ("INSERT", "UPDATE")              # their WITH CHECK expression vets new rows
_TENANT_MARKERS = ("current_tenant", "app.tenant_id")


def tenant_value_sql(signing: bool) -> str:
    """Returns: the expression a fix should compare the tenant column with."""
    if signing:
        return "(SELECT pgtenant.current_tenant())"
    return "(SELECT nullif(current_setting('app.tenant_id', true), '')::uuid)"


def reads_tenant(source: str) -> bool:
    """Returns: whether a function body reads the tenant context (by its text)."""
    body = source.lower()
    return any(marker in body for marker in _TENANT_MARKERS)


def tenant_functions(model: Model) -> frozenset[str]:
    """Returns: lower-case names (bare and qualified) of functions whose body reads the
    tenant context, so a policy calling one of them counts as a tenant check."""
    names: set[str] = set()
    for fn in model.snapshot.functions:
        if reads_tenant(fn.source):
            names.add(fn.name.lower())
            names.add(f"{fn.schema}.{fn.name}".lower())
    return frozenset(names)


class TableChecks:
    """Runs the table, policy and view checks over one model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.snapshot = model.snapshot
        self.columns = model.config.audit.tenant_columns
        self.functions = tenant_functions(model)
        self.value = tenant_value_sql(model.snapshot.signing_installed)
        self._facts: dict[tuple[str | None, tuple[str, ...]], ExprFacts] = {}
        self.findings: list[Finding] = []
        # Tenant tables whose policies confine every tenant role that reaches them, for
        # every command it may run: reads of them across tenant types are then harmless.
        self.sound: set[int] = set()

    def run(self) -> list[Finding]:
        for rel in self.snapshot.relations.values():
            if rel.kind in ("r", "p", "f"):
                self._table(rel)
        for rel in self.snapshot.relations.values():
            if rel.kind in ("v", "m"):
                self._view(rel)
        return self.findings

    def reach(self, rel: Relation, wanted: frozenset[str] | None = None) -> dict[int, set[str]]:
        """Returns: tenant role oid -> its privileges on ``rel`` (column grants included),
        for roles with USAGE on the schema."""
        return self.model.reach(rel.all_grants, rel.schema, wanted)

    def _add(self, check: str, severity: Severity, obj: str, message: str, fix: str,
             subject: str = "", kind: str = "table") -> None:
        self.findings.append(Finding(check, severity, obj, message, fix, subject, kind))

    def _roles(self, oids: Iterable[int]) -> list[TenantRole]:
        return sorted((self.model.by_oid[o] for o in oids), key=lambda r: r.name)

    def _is_tenant_table(self, rel: Relation) -> bool:
        return bool(rel.tenant_columns) and self.model.owner(rel.schema).kind != "tenant"

    # ----------------------------------------------------------------------------- tables

    def _table(self, rel: Relation) -> None:
        if self.model.owner(rel.schema).kind == "tenant":
            return  # one tenant's own: who else reaches it is the privilege matrix's finding
        reach = self.reach(rel)
        roles = self._roles(reach)
        if Model.tenants_of(roles) < 2:
            return  # one tenant's own table (or nobody's): nothing to confine
        name = rel.qualified
        who = ", ".join(r.label for r in roles)
        writers = {r.tenant_type for r in roles if reach[r.oid] & {"INSERT", "UPDATE", "DELETE"}}
        if not rel.tenant_columns:
            if writers and rel.kind != "f" and not (rel.rls and self.snapshot.policies.get(
                    rel.oid)):
                self._add("shared_writable_table", Severity.ERROR, name,
                          f"{name} has no tenant column ({', '.join(self.columns)}) and no "
                          f"policy, and {who} can write it: its rows are common to all of them",
                          f"-- give it a tenant column and policies, or make it read-only:\n"
                          f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {name} FROM "
                          + ", ".join(r.name for r in roles
                                      if reach[r.oid] & WRITE_PRIVILEGES) + ";")
            return
        column = rel.tenant_columns[0]
        if len(writers) >= 2:
            home = self._home_types(rel.schema) & writers
            keep = sorted(home)[0] if len(home) == 1 else sorted(writers)[0]
            revoke = [r.name for r in roles if r.tenant_type in writers
                      and r.tenant_type != keep]
            self._add("cross_type_write", Severity.ERROR, name,
                      f"tenant types {', '.join(sorted(writers))} can all write {name}",
                      f"-- keep the writes of the type it belongs to ({keep}"
                      + (f": {rel.schema} is first on its search_path" if len(home) == 1
                         else "?") + "):\n"
                      + "\n".join(f"REVOKE INSERT, UPDATE, DELETE ON {name} FROM {r};"
                                  for r in sorted(set(revoke))))
        for role in roles:
            risky = reach[role.oid] & {"TRUNCATE", "TRIGGER", "REFERENCES"}
            if risky:
                severity = Severity.ERROR if risky - {"REFERENCES"} else Severity.WARNING
                self._add("rls_bypass_privilege", severity, name,
                          f"{role.label} holds {', '.join(sorted(risky))} on {name}",
                          f"REVOKE {', '.join(sorted(risky))} ON {name} FROM {role.name};",
                          subject=role.name)
        enable = (f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY;\n"
                  f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY;\n"
                  f"CREATE POLICY tenant_isolation ON {name}\n"
                  f"    USING ({column} = {self.value})\n"
                  f"    WITH CHECK ({column} = {self.value});")
        if rel.kind == "f":
            self._add("rls_disabled", Severity.ERROR, name,
                      f"foreign table {name} holds tenant data and {who} can use it; foreign "
                      "tables cannot have row-level security",
                      f"REVOKE ALL ON {name} FROM {', '.join(r.name for r in roles)};")
            return
        if not rel.rls:
            self._add("rls_disabled", Severity.ERROR, name,
                      f"{name} has row-level security disabled and {who} can use it: every "
                      "tenant sees every tenant's rows", enable)
            self._index(rel, column)
            return
        policies = self.snapshot.policies.get(rel.oid, [])
        if not policies:
            self._add("rls_no_policy", Severity.WARNING, name,
                      f"{name} has row-level security enabled but no policy: {who} see no "
                      "rows and can write none", enable.split("\n", 2)[2])
            self._index(rel, column)
            return
        self._owner(rel, roles)
        sound = not self._owner_bypasses(rel, roles)
        for role in roles:
            sound &= self._confined(rel, role, reach[role.oid], policies, column)
        applied = {p.name for p in policies
                   if any(self._applies(p, r) for r in roles)}
        for policy in policies:
            if policy.name in applied:
                self._policy_style(rel, policy)
        if sound:
            self.sound.add(rel.oid)
        self._index(rel, column)

    def _home_types(self, schema: str) -> set[str]:
        """Returns: the tenant types whose search_path starts with ``schema`` (where their
        unqualified CREATE TABLE lands)."""
        return {name for name, t in self.model.config.tenant_types.items()
                if t.search_path and t.search_path[0] == schema}

    def _index(self, rel: Relation, column: str) -> None:
        leads = {c.lower() for c in rel.index_leads}
        if not leads & {c.lower() for c in rel.tenant_columns}:
            self._add("tenant_index_missing", Severity.WARNING, rel.qualified,
                      f"no index of {rel.qualified} starts with {column}",
                      f"CREATE INDEX CONCURRENTLY ON {rel.qualified} ({column});")

    def _owner_bypasses(self, rel: Relation, roles: list[TenantRole]) -> bool:
        if rel.force_rls:
            return False
        owner = rel.owner
        proxy = self.snapshot.role_oid(self.model.proxy_role) if self.model.proxy_role else None
        suspects = {r.oid for r in roles} | ({proxy} if proxy is not None else set())
        members = set().union(*(self.model.member_of(o) for o in suspects)) if suspects else set()
        return owner in suspects or owner in members

    def _owner(self, rel: Relation, roles: list[TenantRole]) -> None:
        if self._owner_bypasses(rel, roles):
            owner = self.snapshot.role_name(rel.owner)
            self._add("rls_not_forced", Severity.ERROR, rel.qualified,
                      f"{rel.qualified} is owned by {owner}, a role tenant sessions run as or "
                      "can become, and row-level security is not forced: its policies do "
                      "not apply to that role",
                      f"ALTER TABLE {rel.qualified} FORCE ROW LEVEL SECURITY;\n"
                      f"-- better still, let an admin role own it:\n"
                      f"ALTER TABLE {rel.qualified} OWNER TO CURRENT_USER;")

    def _applies(self, policy: Policy, role: TenantRole) -> bool:
        return bool(policy.roles & self.model.privs_of(role.oid))

    def facts(self, expr: str | None, columns: list[str]) -> ExprFacts:
        key = (expr, tuple(columns))
        if key not in self._facts:
            self._facts[key] = analyse(expr, columns, self.functions)
        return self._facts[key]

    def _confined(self, rel: Relation, role: TenantRole, privileges: set[str],
                  policies: list[Policy], column: str) -> bool:
        """Report the commands of ``role`` on ``rel`` whose rows are not confined to the
        tenant (one finding for the reads, one for the writes, naming the policies).
        Returns: whether all of them are."""
        mine = [p for p in policies if self._applies(p, role)]
        ok = True
        for write, commands in ((False, _FILTERS), (True, _CHECKS)):
            loose: dict[str, Policy] = {}
            hit: list[str] = []
            for command in commands:
                if command not in privileges:
                    continue
                bad = self._unconfined(mine, command, rel.tenant_columns, write=write)
                if bad:
                    hit.append(command)
                    loose.update((p.name, p) for p in bad)
            if not hit:
                continue
            ok = False
            shown = "; ".join(self._describe(p, write, rel.tenant_columns)
                              for p in loose.values())
            clause = "WITH CHECK" if write else "USING"
            fix = "\n".join(
                f"ALTER POLICY {p.name} ON {rel.qualified} {clause} ({column} = {self.value});"
                for p in loose.values())
            if write:
                self._add("policy_write_unchecked", Severity.ERROR, rel.qualified,
                          f"{', '.join(hit)} into {rel.qualified} by {role.label} may write rows "
                          f"of any tenant: {shown}", fix, subject=role.name)
            else:
                self._add("policy_not_tenant_scoped", Severity.ERROR, rel.qualified,
                          f"{', '.join(hit)} on {rel.qualified} by {role.label} are not confined "
                          f"to the tenant's rows: {shown}",
                          fix + f"\n-- or drop the permissive policies that do not check {column}",
                          subject=role.name)
        return ok

    @staticmethod
    def _write_expr(p: Policy) -> str | None:
        # Postgres uses USING as the check of an ALL/UPDATE policy without WITH CHECK; an
        # INSERT policy without one accepts every row.
        return p.check if p.check is not None or p.command == "a" else p.using

    def _describe(self, p: Policy, write: bool, columns: list[str]) -> str:
        text = self._write_expr(p) if write else p.using
        what = "WITH CHECK" if write and (p.check is not None or p.command == "a") else "USING"
        shown = f"{what} ({text})" if text is not None else "no WITH CHECK"
        return (f"permissive policy {p.name} ({shown}) does not compare "
                f"{'/'.join(columns)} with the tenant")

    def _unconfined(self, policies: list[Policy], command: str, columns: list[str], *,
                    write: bool) -> list[Policy]:
        """Returns: the permissive policies that let ``command``'s rows escape the tenant;
        empty when the rows are confined (or when no permissive policy applies: nothing is
        allowed then)."""
        letter = _COMMAND_OF[command]
        relevant = [p for p in policies if p.command in ("*", letter)]
        permissive = [p for p in relevant if p.permissive]
        restrictive = [p for p in relevant if not p.permissive]

        def expr(p: Policy) -> str | None:
            return self._write_expr(p) if write else p.using

        if not permissive or any(self.facts(expr(p), columns).constrains for p in restrictive):
            return []
        return [p for p in permissive if not self.facts(expr(p), columns).constrains]

    def _policy_style(self, rel: Relation, policy: Policy) -> None:
        facts = [self.facts(e, rel.tenant_columns) for e in (policy.using, policy.check)
                 if e is not None]
        obj = f"policy {policy.name} on {rel.qualified}"
        if self.snapshot.signing_installed and any(f.raw_setting for f in facts):
            self._add("policy_unsigned_setting", Severity.WARNING, obj,
                      f"{obj} reads current_setting('app.tenant_id') while context signing "
                      "is installed", f"-- compare with {self.value} instead:\n"
                      f"ALTER POLICY {policy.name} ON {rel.qualified} USING (... = "
                      f"{self.value});", kind="policy")
        if any(f.per_row_call for f in facts):
            self._add("policy_per_row_call", Severity.WARNING, obj,
                      f"{obj} reads the tenant (current_tenant() or current_setting) outside "
                      "a sub-select, once per row",
                      f"-- wrap the call: {self.value}, not pgtenant.current_tenant()\n"
                      f"ALTER POLICY {policy.name} ON {rel.qualified} USING (... = "
                      f"{self.value});", kind="policy")

    # ------------------------------------------------------------------------------ views

    def _base_tables(self, rel: Relation) -> list[Relation]:
        """Returns: the tables (r/p) ``rel`` reads, through views, with their owners."""
        out: dict[int, Relation] = {}
        seen = {rel.oid}
        stack = list(rel.depends_on)
        while stack:
            oid = stack.pop()
            if oid in seen:
                continue
            seen.add(oid)
            found = self.snapshot.relations.get(oid)
            if found is None:
                continue
            if found.kind in ("v", "m"):
                stack.extend(found.depends_on)
            elif found.kind in ("r", "p", "f"):
                out[oid] = found
        return list(out.values())

    def _view(self, rel: Relation) -> None:
        reach = self.reach(rel, frozenset({"SELECT"}))
        if not reach:
            return
        tables = [t for t in self._base_tables(rel) if self._is_tenant_table(t)]
        if not tables:
            return
        roles = self._roles(reach)
        who = ", ".join(r.label for r in roles)
        names = ", ".join(sorted(t.qualified for t in tables))
        if rel.kind == "m":
            self._add("matview_exposes_tenant_data", Severity.ERROR, rel.qualified,
                      f"materialized view {rel.qualified} holds rows of {names} for every "
                      f"tenant and {who} can read it",
                      f"REVOKE SELECT ON {rel.qualified} FROM "
                      f"{', '.join(r.name for r in roles)};\n-- or make it a view WITH "
                      "(security_invoker = on)", kind="materialized view")
            return
        if rel.security_invoker:
            return
        owner = self.snapshot.roles.get(rel.owner)
        exempt = [t.qualified for t in tables
                  if owner is None or owner.superuser or owner.bypassrls or not t.rls
                  or (t.owner == rel.owner and not t.force_rls)]
        if exempt:
            self._add("view_bypasses_rls", Severity.ERROR, rel.qualified,
                      f"view {rel.qualified} runs as its owner "
                      f"{self.snapshot.role_name(rel.owner)}, which row-level security does not "
                      f"restrict on {', '.join(sorted(exempt))}; {who} can read it",
                      f"ALTER VIEW {rel.qualified} SET (security_invoker = on);", kind="view")
