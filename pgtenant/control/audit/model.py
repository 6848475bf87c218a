"""Who is a tenant, and what belongs to whom: the tenancy model the audit judges against.

What a generic linter cannot know and pgtenant can, from its config and registry:

* the tenant roles: each tenant type's static role (shared by all its tenants) and, for a
  templated role (``role = "{schema}"``), one role per organization, rendered as the proxy
  renders it;
* who owns each schema: a schema rendered from a template for one organization belongs to
  that *tenant*; a schema named by exactly one tenant type's static ``search_path`` belongs to
  that *type*; a schema several types use (``public``) or none names is *shared*;
* what a role may use: its privileges are those granted to it, to every role it inherits
  from, and to PUBLIC (an object's owner's rights are in its ACL: the snapshot explodes
  ``acldefault`` for objects with none), always behind USAGE on the object's schema.

Reach is computed the inverted way (for each grantee, the tenant roles that hold its
privileges), so checking every object against every tenant role costs one pass over the
grants rather than objects x roles.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from ...config import Config, TenantTypeConfig
from ...errors import ContextError
from ...identity.context import TenantIdentity, render_template
from .catalog import PUBLIC, Organization, Snapshot

__all__ = ["Model", "SchemaOwner", "TenantRole", "build_model"]

WRITE_PRIVILEGES = frozenset({"INSERT", "UPDATE", "DELETE", "TRUNCATE"})
TABLE_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE",
                              "REFERENCES", "TRIGGER"})


@dataclass(frozen=True, slots=True)
class TenantRole:
    """A role tenant transactions run as. ``slug`` None: the type's one static role, shared
    by every tenant of the type."""

    name: str
    oid: int
    tenant_type: str
    slug: str | None

    @property
    def shared(self) -> bool:
        return self.slug is None

    @property
    def label(self) -> str:
        who = f"tenant {self.slug}" if self.slug else f"every {self.tenant_type} tenant"
        return f"{self.name} ({who})"


@dataclass(frozen=True, slots=True)
class SchemaOwner:
    """``kind``: "tenant" (one organization's), "type" (one tenant type's) or "shared"."""

    kind: str
    tenant_type: str | None = None
    slug: str | None = None

    def describe(self) -> str:
        if self.kind == "tenant":
            return f"tenant {self.slug}'s"
        if self.kind == "type":
            return f"tenant type {self.tenant_type}'s"
        return "shared"


class Model:
    """The snapshot read through the config: tenant roles, schema owners, reach."""

    def __init__(self, snapshot: Snapshot, config: Config, tenant_roles: list[TenantRole],
                 owners: dict[str, SchemaOwner], missing_roles: list[tuple[str, str, str]],
                 proxy_role: str | None) -> None:
        self.snapshot = snapshot
        self.config = config
        self.tenant_roles = tenant_roles
        self.owners = owners
        # (role name, tenant type, slug or "") of tenant roles that do not exist.
        self.missing_roles = missing_roles
        self.proxy_role = proxy_role
        self.by_oid: dict[int, TenantRole] = {r.oid: r for r in tenant_roles}
        self._usage: dict[str, frozenset[int]] = {}

    def owner(self, schema: str) -> SchemaOwner:
        return self.owners.get(schema, SchemaOwner("shared"))

    def privs_of(self, oid: int) -> frozenset[int]:
        """Returns: the roles whose privileges ``oid`` holds: itself, the roles it inherits
        from (transitively, through INHERIT members), and PUBLIC."""
        return self._privs_of.get(oid) or self._closure(oid, inherit_only=True)

    def member_of(self, oid: int) -> frozenset[int]:
        """Returns: every role ``oid`` is a member of, transitively (SET ROLE reach)."""
        return self._closure(oid, inherit_only=False) - {PUBLIC}

    def _closure(self, oid: int, *, inherit_only: bool) -> frozenset[int]:
        roles = self.snapshot.roles
        seen = {oid, PUBLIC}
        stack = [oid]
        while stack:
            role = roles.get(stack.pop())
            if role is None or (inherit_only and not role.inherit):
                continue  # a NOINHERIT role uses its memberships only through SET ROLE
            for parent in role.member_of:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return frozenset(seen)

    @cached_property
    def _privs_of(self) -> dict[int, frozenset[int]]:
        return {r.oid: self._closure(r.oid, inherit_only=True) for r in self.tenant_roles}

    @cached_property
    def holders(self) -> dict[int, frozenset[int]]:
        """grantee oid -> the tenant roles (oids) that hold what is granted to it. PUBLIC's
        entry holds every tenant role."""
        out: dict[int, set[int]] = {}
        for role in self.tenant_roles:
            for grantee in self.privs_of(role.oid):
                out.setdefault(grantee, set()).add(role.oid)
        return {k: frozenset(v) for k, v in out.items()}

    def holding(self, grants: Mapping[int, Iterable[str]],
                wanted: frozenset[str] | None = None, *,
                among: frozenset[int] | None = None) -> dict[int, set[str]]:
        """Returns: tenant role oid -> the privileges of ``grants`` (an exploded ACL) it holds,
        limited to ``wanted`` when given, and to the roles ``among`` when given. Schema USAGE
        is not considered here."""
        out: dict[int, set[str]] = {}
        for grantee, privileges in grants.items():
            chosen = set(privileges) if wanted is None else set(privileges) & wanted
            if not chosen:
                continue
            holders = self.holders.get(grantee, frozenset())
            # A grant to PUBLIC is held by every tenant role: intersect (it iterates the
            # smaller side) rather than visit them all for each object.
            for oid in holders if among is None else holders & among:
                out.setdefault(oid, set()).update(chosen)
        return out

    def usage(self, schema: str) -> frozenset[int]:
        """Returns: the tenant roles (oids) with USAGE on ``schema``."""
        if schema not in self._usage:
            found = self.snapshot.schemas.get(schema)
            self._usage[schema] = frozenset() if found is None else frozenset(
                self.holding(found.grants, frozenset({"USAGE"})))
        return self._usage[schema]

    def reach(self, grants: Mapping[int, Iterable[str]], schema: str,
              wanted: frozenset[str] | None = None) -> dict[int, set[str]]:
        """Returns: what each tenant role can really use of an object: its privileges on it,
        for the roles that also have USAGE on its schema."""
        return self.holding(grants, wanted, among=self.usage(schema))

    @staticmethod
    def tenants_of(roles: Iterable[TenantRole]) -> int:
        """Returns: how many tenants act through ``roles`` (a shared role counts as many)."""
        count = 0
        for role in roles:
            count += 2 if role.shared else 1
        return count


def _identity(org: Organization) -> TenantIdentity:
    return TenantIdentity(org_id=uuid.UUID(org.id), slug=org.slug, tenant_type=org.tenant_type,
                          token_id=uuid.UUID(int=0), schema=org.schema)


def _served_here(org: Organization, tenant_type: TenantTypeConfig, config: Config,
                 database: str) -> bool:
    """Whether ``org``'s transactions run in ``database`` (the one audited). An org or type
    naming a [databases.*] entry is served there; one naming none, wherever clients ask."""
    name = org.database or tenant_type.database
    if name is None or name not in config.databases:
        return True
    return config.databases[name].dsn.dbname == database


def build_model(snapshot: Snapshot, config: Config) -> Model:
    """Returns: the model of ``snapshot`` under ``config``'s tenant types."""
    by_name = {r.name: r.oid for r in snapshot.roles.values()}
    tenant_roles: list[TenantRole] = []
    missing: list[tuple[str, str, str]] = []
    owners: dict[str, SchemaOwner] = {}
    static_users: dict[str, set[str]] = {}
    for type_name, tenant_type in config.tenant_types.items():
        if tenant_type.shared_role:
            oid = by_name.get(tenant_type.role)
            if oid is None:
                missing.append((tenant_type.role, type_name, ""))
            else:
                tenant_roles.append(TenantRole(tenant_type.role, oid, type_name, None))
        for entry in tenant_type.search_path:
            if "{" not in entry:
                static_users.setdefault(entry, set()).add(type_name)
    for schema, types in static_users.items():
        if len(types) == 1:
            owners[schema] = SchemaOwner("type", tenant_type=next(iter(types)))
    for org in snapshot.organizations:
        org_type = config.tenant_types.get(org.tenant_type)
        if org_type is None or not _served_here(org, org_type, config, snapshot.database):
            continue
        identity = _identity(org)
        if not org_type.shared_role:
            try:
                name = render_template(org_type.role, identity, what="role")
            except ContextError:
                missing.append((org_type.role, org.tenant_type, org.slug))
            else:
                oid = by_name.get(name)
                if oid is None:
                    missing.append((name, org.tenant_type, org.slug))
                else:
                    tenant_roles.append(TenantRole(name, oid, org.tenant_type, org.slug))
        for entry in org_type.search_path:
            if "{" not in entry:
                continue
            try:
                schema = render_template(entry, identity, what="schema")
            except ContextError:
                continue
            owners[schema] = SchemaOwner("tenant", tenant_type=org.tenant_type, slug=org.slug)
    proxy_role = next((db.dsn.user for db in config.databases.values()
                       if db.dsn.dbname == snapshot.database), None)
    if proxy_role is None and config.databases:
        proxy_role = next(iter(config.databases.values())).dsn.user
    return Model(snapshot, config, tenant_roles, owners, missing, proxy_role)
