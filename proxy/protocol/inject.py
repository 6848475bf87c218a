"""The bytes that open each transaction with a tenant's context (ARCHITECTURE.md §3).

Built once per authenticated client, so the per-transaction cost is a concatenation. The
simple-query form is one ``SELECT set_config(..., true), ...;`` statement spliced in front of
the client's own Query text; the extended form is a Bind/Execute of a proxy-owned statement
whose values travel as parameters (never visible in ``pg_stat_activity.query``). No I/O.

Why one ``set_config`` statement and not five ``SET LOCAL`` statements (ARCHITECTURE.md's
first sketch): every statement of a multi-statement Query costs Postgres a parse, a
transaction-command cycle and a CommandComplete. Measured on the 2-core box with
``pgbench -S -c 16`` direct to Postgres 15: five ``SET LOCAL`` prefixes 8.0k tps, the single
``set_config`` statement 30.0k tps, no prefix 56k tps. ``set_config(name, value, true)`` is
exactly ``SET LOCAL``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ..identity.context import TenantContext, context_signature, quote_literal
from . import codec

__all__ = [
    "CLOSE_UNNAMED_PORTAL",
    "CLOSE_UNNAMED_STATEMENT",
    "CTX_CLOSE",
    "CTX_NAMES",
    "CTX_PARSE",
    "CTX_STATEMENT",
    "EXECUTE_UNNAMED",
    "EXT_DROP",
    "Q_DROP",
    "Injection",
]

# The proxy-owned prepared statement. The leading "__pgtenant" keeps it out of the way of
# client statement names; issue #4's renaming uses a different prefix.
CTX_STATEMENT: Final = "__pgtenant_ctx"
# set_config(..., true) is SET LOCAL: it lasts until the end of the (implicit or explicit)
# transaction, i.e. at least until the client's Sync. 'role' last, so the app.* settings are
# made by the login role, and the role switch is what the client's statements run under.
# Names in injection order, shared by both forms. app.tenant_sig is '' when signing is off.
CTX_NAMES: Final = ("app.tenant_id", "app.tenant_type", "app.entity_id", "app.tenant_sig",
                    "search_path", "role")
# The client's own settings (startup parameters, plain SETs it made: see Link) travel as two
# parallel text arrays, applied after the app.* values and before search_path and role.
CTX_SQL: Final = (
    "SELECT " + ", ".join(
        f"pg_catalog.set_config('{name}', ${i}, true)" for i, name in enumerate(CTX_NAMES[:4], 1)
    ) + ", (SELECT pg_catalog.count(pg_catalog.set_config(s.n, s.v, true)) "
    "FROM ROWS FROM (pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::text[])) AS s(n, v)), "
    "pg_catalog.set_config('search_path', $7, true), pg_catalog.set_config('role', $8, true)"
)
_CTX_PARAMS: Final = 8
_TEXT_OID: Final = 25
CTX_PARSE: Final = codec.parse(CTX_STATEMENT, CTX_SQL, (_TEXT_OID,) * _CTX_PARAMS)
# Close of a statement that does not exist is not an error, so Close+Parse re-establishes
# the statement when we cannot be sure it survived (DEALLOCATE ALL, DISCARD ALL, errors).
CTX_CLOSE: Final = codec.frame(ord("C"), b"S" + CTX_STATEMENT.encode() + b"\x00")
EXECUTE_UNNAMED: Final = codec.execute("", 0)
# Close the unnamed portal the injection used, so a client's Describe/Execute of portal ""
# without its own Bind gets Postgres's 34000 instead of the proxy's portal (see #3).
CLOSE_UNNAMED_PORTAL: Final = codec.frame(ord("C"), b"P\x00")
# The unnamed statement outlives Sync on a server; a previous client's must not be Bound by
# the next one. Sent once per attachment, before the first extended injection.
CLOSE_UNNAMED_STATEMENT: Final = codec.frame(ord("C"), b"S\x00")

# Replies the server sends for the injected part, which the client must never see:
Q_DROP: Final = 3  # RowDescription, DataRow, CommandComplete "SELECT 1"
# BindComplete, DataRow, CommandComplete, CloseComplete (+1 ParseComplete, +1 CloseComplete)
EXT_DROP: Final = 4


class Injection:
    """Precomputed injection bytes for one tenant context.

    Attributes:
        q_prefix: SQL text spliced in front of a simple Query's text (ASCII).
        q_shift: characters the prefix adds, to shift ErrorResponse positions back.
        ext_bind: the Bind of ``CTX_STATEMENT`` to the unnamed portal with this context.
        signature: ``app.tenant_sig`` ('' when the database has no signing key).
    """

    __slots__ = ("_signing_key", "context", "ext_bind", "q_prefix", "q_session", "q_shift",
                 "settings", "signature")

    def __init__(self, context: TenantContext, signing_key: bytes | None = None,
                 settings: tuple[tuple[str, str], ...] = ()):
        self.context = context
        self.settings = settings  # the client's own (name, value) settings, applied each time
        self._signing_key = signing_key
        tenant_id, tenant_type, entity_id = (v for _, v in context.gucs)
        self.signature = (
            context_signature(signing_key, tenant_id, tenant_type, entity_id)
            if signing_key else ""
        )
        pairs = [*zip(CTX_NAMES[:4], (tenant_id, tenant_type, entity_id, self.signature),
                      strict=True),
                 *settings,
                 ("search_path", context.search_path_value), ("role", context.role)]
        prefix = _select_set_config(pairs, is_local=True)
        self.q_prefix: bytes = prefix.encode()
        # The same context for the whole session, for a statement allowed to run outside a
        # transaction block; that server is retired afterwards.
        self.q_session: bytes = _select_set_config(pairs, is_local=False).encode()
        self.q_shift: int = len(prefix)  # characters: error positions count characters
        values = [tenant_id, tenant_type, entity_id, self.signature,
                  _text_array(n for n, _ in settings), _text_array(v for _, v in settings),
                  context.search_path_value, context.role]
        self.ext_bind: bytes = codec.bind("", CTX_STATEMENT, [v.encode() for v in values])

    def with_settings(self, settings: tuple[tuple[str, str], ...]) -> Injection:
        """Returns: the same context with the client's settings replaced by ``settings``."""
        return Injection(self.context, self._signing_key, settings)


def _select_set_config(pairs: list[tuple[str, str]], *, is_local: bool) -> str:
    flag = "true" if is_local else "false"
    return "SELECT " + ", ".join(
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, {flag})"
        for name, value in pairs
    ) + ";"


def _text_array(items: Iterable[str]) -> str:
    """Returns: a text[] literal ('{"a","b"}') with every element quoted."""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"
