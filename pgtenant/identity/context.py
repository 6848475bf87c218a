"""Identity -> TenantContext: what a tenant's transactions run as.

Owns the two value types (who the caller is, and what the database must enforce for it)
and the rendering of a tenant type's templates. It does not own lookups (``registry.py``)
or the wire encoding of the context (``protocol/inject.py``). No I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from pglast import keywords

from ..errors import ContextError

if TYPE_CHECKING:  # config reads files; the protocol core must not import it
    from ..config import TenantTypeConfig

__all__ = [
    "TenantContext",
    "TenantIdentity",
    "build_context",
    "context_signature",
    "default_schema_name",
    "quote_ident",
    "quote_ident_if_needed",
    "quote_literal",
    "render_template",
    "shared_context",
]

# Rendered role and schema names must be plain lower-case identifiers: they are spliced into
# SQL text (quoted, but we also want them ASCII so error positions shift by bytes == chars).
_SAFE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # always used with fullmatch
_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
# quote_identifier() (ruleutils.c) quotes every keyword that is not UNRESERVED.
_NEEDS_QUOTES = frozenset(keywords.RESERVED_KEYWORDS | keywords.COL_NAME_KEYWORDS
                          | keywords.TYPE_FUNC_NAME_KEYWORDS)


@dataclass(frozen=True, slots=True)
class TenantIdentity:
    """Who the caller is, as resolved from its token. Never from the client's user name."""

    org_id: UUID
    slug: str
    tenant_type: str
    token_id: UUID
    entity_id: UUID | None = None
    schema: str | None = None
    database: str | None = None  # [databases.<name>] of its own (database per tenant)


@dataclass(frozen=True, slots=True)
class TenantContext:
    """What every transaction of this tenant must run under."""

    identity: TenantIdentity
    role: str
    search_path: tuple[str, ...]

    @property
    def gucs(self) -> tuple[tuple[str, str], ...]:
        """Returns: the ``app.*`` settings, in injection order (entity only when present)."""
        ident = self.identity
        items = [("app.tenant_id", str(ident.org_id)), ("app.tenant_type", ident.tenant_type)]
        items.append(("app.entity_id", str(ident.entity_id) if ident.entity_id else ""))
        return tuple(items)

    @property
    def search_path_value(self) -> str:
        """Returns: the search_path exactly as Postgres prints it after ``SET``.

        ``SET`` normalises identifiers with quote_identifier(); ``set_config`` stores the
        string verbatim. Using Postgres's own spelling makes both injection paths leave the
        same ``current_setting('search_path')``.
        """
        return ", ".join(quote_ident_if_needed(s) for s in self.search_path)


def context_signature(key: bytes, org_id: str, tenant_type: str, entity_id: str) -> str:
    """Returns: ``app.tenant_sig``, the hex HMAC-SHA256 of ``org|type|entity`` under ``key``.

    ``pgtenant.current_tenant()`` (control/hardening.py) recomputes exactly this in SQL.
    """
    message = f"{org_id}|{tenant_type}|{entity_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def quote_ident(name: str) -> str:
    """Returns: ``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_ident_if_needed(name: str) -> str:
    """Returns: ``name`` quoted only when Postgres's quote_identifier() would quote it."""
    if _PLAIN_IDENT.fullmatch(name) and name not in _NEEDS_QUOTES:
        return name
    return quote_ident(name)


def quote_literal(value: str) -> str:
    """Returns: ``value`` as a standard-conforming SQL string literal.

    Raises: ContextError for NUL bytes, which no Postgres text can hold.
    """
    if "\x00" in value:
        raise ContextError("tenant context value contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


def default_schema_name(slug: str) -> str:
    """Returns: the schema a schema-per-tenant organization gets unless one is given."""
    return "t_" + re.sub(r"[^a-z0-9_]", "_", slug.lower())


def render_template(template: str, identity: TenantIdentity, *, what: str) -> str:
    """Render one role/schema template for ``identity``.

    Returns: a safe lower-case identifier.
    Raises: ContextError when the template needs ``{schema}`` and the organization has none,
    or the result is not a safe identifier (fail closed: the transaction must not run).
    """
    if "{schema}" in template and not identity.schema:
        raise ContextError(
            f"tenant {identity.slug!r} has no schema, but its tenant type's {what} "
            f"template {template!r} needs one"
        )
    try:
        # {org_id} renders as 32 hex digits: a UUID's hyphens cannot be in a safe name.
        value = template.format(
            slug=identity.slug, org_id=identity.org_id.hex, schema=identity.schema or ""
        )
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ContextError(f"tenant {identity.slug!r}: bad {what} template {template!r}: "
                           f"{exc}") from exc
    if not _SAFE_NAME.fullmatch(value):
        raise ContextError(
            f"tenant {identity.slug!r}: {what} {value!r} rendered from {template!r} is not a "
            "lower-case identifier"
        )
    return value


def build_context(identity: TenantIdentity, tenant_type: TenantTypeConfig) -> TenantContext:
    """Returns: the ``TenantContext`` for ``identity`` under its tenant type's templates.

    Raises: ContextError (see ``render_template``).
    """
    role = render_template(tenant_type.role, identity, what="role")
    path = tuple(render_template(t, identity, what="search_path") for t in tenant_type.search_path)
    return TenantContext(identity=identity, role=role, search_path=path)


# Contexts by (identity, tenant type), all fields compared (token id included): the clients
# of one token share one immutable context, its role and search_path, instead of about
# 300 bytes each (issue 16). Bounded: the oldest entry goes first.
_CONTEXTS_MAX = 4096
_contexts: dict[tuple[TenantIdentity, TenantTypeConfig], TenantContext] = {}


def shared_context(identity: TenantIdentity, tenant_type: TenantTypeConfig) -> TenantContext:
    """Returns: ``build_context(identity, tenant_type)``, the same object for equal inputs.

    Raises: ContextError (see ``render_template``; failures are not kept).
    """
    key = (identity, tenant_type)
    found = _contexts.get(key)
    if found is None:
        found = build_context(identity, tenant_type)
        if len(_contexts) >= _CONTEXTS_MAX:
            del _contexts[next(iter(_contexts))]
        _contexts[key] = found
    return found
