"""The privilege matrix and the roles: what each tenant role can use that is not its own.

For every tenant role (each type's static role, and each organization's templated one) and
every schema, table, view, sequence and function that belongs to another tenant or another
tenant type (``model.SchemaOwner``), the privileges the role really holds: granted to it,
to a role it inherits from, or to PUBLIC, behind USAGE on the schema. Then what will be
granted tomorrow (``ALTER DEFAULT PRIVILEGES``), the roles' own powers, CREATE on schemas
others use and TEMP.
"""

from __future__ import annotations

from collections import defaultdict

from .catalog import PUBLIC, Relation
from .findings import Finding, Severity
from .model import WRITE_PRIVILEGES, Model, TenantRole

__all__ = ["access_checks"]

_OBJTYPES = {"r": "tables", "S": "sequences", "f": "functions"}
_GRANT_ON = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS"}
_KIND = {"r": "table", "p": "table", "v": "view", "m": "materialized view",
         "f": "foreign table", "S": "sequence"}


def _through(model: Model, role: TenantRole, grants: dict[int, set[str]]) -> list[str]:
    """Returns: the grantees of ``grants`` through which ``role`` holds them (for REVOKE)."""
    mine = model.privs_of(role.oid)
    return sorted(model.snapshot.role_name(g) for g in grants if g in mine)


class _Access:
    def __init__(self, model: Model, sound: set[int]) -> None:
        self.model = model
        self.snapshot = model.snapshot
        self.sound = sound
        self.findings: list[Finding] = []

    def add(self, check: str, severity: Severity, obj: str, message: str, fix: str,
            subject: str = "", kind: str = "") -> None:
        self.findings.append(Finding(check, severity, obj, message, fix, subject, kind))

    def relations(self) -> None:
        for rel in self.snapshot.relations.values():
            owner = self.model.owner(rel.schema)
            if owner.kind == "shared":
                continue
            grants = rel.all_grants
            gate = self.model.usage(rel.schema)
            kind = _KIND.get(rel.kind, "relation")
            for oid, privileges in self.model.holding(grants).items():
                role = self.model.by_oid[oid]
                if owner.kind == "tenant" and role.slug == owner.slug:
                    continue
                if owner.kind == "type" and role.tenant_type == owner.tenant_type:
                    continue
                self._relation(rel, kind, role, privileges, grants, oid in gate,
                               owner.kind == "tenant", owner.describe())
            if owner.kind == "tenant" and PUBLIC in rel.grants and rel.kind != "S" \
                    and rel.owner not in (PUBLIC,):
                self.add("public_grant_in_tenant_schema", Severity.WARNING, rel.qualified,
                         f"PUBLIC holds {', '.join(sorted(rel.grants[PUBLIC]))} on "
                         f"{owner.describe()} {kind} {rel.qualified}",
                         f"REVOKE ALL ON {rel.qualified} FROM PUBLIC;", kind=kind)

    def _relation(self, rel: Relation, kind: str, role: TenantRole, privileges: set[str],
                  grants: dict[int, set[str]], usable: bool, of_tenant: bool,
                  whose: str) -> None:
        via = _through(self.model, role, grants)
        shown = ", ".join(sorted(privileges))
        fix = f"REVOKE ALL ON {rel.qualified} FROM {', '.join(via)};"
        if of_tenant:
            if not usable:
                if PUBLIC in grants and via == ["PUBLIC"]:
                    return  # reported once per object as public_grant_in_tenant_schema
                self.add("cross_tenant_access", Severity.WARNING, rel.qualified,
                         f"{role.label} holds {shown} on {whose} {kind} {rel.qualified} "
                         "(not usable today: it lacks USAGE on the schema)", fix,
                         role.name, kind)
                return
            self.add("cross_tenant_access", Severity.ERROR, rel.qualified,
                     f"{role.label} can use {whose} {kind} {rel.qualified}: {shown}", fix,
                     role.name, kind)
            return
        if not usable or rel.kind == "S":
            return  # another type's sequence: nextval leaks no rows
        writes = privileges & WRITE_PRIVILEGES
        if writes:
            self.add("cross_type_access", Severity.ERROR, rel.qualified,
                     f"{role.label} can write {whose} {kind} {rel.qualified}: "
                     f"{', '.join(sorted(writes))}",
                     f"REVOKE {', '.join(sorted(writes))} ON {rel.qualified} FROM "
                     f"{', '.join(via)};", role.name, kind)
        elif rel.oid in self.sound:
            self.add("cross_type_access", Severity.INFO, rel.qualified,
                     f"{role.label} can read {whose} {kind} {rel.qualified}; its policies "
                     "confine the rows to the tenant", f"-- if not needed:\n{fix}",
                     role.name, kind)
        elif rel.kind in ("r", "p", "f", "m") or (rel.kind == "v" and not rel.security_invoker):
            self.add("cross_type_access", Severity.ERROR, rel.qualified,
                     f"{role.label} can read {whose} {kind} {rel.qualified}, and no tenant "
                     "policy confines what it sees", fix, role.name, kind)

    def functions(self) -> None:
        for fn in self.snapshot.functions:
            owner = self.model.owner(fn.schema)
            if owner.kind != "tenant":
                continue
            for oid in self.model.reach(fn.grants, fn.schema, frozenset({"EXECUTE"})):
                role = self.model.by_oid[oid]
                if role.slug == owner.slug:
                    continue
                via = _through(self.model, role, fn.grants)
                self.add("cross_tenant_access", Severity.ERROR, fn.signature,
                         f"{role.label} can execute {owner.describe()} function {fn.signature}",
                         f"REVOKE EXECUTE ON FUNCTION {fn.signature} FROM {', '.join(via)};",
                         role.name, "function")

    def schemas(self) -> None:
        allowed_create: dict[str, str | None] = {}
        for schema in self.snapshot.schemas.values():
            owner = self.model.owner(schema.name)
            allowed_create[schema.name] = owner.slug if owner.kind == "tenant" else None
            for oid, privileges in self.model.holding(schema.grants).items():
                role = self.model.by_oid[oid]
                via = ", ".join(_through(self.model, role, schema.grants))
                if "CREATE" in privileges and not (owner.kind == "tenant"
                                                   and role.slug == owner.slug):
                    self.add("tenant_create_on_shared_schema", Severity.ERROR, schema.name,
                             f"{role.label} can create objects in {owner.describe()} schema "
                             f"{schema.name}",
                             f"REVOKE CREATE ON SCHEMA {schema.name} FROM {via};", role.name,
                             "schema")
                if owner.kind == "tenant" and role.slug != owner.slug and "USAGE" in privileges:
                    self.add("cross_tenant_schema_usage", Severity.WARNING, schema.name,
                             f"{role.label} has USAGE on {owner.describe()} schema "
                             f"{schema.name}",
                             f"REVOKE USAGE ON SCHEMA {schema.name} FROM {via};", role.name,
                             "schema")

    def memberships(self) -> None:
        for role in self.model.tenant_roles:
            for other_oid in self.model.member_of(role.oid):
                other = self.model.by_oid.get(other_oid)
                if other is None or other.oid == role.oid:
                    continue
                if other.slug == role.slug and other.tenant_type == role.tenant_type:
                    continue
                self.add("cross_tenant_access", Severity.ERROR, other.name,
                         f"{role.label} is a member of {other.label}: it holds that role's "
                         "privileges or can SET ROLE to it",
                         f"REVOKE {other.name} FROM {role.name};", role.name, "role")

    def default_privileges(self) -> None:
        grouped: dict[tuple[int, str | None, str, int], set[str]] = defaultdict(set)
        for d in self.snapshot.default_grants:
            if d.objtype in _OBJTYPES:
                grouped[(d.creator, d.schema, d.objtype, d.grantee)].add(d.privilege)
        for (creator, schema, objtype, grantee), privileges in grouped.items():
            if grantee == creator:
                continue
            receivers = [self.model.by_oid[o] for o in self.model.holders.get(grantee, ())]
            if grantee != PUBLIC:
                receivers = [r for r in receivers if r.oid == grantee
                             or grantee in self.model.privs_of(r.oid)]
            if not receivers and grantee != PUBLIC:
                continue
            who = self.snapshot.role_name(grantee)
            maker = self.snapshot.role_name(creator)
            where = f"in schema {schema}" if schema else "in every schema"
            obj = f"default privileges of {maker} {where} on {_OBJTYPES[objtype]}"
            shown = ", ".join(sorted(privileges))
            fix = (f"ALTER DEFAULT PRIVILEGES FOR ROLE {maker}"
                   + (f" IN SCHEMA {schema}" if schema else "")
                   + f" REVOKE {shown} ON {_GRANT_ON[objtype]} FROM {who};")
            severity, why = self._default_verdict(schema, objtype, grantee, privileges,
                                                  receivers)
            if severity is not None:
                self.add("default_privileges_leak", severity, obj,
                         f"every {_OBJTYPES[objtype][:-1]} {maker} creates {where} will be "
                         f"granted {shown} to {who}: {why}", fix, who, "default privileges")

    def _default_verdict(self, schema: str | None, objtype: str, grantee: int,
                         privileges: set[str], receivers: list[TenantRole],
                         ) -> tuple[Severity | None, str]:
        if schema is None:
            if grantee == PUBLIC:
                if objtype == "f":
                    return None, ""  # Postgres' own default for functions
                return Severity.ERROR, "every role, in every tenant's schema"
            return Severity.ERROR, ("a tenant role, for objects in every schema, other "
                                    "tenants' included")
        owner = self.model.owner(schema)
        if owner.kind == "tenant":
            if grantee == PUBLIC:
                if objtype == "f":
                    return None, ""
                return Severity.WARNING, "PUBLIC, in a tenant's own schema"
            wrong = [r for r in receivers if r.slug != owner.slug]
            if wrong:
                return Severity.ERROR, (f"{', '.join(r.label for r in wrong)}, in "
                                        f"{owner.describe()} schema")
            return None, ""
        if owner.kind == "type":
            wrong = [r for r in receivers if r.tenant_type != owner.tenant_type]
            if grantee == PUBLIC and objtype != "f":
                return Severity.ERROR, f"PUBLIC, in {owner.describe()} schema"
            if wrong:
                writes = privileges & WRITE_PRIVILEGES
                return (Severity.ERROR if writes else Severity.WARNING,
                        f"{', '.join(r.label for r in wrong)}, of another tenant type than "
                        f"{owner.describe()} schema")
            return None, ""
        if receivers and objtype != "f":
            return Severity.WARNING, ("a tenant role, for every future table of a schema "
                                      "several tenant types share, whichever type it is for")
        return None, ""

    def roles(self) -> None:
        for role in self.model.tenant_roles:
            found = self.snapshot.roles[role.oid]
            powers = [word for flag, word in (
                (found.superuser, "SUPERUSER"), (found.bypassrls, "BYPASSRLS"),
                (found.login, "LOGIN"), (found.createrole, "CREATEROLE"),
                (found.createdb, "CREATEDB")) if flag]
            if powers:
                self.add("tenant_role_privileged", Severity.ERROR, role.name,
                         f"tenant role {role.label} has {', '.join(powers)}",
                         f"ALTER ROLE {role.name} "
                         + " ".join(f"NO{p}" for p in powers) + ";", kind="role")
        proxy = self.snapshot.role_oid(self.model.proxy_role) if self.model.proxy_role else None
        if proxy is not None:
            for oid in sorted(self.model.member_of(proxy) - {proxy}):
                other = self.snapshot.roles.get(oid)
                if other is None or not (other.superuser or other.bypassrls):
                    continue
                self.add("login_role_reaches_bypass", Severity.ERROR, other.name,
                         f"the proxy's login role {self.model.proxy_role} is a member of "
                         f"{other.name}, which has "
                         + ("SUPERUSER" if other.superuser else "BYPASSRLS"),
                         f"REVOKE {other.name} FROM {self.model.proxy_role};", kind="role")
        for name, type_name, slug in self.model.missing_roles:
            who = f"tenant {slug}" if slug else f"tenant type {type_name}"
            self.add("tenant_role_missing", Severity.WARNING, name,
                     f"role {name} of {who} does not exist",
                     "pgtenant init --config ... (static roles) or pgtenant tenant create "
                     "(a tenant's own role)", kind="role")

    def temp(self) -> None:
        # What init and provisioning grant (temp_tables), or what the operator accepts.
        config = self.model.config
        allowed = set(config.audit.allow_temp) | {
            name for name, t in config.tenant_types.items() if t.temp_tables}
        by_type: dict[str, list[TenantRole]] = defaultdict(list)
        for oid in self.model.holding(self.snapshot.database_grants,
                                      frozenset({"TEMPORARY"})):
            role = self.model.by_oid[oid]
            if role.tenant_type not in allowed:
                by_type[role.tenant_type].append(role)
        for type_name, roles in sorted(by_type.items()):
            via = sorted({g for r in roles
                          for g in _through(self.model, r, self.snapshot.database_grants)})
            names = ", ".join(sorted(r.name for r in roles)[:5]) + (
                f" and {len(roles) - 5} more" if len(roles) > 5 else "")
            self.add("tenant_temp", Severity.ERROR, f"database {self.snapshot.database}",
                     f"tenant type {type_name}'s roles ({names}) may create temporary tables",
                     f"REVOKE TEMPORARY ON DATABASE {self.snapshot.database} FROM "
                     f"{', '.join(via)};\n-- or allow it: temp_tables = true in "
                     f"[tenant_types.{type_name}]", type_name, "database")


def access_checks(model: Model, sound: set[int]) -> list[Finding]:
    """Returns: the privilege-matrix and role findings. ``sound``: oids of tenant tables
    whose policies confine every tenant role that reaches them (from the table checks)."""
    access = _Access(model, sound)
    access.relations()
    access.functions()
    access.schemas()
    access.memberships()
    access.default_privileges()
    access.roles()
    access.temp()
    return access.findings
