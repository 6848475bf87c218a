"""One read of everything the audit looks at: roles, schemas, relations, policies, functions,
privileges (every ACL exploded, owners' implicit rights included), default privileges.

A fixed number of bulk catalog queries in one read-only REPEATABLE READ transaction, however
many tenants the database holds: no per-object round trips, so a database of 1,000 tenant
schemas is read in about the time of a few scans of ``pg_class``. The checks then run in
Python over this snapshot. Objects that belong to an extension are left out (the extension's
maintainers own them, and ``DROP EXTENSION`` is their fix).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

import asyncpg

__all__ = ["Function", "Policy", "Relation", "Role", "Schema", "Snapshot", "read_snapshot"]

PUBLIC = 0  # the grantee oid aclexplode gives PUBLIC

# Schemas nobody audits: the system's own.
_SYSTEM = "n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'"


@dataclass(slots=True)
class Role:
    oid: int
    name: str
    superuser: bool
    bypassrls: bool
    login: bool
    createrole: bool
    createdb: bool
    inherit: bool
    member_of: set[int] = field(default_factory=set)   # direct memberships (roleid)


@dataclass(slots=True)
class Schema:
    oid: int
    name: str
    owner: int
    grants: dict[int, set[str]] = field(default_factory=dict)  # grantee -> privileges


@dataclass(slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str                  # r table, p partitioned, v view, m matview, f foreign, S sequence
    owner: int
    rls: bool
    force_rls: bool
    options: tuple[str, ...]
    grants: dict[int, set[str]] = field(default_factory=dict)
    column_grants: dict[int, set[str]] = field(default_factory=dict)
    tenant_columns: list[str] = field(default_factory=list)
    index_leads: set[str] = field(default_factory=set)   # first column of each index
    depends_on: set[int] = field(default_factory=set)    # views: relations the rule reads

    @property
    def qualified(self) -> str:
        return f"{_ident(self.schema)}.{_ident(self.name)}"

    @property
    def all_grants(self) -> dict[int, set[str]]:
        """Returns: grantee -> privileges on the table or on some of its columns (a column
        grant reaches the rows as much as a table grant does)."""
        grants: dict[int, set[str]] = {g: set(p) for g, p in self.grants.items()}
        for grantee, privileges in self.column_grants.items():
            grants.setdefault(grantee, set()).update(privileges)
        return grants

    @property
    def security_invoker(self) -> bool:
        return any(o.lower() in ("security_invoker=true", "security_invoker=on",
                                 "security_invoker=1", "security_invoker=yes")
                   for o in self.options)


@dataclass(slots=True)
class Policy:
    relid: int
    name: str
    command: str               # '*' all, r select, a insert, w update, d delete
    permissive: bool
    roles: frozenset[int]      # {0}: PUBLIC
    using: str | None
    check: str | None


@dataclass(slots=True)
class Function:
    oid: int
    schema: str
    name: str
    args: str
    security_definer: bool
    config: tuple[str, ...]
    owner: int
    kind: str                  # f function, p procedure, a aggregate, w window
    language: str
    source: str
    grants: dict[int, set[str]] = field(default_factory=dict)

    @property
    def signature(self) -> str:
        return f"{_ident(self.schema)}.{_ident(self.name)}({self.args})"

    @property
    def search_path(self) -> str | None:
        for item in self.config:
            key, _, value = item.partition("=")
            if key.lower() == "search_path":
                return value
        return None


@dataclass(frozen=True, slots=True)
class DefaultGrant:
    creator: int               # the role whose future objects are granted
    schema: str | None         # None: every schema
    objtype: str               # r tables, S sequences, f functions, T types, n schemas
    grantee: int
    privilege: str


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    slug: str
    tenant_type: str
    schema: str | None
    database: str | None
    status: str


@dataclass(slots=True)
class Snapshot:
    database: str
    roles: dict[int, Role]
    schemas: dict[str, Schema]
    relations: dict[int, Relation]
    policies: dict[int, list[Policy]]
    functions: list[Function]
    default_grants: list[DefaultGrant]
    database_grants: dict[int, set[str]]
    organizations: list[Organization]
    signing_installed: bool
    _by_name: dict[str, int] = field(default_factory=dict)

    def role_oid(self, name: str) -> int | None:
        if not self._by_name:
            self._by_name.update((r.name, r.oid) for r in self.roles.values())
        return self._by_name.get(name)

    def role_name(self, oid: int) -> str:
        return "PUBLIC" if oid == PUBLIC else self.roles[oid].name if oid in self.roles \
            else str(oid)


def _ident(name: str) -> str:
    """Quoted like quote_ident: only when needed, so the names read as people write them."""
    import re

    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _char(value: bytes | str) -> str:
    """Returns: a "char" column's value as text (asyncpg gives bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _grants(rows: list[asyncpg.Record]) -> dict[int, dict[int, set[str]]]:
    out: dict[int, dict[int, set[str]]] = defaultdict(dict)
    for row in rows:
        out[row["oid"]].setdefault(row["grantee"], set()).add(row["privilege_type"])
    return out


async def read_snapshot(conn: asyncpg.Connection, tenant_columns: Collection[str],
                        schemas: Collection[str] | None = None) -> Snapshot:
    """Read the snapshot over ``conn`` (an admin: it must see every catalog row).

    ``tenant_columns``: the column names that mark tenant data. ``schemas``: when given,
    only relations and functions of these schemas are read (a migration wave's); roles,
    schemas' own ACLs and default privileges are always read whole.
    """
    cols = [c.lower() for c in tenant_columns]
    only = list(schemas) if schemas is not None else None
    in_scope = "($1::text[] IS NULL OR n.nspname = ANY($1::text[]))"
    not_extension = ("NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = {cat}::regclass"
                     " AND e.objid = {oid} AND e.deptype = 'e')")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        database = await conn.fetchval("SELECT current_database()")
        roles = {
            r["oid"]: Role(r["oid"], r["rolname"], r["rolsuper"], r["rolbypassrls"],
                           r["rolcanlogin"], r["rolcreaterole"], r["rolcreatedb"],
                           r["rolinherit"])
            for r in await conn.fetch(
                "SELECT oid, rolname, rolsuper, rolbypassrls, rolcanlogin, rolcreaterole, "
                "rolcreatedb, rolinherit FROM pg_roles")
        }
        for r in await conn.fetch("SELECT roleid, member FROM pg_auth_members"):
            if r["member"] in roles:
                roles[r["member"]].member_of.add(r["roleid"])

        schema_rows = await conn.fetch(
            f"SELECT n.oid, n.nspname, n.nspowner FROM pg_namespace n WHERE {_SYSTEM}")
        schema_grants = _grants(await conn.fetch(
            "SELECT n.oid, a.grantee, a.privilege_type FROM pg_namespace n, "
            f"aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a WHERE {_SYSTEM}"))
        schema_map = {r["nspname"]: Schema(r["oid"], r["nspname"], r["nspowner"],
                                           schema_grants.get(r["oid"], {}))
                      for r in schema_rows}

        rel_filter = (f"c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {_SYSTEM} AND {in_scope}"
                      f" AND {not_extension.format(cat=repr('pg_class'), oid='c.oid')}")
        relations = {
            r["oid"]: Relation(r["oid"], r["nspname"], r["relname"], _char(r["relkind"]),
                               r["relowner"], r["relrowsecurity"], r["relforcerowsecurity"],
                               tuple(r["reloptions"] or ()))
            for r in await conn.fetch(
                "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relowner, c.relrowsecurity, "
                "c.relforcerowsecurity, c.reloptions FROM pg_class c "
                f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {rel_filter}", only)
        }
        for oid, grants in _grants(await conn.fetch(
                "SELECT c.oid, a.grantee, a.privilege_type FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(coalesce(c.relacl, "
                "acldefault((CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::\"char\", "
                "c.relowner))) a "
                f"WHERE {rel_filter}", only)).items():
            if oid in relations:
                relations[oid].grants = grants
        for oid, grants in _grants(await conn.fetch(
                "SELECT c.oid, x.grantee, x.privilege_type FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_attribute t ON t.attrelid = c.oid AND t.attnum > 0 "
                "AND NOT t.attisdropped AND t.attacl IS NOT NULL, aclexplode(t.attacl) x "
                f"WHERE {rel_filter}", only)).items():
            if oid in relations:
                relations[oid].column_grants = grants
        for r in await conn.fetch(
                "SELECT t.attrelid, t.attname FROM pg_attribute t JOIN pg_class c "
                "ON c.oid = t.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE t.attnum > 0 AND NOT t.attisdropped AND lower(t.attname) = ANY($2) "
                f"AND {rel_filter} ORDER BY t.attnum", only, cols):
            if r["attrelid"] in relations:
                relations[r["attrelid"]].tenant_columns.append(r["attname"])
        for r in await conn.fetch(
                "SELECT i.indrelid, t.attname FROM pg_index i JOIN pg_class c "
                "ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_attribute t ON t.attrelid = i.indrelid AND t.attnum = i.indkey[0] "
                f"WHERE {rel_filter}", only):
            if r["indrelid"] in relations:
                relations[r["indrelid"]].index_leads.add(r["attname"])
        for r in await conn.fetch(
                "SELECT DISTINCT w.ev_class AS view, d.refobjid AS rel FROM pg_rewrite w "
                "JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid "
                "AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> w.ev_class "
                "JOIN pg_class c ON c.oid = w.ev_class "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE c.relkind IN ('v', 'm') AND {_SYSTEM} AND {in_scope}", only):
            if r["view"] in relations:
                relations[r["view"]].depends_on.add(r["rel"])

        policies: dict[int, list[Policy]] = defaultdict(list)
        for r in await conn.fetch(
                "SELECT p.polrelid, p.polname, p.polcmd, p.polpermissive, p.polroles, "
                "pg_get_expr(p.polqual, p.polrelid) AS using_expr, "
                "pg_get_expr(p.polwithcheck, p.polrelid) AS check_expr FROM pg_policy p "
                "JOIN pg_class c ON c.oid = p.polrelid "
                f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_SYSTEM} AND {in_scope}",
                only):
            policies[r["polrelid"]].append(Policy(
                r["polrelid"], r["polname"], _char(r["polcmd"]), r["polpermissive"],
                frozenset(r["polroles"]), r["using_expr"], r["check_expr"]))

        fn_filter = (f"{_SYSTEM} AND {in_scope} AND "
                     f"{not_extension.format(cat=repr('pg_proc'), oid='p.oid')}")
        functions = {
            r["oid"]: Function(r["oid"], r["nspname"], r["proname"], r["args"], r["prosecdef"],
                               tuple(r["proconfig"] or ()), r["proowner"], _char(r["prokind"]),
                               r["lanname"], r["prosrc"] or "")
            for r in await conn.fetch(
                "SELECT p.oid, n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) "
                "AS args, p.prosecdef, p.proconfig, p.proowner, p.prokind, l.lanname, p.prosrc "
                "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                f"JOIN pg_language l ON l.oid = p.prolang WHERE {fn_filter}", only)
        }
        for oid, grants in _grants(await conn.fetch(
                "SELECT p.oid, a.grantee, a.privilege_type FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace, "
                f"aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
                f"WHERE {fn_filter}", only)).items():
            if oid in functions:
                functions[oid].grants = grants

        default_grants = [
            DefaultGrant(r["defaclrole"], r["nspname"], _char(r["defaclobjtype"]), r["grantee"],
                         r["privilege_type"])
            for r in await conn.fetch(
                "SELECT d.defaclrole, n.nspname, d.defaclobjtype, a.grantee, a.privilege_type "
                "FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace, "
                "aclexplode(d.defaclacl) a")
        ]
        database_grants = _grants(await conn.fetch(
            "SELECT 0 AS oid, a.grantee, a.privilege_type FROM pg_database d, "
            "aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a "
            "WHERE d.datname = current_database()")).get(0, {})

        organizations: list[Organization] = []
        signing = False
        if await conn.fetchval("SELECT to_regclass('pgtenant.organizations') IS NOT NULL"):
            has = {r[0] for r in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = "
                "'pgtenant.organizations'::regclass AND attnum > 0 AND NOT attisdropped")}
            db_col = "database" if "database" in has else "NULL::text"
            status_col = "status" if "status" in has else "'ready'::text"
            organizations = [
                Organization(str(r["id"]), r["slug"], r["tenant_type"], r["schema"],
                             r["database"], r["status"])
                for r in await conn.fetch(
                    f"SELECT id, slug, tenant_type, schema, {db_col} AS database, "
                    f"{status_col} AS status FROM pgtenant.organizations ORDER BY slug")
            ]
        if await conn.fetchval("SELECT to_regclass('pgtenant.signing_keys') IS NOT NULL"):
            signing = bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgtenant.signing_keys)"))
    return Snapshot(database, roles, schema_map, relations, dict(policies),
                    list(functions.values()), default_grants, database_grants, organizations,
                    signing)
