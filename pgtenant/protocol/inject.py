"""The bytes that open each transaction with a tenant's context (ARCHITECTURE.md §3).

Built once per tenant context and settings (``injection``: the clients of one token with the
same settings share one, immutable), so the per-transaction cost is a concatenation. The
simple-query form is ``SET LOCAL`` statements spliced in front of the client's own Query text
(or, with ``context_statements = "set_config"``, one ``SELECT set_config(..., true), ...;``);
the extended form is a Bind/Execute of a proxy-owned statement whose values travel as
parameters (never visible in ``pg_stat_activity.query``). No I/O.

Why ``SET LOCAL`` statements and not one ``SELECT set_config(..., true), ...``: a SELECT is
planned and executed, and answers with a RowDescription and a DataRow carrying the values; a
``SET`` is a utility statement answered by a fixed ``CommandComplete "SET"``. Measured on the
2-core box with ``pgbench -S -c 16`` direct to Postgres 15, three interleaved rounds: no prefix
58-65k tps, the six ``SET LOCAL`` statements 46-52k, the one ``set_config`` SELECT 39-43k.
The fixed replies also let the proxy drop them with one comparison (``q_reply``). Inside the
one Query they run in its implicit transaction block, so they last until the Query ends (and
into a ``BEGIN`` it contains), exactly like ``set_config(name, value, true)``.

Fewer statements (``omit``, issue 16): ``SET LOCAL app.entity_id = ''`` (a tenant without an
entity) and ``SET LOCAL app.tenant_sig = ''`` (no signing) are left out of the simple-query
prefix, because every server's session already holds '' for them: each pooled server logs in
with them as startup parameters (``SERVER_SESSION``), which override the login role's
defaults and are what RESET ALL returns to. No tenant can change that session value: the
guard refuses SET/RESET/set_config of app.* in what it sees, function bodies included (since
issue 16), the built-in set_config is locked and pgtenant's stand-in refuses app.* (a name
the operator unprotects is sent again: client.py); a server that served another tenant gets
DISCARD ALL, which restores the startup values; the session-wide context a statement outside
a transaction block gets (``q_session``) retires its server. So what policies read inside the
transaction (``current_setting``, ``pgtenant.current_tenant()``'s HMAC over it) is the same
text. The extended form keeps its eight parameters, values '' included: a set_config call in
one SELECT costs far less than a statement, and its Bind bytes stay what they were.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Final

from ..identity.context import TenantContext, context_signature, quote_ident, quote_literal
from . import codec
from .constants import (
    BIND_COMPLETE,
    CLOSE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    TARGET_PORTAL,
    TARGET_STATEMENT,
)

__all__ = [
    "CLOSE_UNNAMED_PORTAL",
    "CLOSE_UNNAMED_STATEMENT",
    "CTX_CLOSE",
    "CTX_NAMES",
    "CTX_PARSE",
    "CTX_STATEMENT",
    "EXECUTE_UNNAMED",
    "EXT_DROP",
    "OMITTABLE",
    "Q_DROP",
    "SERVER_SESSION",
    "SET_COMPLETE",
    "Injection",
    "injection",
]

# The proxy-owned prepared statement. The leading "__pgtenant" keeps it out of the way of
# client statement names (they may not use it: protocol/refusal.py, guard.py); the random
# tail, drawn once per process, makes it unguessable, so that even SQL the guard could not
# see (dynamic SQL in an application's function) cannot name it.
CTX_STATEMENT: Final = "__pgtenant_ctx_" + secrets.token_hex(8)
# Every name schema-qualified: a tenant's temporary type shadows unqualified type names
# (pg_temp is searched before pg_catalog for types unless the search_path lists it).
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
    "FROM ROWS FROM (pg_catalog.unnest($5::pg_catalog.text[]), "
    "pg_catalog.unnest($6::pg_catalog.text[])) AS s(n, v)), "
    "pg_catalog.set_config('search_path', $7, true), pg_catalog.set_config('role', $8, true)"
)
_CTX_PARAMS: Final = 8
_TEXT_OID: Final = 25
CTX_PARSE: Final = codec.parse(CTX_STATEMENT, CTX_SQL, (_TEXT_OID,) * _CTX_PARAMS)
# Close of a statement that does not exist is not an error, so Close+Parse re-establishes
# the statement when we cannot be sure it survived (DEALLOCATE ALL, DISCARD ALL, errors).
CTX_CLOSE: Final = codec.frame(CLOSE, bytes((TARGET_STATEMENT,)) + CTX_STATEMENT.encode() + b"\x00")
EXECUTE_UNNAMED: Final = codec.execute("", 0)
# Close the unnamed portal the injection used, so a client's Describe/Execute of portal ""
# without its own Bind gets Postgres's 34000 instead of the proxy's portal (see #3).
CLOSE_UNNAMED_PORTAL: Final = codec.frame(CLOSE, bytes((TARGET_PORTAL, 0)))
# The unnamed statement outlives Sync on a server; a previous client's must not be Bound by
# the next one. Sent once per attachment, before a Bind/Describe of "" by a client that has
# not parsed an unnamed statement of its own (see PreparedStatements.ensure_unnamed).
CLOSE_UNNAMED_STATEMENT: Final = codec.frame(CLOSE, bytes((TARGET_STATEMENT, 0)))

# Core settings flagged GUC_LIST_QUOTE (guc_tables.c): SET quotes a string literal given
# for them as one identifier, so they are injected with set_config instead.
_LIST_QUOTE_SETTINGS: Final = frozenset({
    "search_path", "temp_tablespaces", "session_preload_libraries",
    "local_preload_libraries", "shared_preload_libraries", "unix_socket_directories"})
# Replies the server sends for the injected part, which the client must never see:
Q_DROP: Final = 3  # of a SELECT set_config(...): RowDescription, DataRow, CommandComplete
SET_COMPLETE: Final = codec.frame(COMMAND_COMPLETE, b"SET\x00")  # the reply to each SET LOCAL
# BindComplete, DataRow, CommandComplete, CloseComplete (+1 ParseComplete, +1 CloseComplete)
EXT_DROP: Final = 4
# The app.* settings whose SET LOCAL to '' may be omitted (see the module docstring): never
# app.tenant_id or app.tenant_type, which every transaction sets to a non-empty value.
OMITTABLE: Final = frozenset({"app.entity_id", "app.tenant_sig"})
# The startup parameters every pooled server logs in with (pool.py): its session then holds
# '' for the OMITTABLE names, whatever the login role's defaults say (a startup parameter
# overrides ALTER ROLE ... SET), and DISCARD ALL / RESET ALL return them to ''.
SERVER_SESSION: Final = tuple((name, "") for name in sorted(OMITTABLE))


class Injection:
    """Precomputed injection bytes for one tenant context.

    Attributes:
        q_prefix: SQL text spliced in front of a simple Query's text (ASCII).
        q_drop: how many replies (CommandComplete...) the prefix gets, to drop.
        q_reply: those replies' exact bytes when they are fixed (only SETs), so the common
            case is dropped with one ``startswith``; else b"".
        q_shift: characters the prefix adds, to shift ErrorResponse positions back.
        ext_bind: the Bind of ``CTX_STATEMENT`` to the unnamed portal with this context.
        ext_reply: the exact replies to ``ext_bind`` + Execute + Close of the portal in a
            UTF-8 session (``_ext_reply``), so the common case is dropped with one
            ``startswith``; anything else is matched reply by reply.
        signature: ``app.tenant_sig`` ('' when the database has no signing key).
        managed: the lower-case names of ``settings`` (their ParameterStatus is the proxy's).

    Never changed once built: ``injection`` shares one between clients.
    """

    __slots__ = ("_omit", "_signing_key", "context", "ext_bind", "ext_reply", "managed",
                 "q_drop", "q_prefix", "q_reply", "q_session", "q_shift", "set_local",
                 "settings", "signature", "tenant_key")

    def __init__(self, context: TenantContext, signing_key: bytes | None = None,
                 settings: tuple[tuple[str, str], ...] = (), *, set_local: bool = True,
                 omit: frozenset[str] = frozenset()):
        """``omit``: the OMITTABLE names every server's session holds as '' (its startup
        parameters, ``SERVER_SESSION``): a SET LOCAL of '' to them is left out of the
        simple-query forms."""
        self.context = context
        self._omit = omit & OMITTABLE
        self.set_local = set_local  # SET LOCAL statements, else one set_config SELECT
        self.settings = settings  # the client's own (name, value) settings, applied each time
        self.managed = frozenset(name.lower() for name, _ in settings)
        # Which tenant's state a server carries once a client of this context used it (see
        # Link.tenant_key); here, so that the clients sharing this Injection share it too.
        self.tenant_key: tuple[object, ...] = (
            context.identity.org_id, context.identity.tenant_type, context.identity.entity_id,
            context.role, context.search_path)
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
        app = [(n, v) for n, v in pairs[:4] if v or n not in self._omit]
        if set_local:
            prefix, self.q_drop, fixed = _set_local_prefix(app, settings, context)
        else:
            prefix, self.q_drop, fixed = (_select_set_config([*app, *pairs[4:]], is_local=True),
                                          Q_DROP, False)
        self.q_prefix: bytes = prefix.encode()
        self.q_reply: bytes = SET_COMPLETE * self.q_drop if fixed else b""
        # The same context for the whole session, for a statement allowed to run outside a
        # transaction block; that server is retired afterwards.
        self.q_session: bytes = _select_set_config(pairs, is_local=False).encode()
        self.q_shift: int = len(prefix)  # characters: error positions count characters
        values = [tenant_id, tenant_type, entity_id, self.signature,
                  _text_array(n for n, _ in settings), _text_array(v for _, v in settings),
                  context.search_path_value, context.role]
        self.ext_bind: bytes = codec.bind("", CTX_STATEMENT, [v.encode() for v in values])
        self.ext_reply: bytes = _ext_reply(
            (tenant_id, tenant_type, entity_id, self.signature, str(len(settings)),
             context.search_path_value, context.role))

    def with_settings(self, settings: tuple[tuple[str, str], ...]) -> Injection:
        """Returns: the same context with the client's settings replaced by ``settings``."""
        return injection(self.context, self._signing_key, settings, set_local=self.set_local,
                         omit=self._omit)


# Injections by everything they are made of (the whole context, token id included, since
# the session reads the identity back from it), so that every client of one token with the
# same settings shares the same bytes: about 1.3 kB and an HMAC less per client (issue 16).
# Bounded (settings come from clients): the oldest entry goes first; a client keeps its own.
_CACHE_SIZE: Final = 1024
_cache: dict[tuple[TenantContext, bytes | None, tuple[tuple[str, str], ...], bool,
                   frozenset[str]], Injection] = {}


def injection(context: TenantContext, signing_key: bytes | None = None,
              settings: tuple[tuple[str, str], ...] = (), *, set_local: bool = True,
              omit: frozenset[str] = frozenset()) -> Injection:
    """Returns: the Injection of these values, shared with every client that has them."""
    key = (context, signing_key, settings, set_local, omit)
    found = _cache.get(key)
    if found is None:
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]
        found = _cache[key] = Injection(context, signing_key, settings, set_local=set_local,
                                        omit=omit)
    return found


def _ext_reply(columns: tuple[str, ...]) -> bytes:
    """Returns: what Postgres answers to the extended injection (Bind, Execute of
    ``CTX_SQL``, Close of the unnamed portal) when the context statement is ready:
    BindComplete, one DataRow, CommandComplete "SELECT 1", CloseComplete.

    ``columns``: the row ``CTX_SQL`` returns: ``set_config`` gives back the value it set, as
    text (the app.* values, search_path, role), and the count of the client's settings. The
    bytes assume a UTF-8 session; when the server's differ (another client_encoding, a
    changed ``CTX_SQL``, an error), the comparison misses and the replies are matched one by
    one, so a wrong guess costs speed, never a reply dropped that should not be. A test
    checks them against a real server (tests/integration/test_ext_fast_path.py).
    """
    return (codec.frame(BIND_COMPLETE, b"") + codec.data_row(columns)
            + codec.command_complete("SELECT 1") + codec.frame(CLOSE_COMPLETE, b""))


def _set_local_prefix(app: list[tuple[str, str]], settings: tuple[tuple[str, str], ...],
                      context: TenantContext) -> tuple[str, int, bool]:
    """Returns: the simple-query prefix, how many replies it gets, and whether those are all
    ``SET_COMPLETE`` (no set_config SELECT among them).

    The client's own settings come after the ``app.*`` values and before search_path and
    role, like in ``CTX_SQL``. ``SET name = 'text'`` stores the text verbatim, as
    ``set_config`` does, except for settings flagged GUC_LIST_QUOTE, where it would quote the
    text as one identifier: those (and extensions' dotted names, whose flags we cannot know)
    go through a ``set_config`` SELECT, which costs Postgres more and answers with 3 replies.
    """
    # app.* names are fixed identifiers; values are literals. search_path_value is already
    # Postgres's own list spelling (quoted identifiers); the role goes as a string literal.
    parts = [f"SET LOCAL {name} = {quote_literal(value)};" for name, value in app]
    replies = len(parts)
    fixed = True
    for name, value in settings:
        if "." in name or name.lower() in _LIST_QUOTE_SETTINGS:
            parts.append(_select_set_config([(name, value)], is_local=True))
            replies += Q_DROP
            fixed = False
        else:
            parts.append(f"SET LOCAL {quote_ident(name)} = {quote_literal(value)};")
            replies += 1
    parts.append(f"SET LOCAL search_path = {context.search_path_value};")
    parts.append(f"SET LOCAL ROLE {quote_literal(context.role)};")
    return " ".join(parts), replies + 2, fixed


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
