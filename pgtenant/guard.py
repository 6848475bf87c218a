"""The statement guard: what a tenant session may not run (ARCHITECTURE.md §5, layer 2).

Owns the policy over parsed SQL: statements that could change who the session is or what
it may see (role, session authorization, search_path, the protected ``app.*`` settings,
DISCARD, LOAD, ALTER SYSTEM, COPY to/from programs or server files, dynamic-SQL helpers,
DO blocks) and statements that cannot run inside the transaction block every tenant
transaction is. Parsing is pglast (libpg_query: the server's own grammar), and verdicts are
cached by query text so the cost is paid once per distinct statement. It does not own how a
refusal reaches the client (``protocol/frontend.py`` rewrites the request so that Postgres
itself raises the error, keeping replies in order and transaction state exact).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from pglast.parser import ParseError

from .errors import ProgramLimitExceeded
from .protocol.encoding import UNSAFE as _UNSAFE_ENCODINGS
from .protocol.encoding import encoding_key
from .protocol.redirect import CATALOG, CLIENT_PID, redirect
from .protocol.refusal import RESERVED_PREFIX, RefusalText, StatementPolicy, Verdict
from .protocol.sql import ends_transaction, has_word, is_on, parse, pins_server
from .protocol.textcache import TextCache

__all__ = ["ALWAYS_PROTECTED", "SWITCHES", "Guard", "PinCapped"]

# Settings no tenant may change, whatever the config says.
ALWAYS_PROTECTED: Final = ("role", "session_authorization", "search_path")
# Built-in functions that run SQL text given as an argument: the guard cannot see that SQL.
_DYNAMIC_SQL_FUNCS: Final = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
    "cursor_to_xmlschema", "dblink", "dblink_exec", "dblink_open", "dblink_send_query",
})
# Server-side file access, even where privileges would allow it.
_FILE_FUNCS: Final = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_import",
    "lo_export",
})
# Large objects are protected per role: tenants sharing one role share all of them
# (lo_import/lo_export, server files, are refused above for everyone).
_LO_FUNCS: Final = frozenset({
    "lo_creat", "lo_create", "lo_open", "lo_close", "loread", "lowrite", "lo_lseek",
    "lo_lseek64", "lo_tell", "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink",
    "lo_get", "lo_put", "lo_from_bytea",
})
# What a tenant type may be allowed (TenantTypeConfig.allows): refused unless in Guard.allow.
SWITCHES: Final = ("lock_table", "large_objects", "explain_analyze")
_FALSE_WORDS: Final = frozenset({"false", "off", "no", "0"})
# Settings that change how Postgres lexes the next query. The guard reads text the way
# libpg_query does (UTF-8 compatible bytes, standard_conforming_strings on); a client-only
# encoding (see protocol/encoding.py), or backslash escapes in plain literals, would let
# Postgres see statements the guard read as the inside of a string literal.
_LEXER_SETTINGS: Final = frozenset({"client_encoding", "standard_conforming_strings"})
# Only texts with one of these words can be refused; everything else skips the parser.
_SUSPECT = re.compile(
    rb"(?i)u&|\b(set|reset|set_config|discard|load|alter|copy|vacuum|database|concurrently"
    rb"|tablespace|cluster|subscription|do|\w*_to_xml\w*|\w*_to_xmlschema|dblink\w*"
    rb"|listen|unlisten|notify|pg_notify|prepare|prepared|execute|deallocate|setseed"
    rb"|pg_read_file|pg_read_binary_file|pg_ls_dir|pg_stat_file|lo_import|lo_export"
    rb"|lock|explain|pg_prepared_statements|pg_terminate_backend|function|procedure|"
    + b"|".join(sorted(n.encode() for n in _LO_FUNCS)) + rb")\b"
)
# A transaction end inside a multi-statement text, or AND CHAIN, would leave the statements
# after it running outside the injected context (as the bare login role).
_TXN_END = re.compile(rb"(?i)\b(commit|rollback|end|abort|prepare|call|execute)\b")
_CHAIN = re.compile(rb"(?i)\bchain\b")
# A prefilter false for most texts (plain SELECT/DML), decided without a regex: only texts
# with one of these words, or with "u&", "_to_xml" or "dblink" inside a word, go on to the
# three precise tests. The words are those of _SUSPECT, _CHAIN and _TXN_END (tests check that
# every text those patterns match passes this filter).
_ANY_WORDS: Final = frozenset(
    b"set reset set_config discard load alter copy vacuum database concurrently tablespace "
    b"cluster subscription do listen unlisten notify pg_notify pg_read_file pg_read_binary_file "
    b"pg_ls_dir pg_stat_file lo_import lo_export chain commit rollback end abort prepare "
    b"call execute deallocate prepared lock explain setseed pg_prepared_statements "
    b"pg_terminate_backend function procedure".split()
) | {n.encode() for n in _LO_FUNCS}
# Built-ins tenants may not execute, and the stand-ins their calls are rewritten to
# (control/safe_settings.py): Postgres then decides on the values it is given.
_REDIRECTS: Final[dict[str, tuple[str, bytes | None]]] = {
    "set_config": ("pgtenant.set_config", None),
    # Its first argument is the pid the client's connection reported (BackendKeyData).
    "pg_terminate_backend": ("pgtenant.pg_terminate_backend", CLIENT_PID),
    # It maps the channel to the caller's tenant (protocol/listen.py, hardening.py).
    "pg_notify": ("pgtenant.pg_notify", None),
}
# System views that show the server session's state, and the functions that show the
# client's own instead (given the client's statements: protocol/redirect.py).
_VIEWS: Final = {"pg_prepared_statements": "pgtenant.prepared_statements"}
# Verdicts kept, by total bytes of their texts (see protocol/textcache.py).
_CACHE_BYTES = 4 << 20
RESERVED_NAME_PREFIX: Final = RESERVED_PREFIX.decode()
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# The random() sequence is the backend's: DISCARD ALL does not reseed it, so a seed chosen by
# one tenant would make random() predictable to it in the next tenant's transactions there.
_SEED_REFUSAL: Final = ("setseed() and SET seed are not allowed in tenant sessions: the seed "
                        "outlives the transaction on a server other tenants use")
# What pgtenant supports of LISTEN/NOTIFY (protocol/listen.py); anything else is refused.
_LISTEN_REFUSAL: Final = (
    "{} is supported through pgtenant only as the only statement of a Query or a Parse (not "
    "in a multi-statement text), on a database with a context-signing key, where channel "
    "names are private to the tenant"
)
_NOT_IN_TXN_HINT = (
    "pgtenant runs every tenant transaction inside a transaction block that carries the "
    "tenant's context; run this statement with an admin connection to Postgres instead"
)


def _has_inside(sql: bytes) -> bool:
    lowered = sql.lower()  # spelled out, not any(...): this runs once per transaction
    # find, not in: ``bytes in bytes`` first tries the needle as an int and formats (then
    # clears) a TypeError, three times per transaction (1.4-1.8 % of the proxy's CPU,
    # issue 16).
    return (lowered.find(b"u&") >= 0 or lowered.find(b"_to_xml") >= 0
            or lowered.find(b"dblink") >= 0)


class _Refused(NamedTuple):
    """A cached refusal: its message and its metrics rule."""

    message: str
    rule: str


# A refusal's SQLSTATE unless a rule sets another (insufficient_privilege).
_REFUSAL_SQLSTATE: Final = "42501"


class Refusal(Exception):
    """Internal: carries the message of the first rule a statement breaks."""

    # Set in __init__, not as class defaults: compiled by mypyc (setup.py), an exception
    # class's defaults are not given to its instances.
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.rule: str | None = None  # metrics label; set to the parse-node kind when not given
        self.sqlstate = _REFUSAL_SQLSTATE  # what Postgres raises for it (refusal.RefusalText)


class NotInTransaction(Refusal):
    """Internal: the statement's only fault is that it cannot run in a transaction block."""

    def __init__(self, what: str):
        super().__init__(f"{what} cannot run through pgtenant. {_NOT_IN_TXN_HINT}")
        self.what = what


class Guard:
    """Statement policy for tenant sessions, with verdicts cached by text."""

    def __init__(self, protected_settings: Iterable[str] = ("app.",), *,
                 allow: Iterable[str] = (), max_parse: int = 64 * 1024):
        """``allow``: which of SWITCHES this policy permits (a tenant type's); ``max_parse``:
        the largest text parsed (max_parsed_query_size)."""
        names = [p.lower() for p in protected_settings]
        self._exact = frozenset(ALWAYS_PROTECTED) | {n for n in names if not n.endswith(".")}
        self._prefixes = tuple(n for n in names if n.endswith("."))
        self.allow = frozenset(allow)
        self.max_parse = max_parse
        # text -> (message, rule), or the rewritten text (in parts); bounded in bytes,
        # texts above max_parse never parsed.
        self._cache: TextCache[_Refused | bytes | tuple[bytes, ...] | None] = (
            TextCache(_CACHE_BYTES, max_parse))
        # single statements refused only for NotInTransaction
        self._outside: TextCache[str] = TextCache(_CACHE_BYTES // 16, 64 * 1024)
        self.refusals = 0
        self.refusals_by_rule: dict[str, int] = {}  # pgtenant_guard_refusals_total{rule}
        self._redirects = 0  # calls to rewrite found by the walk of the text being judged
        self._views: list[bool] = []  # views to rewrite found by it: whether each is aliased

    def check(self, sql: bytes) -> Verdict:
        """Judge one Query or Parse text.

        Returns: None when the statement may run as sent; the text to run instead when it
        calls a built-in tenants reach through a stand-in (``set_config``: see
        protocol/redirect.py), in parts to join with the client's statements when it reads
        a view of the server session's statements; else the refusal message (SQLSTATE
        42501).
        Text with a suspect word that pglast cannot parse is refused: pglast's grammar is
        Postgres 18's, and an older backend may accept what it rejects (a word that became
        a reserved keyword since), which would smuggle a ``SET ROLE`` past an unparsed text.
        Text without a suspect word is not parsed, so typos there get Postgres's own error.
        A text with a suspect word above ``max_parse`` bytes is refused unparsed with
        SQLSTATE 54000 (a ``RefusalText``): parsing holds the event loop for every client,
        2-5 s per megabyte of adversarial text (parse, JSON load and walk).
        """
        if not has_word(sql, _ANY_WORDS) and not _has_inside(sql):
            # The common case, decided by one search and never cached: texts that differ
            # only by their literals (pgbench -S, client-side parameters) would churn it.
            return None
        verdict = self._cache.get(sql, False)
        if verdict is False:
            suspect = (_SUSPECT.search(sql) is not None or _CHAIN.search(sql) is not None
                       or (b";" in sql and _TXN_END.search(sql) is not None))
            if suspect and len(sql) > self.max_parse:
                # Refused unparsed (not cached: it is big), in the session: Postgres raises
                # it, so the transaction is aborted exactly as for any other error.
                self.refusals_by_rule["too_big"] = self.refusals_by_rule.get("too_big", 0) + 1
                return RefusalText(
                    f"pgtenant: this {len(sql)}-byte statement text has words the statement "
                    "guard checks by parsing (SET, COPY, DO, LOCK...), and texts over "
                    f"max_parsed_query_size ({self.max_parse} bytes) are not parsed; send "
                    "smaller statements (bind values as parameters), or raise "
                    "max_parsed_query_size", ProgramLimitExceeded.sqlstate)
            verdict = self._judge(sql) if suspect else None
            self._cache.put(sql, verdict)
        if not isinstance(verdict, _Refused):
            return verdict  # type: ignore[return-value]  # (False: never cached)
        message, rule = verdict
        self.refusals_by_rule[rule] = self.refusals_by_rule.get(rule, 0) + 1
        return message

    def outside_transaction_kind(self, sql: bytes) -> str | None:
        """Returns: e.g. "VACUUM" when ``check`` refused ``sql`` (a single statement) only
        because it cannot run inside a transaction block; None otherwise.
        """
        if self.check(sql) is None:
            return None
        kind = self._outside.get(sql)
        if kind is None and sql not in self._outside:
            # Both caches are bounded on their own: the verdict may have outlived this entry.
            self._judge(sql)
            kind = self._outside.get(sql)
        return kind

    def is_protected(self, name: str) -> bool:
        """Returns: whether a tenant may not change setting ``name``."""
        name = name.lower()
        return name in self._exact or name.startswith(self._prefixes)

    # ------------------------------------------------------------------ rules

    def _judge(self, sql: bytes) -> _Refused | bytes | tuple[bytes, ...] | None:
        stmts: list[dict[str, Any]] = []
        self._redirects = 0
        self._views = []
        try:
            tree = parse(sql)  # shared with the classifier (protocol/sql.py)
            stmts = [item.get("stmt", {}) for item in tree.get("stmts", [])]
            for stmt in stmts[:-1]:
                _no_statements_after_transaction_end(stmt)
            self._walk(tree)
        # A name of its own: compiled by mypyc, a name bound by two except clauses keeps the
        # first one's type (a Refusal would fail the NotInTransaction check below).
        except NotInTransaction as outside:
            if len(stmts) == 1:
                self._outside.put(sql, outside.what)
            return _Refused(f"pgtenant: {outside}", "not_in_transaction")
        except Refusal as refusal:
            message = f"pgtenant: {refusal}"
            if refusal.sqlstate != _REFUSAL_SQLSTATE:
                message = RefusalText(message, refusal.sqlstate)
            return _Refused(message, refusal.rule or "statement")
        except RecursionError:  # cannot be checked, so it does not run (fail closed)
            return _Refused("pgtenant: statement is nested too deeply for the statement guard",
                            "too_deep")
        except ParseError as exc:
            return _Refused(f"pgtenant: the statement guard cannot parse this text ({exc}), so "
                            "it was not run", "unparsable")
        except ValueError:
            return _Refused("pgtenant: the statement guard cannot read this text, so it was "
                            "not run", "unreadable")
        if self._redirects or self._views:
            parts = redirect(sql, _REDIRECTS, self._redirects, _VIEWS, self._views)
            if parts is None:
                return _Refused("pgtenant: the statement guard cannot rewrite this text's "
                                "set_config() or pg_terminate_backend() calls or "
                                "pg_prepared_statements references to pgtenant's stand-ins, "
                                "so it was not run; write their names plainly",
                                "unrewritable")
            return parts[0] if len(parts) == 1 else parts
        return None

    def _walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self._walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            rule = _RULES.get(key)
            if rule is not None:
                try:
                    rule(self, value)
                except Refusal as refusal:
                    if refusal.rule is None:  # "VariableSetStmt" -> "variable_set"
                        refusal.rule = _SNAKE.sub("_", key.removesuffix("Stmt")).lower()
                    raise
            if isinstance(value, (dict, list)):
                self._walk(value)

    def _variable_set(self, stmt: dict[str, Any]) -> None:
        kind = stmt.get("kind", "")
        name = str(stmt.get("name", "")).lower()
        if kind == "VAR_RESET_ALL":
            raise Refusal("RESET ALL would also reset the tenant's context here; pgtenant "
                          "answers it itself when it is sent alone, outside a transaction "
                          "block (protocol/local.py)")
        if (name == "search_path" and kind in ("VAR_RESET", "VAR_SET_DEFAULT")
                and not stmt.get("is_local")):
            raise Refusal("RESET search_path is answered by pgtenant itself when it is sent "
                          "as a statement of its own (the search_path is always the "
                          "tenant's); here it would run on the server and drop it")
        if name in _LEXER_SETTINGS and kind == "VAR_SET_VALUE":
            args = stmt.get("args", [])
            value = _const_text(args[0]) if len(args) == 1 else None
            _check_lexer_setting(name, value)
        if name == "seed":
            raise Refusal(_SEED_REFUSAL)
        if name and self.is_protected(name):
            verb = "RESET" if kind == "VAR_RESET" else "SET"
            shown = "SESSION AUTHORIZATION" if name == "session_authorization" else name
            raise Refusal(f"{verb} {shown} is not allowed in tenant sessions: pgtenant sets "
                          "it for every transaction")

    def _func_call(self, call: dict[str, Any]) -> None:
        parts = [p.get("String", {}).get("sval", "") for p in call.get("funcname", [])]
        name = parts[-1].lower() if parts else ""
        if name in _REDIRECTS and (parts == [name] or parts == [CATALOG, name]):
            self._redirects += 1  # the built-in: rewritten to pgtenant's stand-in
        if name == "set_config":
            args = call.get("args", [])
            first = args[0] if args else None
            setting = None
            if isinstance(first, dict):
                setting = first.get("A_Const", {}).get("sval", {}).get("sval")
            # A computed name or value is judged by pgtenant.set_config on the value
            # Postgres sees; constants are refused here already, with the guard's message.
            if setting is not None and setting.lower() == "seed":
                raise Refusal(_SEED_REFUSAL)
            if setting is not None and self.is_protected(setting):
                raise Refusal(f"set_config('{setting}', ...) is not allowed in tenant "
                              "sessions: pgtenant sets it for every transaction")
            if setting is not None and setting.lower() in _LEXER_SETTINGS:
                value = _const_text(args[1]) if len(args) > 1 else None
                if value is not None:
                    _check_lexer_setting(setting.lower(), value)
        elif name in _DYNAMIC_SQL_FUNCS:
            raise Refusal(f"{name}() runs SQL text pgtenant cannot check; it is not allowed "
                          "in tenant sessions")
        elif name == "setseed":
            raise Refusal(_SEED_REFUSAL)
        elif name in _FILE_FUNCS:
            raise Refusal(f"{name}() reads or writes server files; it is not allowed in "
                          "tenant sessions")
        elif name in _LO_FUNCS and "large_objects" not in self.allow:
            refusal = Refusal(f"{name}(): large objects are not allowed for this tenant type: "
                              "its tenants share one role, so they would share every large "
                              "object (allow_large_objects)")
            refusal.rule = "large_object"
            raise refusal

    def _range_var(self, rel: dict[str, Any]) -> None:
        # pg_prepared_statements shows every statement of the pooled server's session (the
        # proxy's, other clients'): read through pgtenant.prepared_statements instead, which
        # shows the client's own under its names (protocol/redirect.py).
        if (rel.get("relname") in _VIEWS and not rel.get("catalogname")
                and rel.get("schemaname") in (None, CATALOG)):
            self._views.append("alias" in rel)

    def _discard(self, stmt: dict[str, Any]) -> None:
        # PLANS, SEQUENCES and TEMP only remove what the session holds; ALL would also
        # reset the context (RESET ALL, SET SESSION AUTHORIZATION DEFAULT).
        if stmt.get("target") == "DISCARD_ALL":
            raise Refusal("DISCARD ALL would also reset the tenant's context here; pgtenant "
                          "answers it itself when it is sent alone, outside a transaction "
                          "block (protocol/local.py)")

    def _lock(self, _stmt: dict[str, Any]) -> None:
        if "lock_table" not in self.allow:
            raise Refusal("LOCK TABLE is not allowed for this tenant type: its tenants share "
                          "tables and one role, so one tenant's lock would block every other "
                          "(allow_lock_table)")

    def _explain(self, stmt: dict[str, Any]) -> None:
        if "explain_analyze" in self.allow:
            return
        for option in stmt.get("options", []):
            elem = option.get("DefElem", {}) if isinstance(option, dict) else {}
            if elem.get("defname") != "analyze":
                continue
            # ANALYZE, ANALYZE on/true/1, or a value not read: refused (fail closed)
            if _option_text(elem.get("arg")) not in _FALSE_WORDS:
                raise Refusal("EXPLAIN ANALYZE is not allowed for this tenant type: its row "
                              "counts (Rows Removed by Filter) reveal rows row-level "
                              "security hides from it; plain EXPLAIN is allowed "
                              "(allow_explain_analyze)")

    def _copy(self, stmt: dict[str, Any]) -> None:
        if stmt.get("is_program"):
            raise Refusal("COPY ... PROGRAM is not allowed in tenant sessions")
        if stmt.get("filename"):
            raise Refusal("COPY to or from a server file is not allowed in tenant sessions; "
                          "use COPY ... FROM STDIN / TO STDOUT")

    def _vacuum(self, stmt: dict[str, Any]) -> None:
        if stmt.get("is_vacuumcmd"):
            raise _not_in_txn("VACUUM")

    def _index(self, stmt: dict[str, Any]) -> None:
        if stmt.get("concurrent"):
            raise _not_in_txn("CREATE INDEX CONCURRENTLY")

    def _drop(self, stmt: dict[str, Any]) -> None:
        if stmt.get("concurrent"):
            raise _not_in_txn("DROP INDEX CONCURRENTLY")

    def _reindex(self, stmt: dict[str, Any]) -> None:
        for param in stmt.get("params", []):
            if param.get("DefElem", {}).get("defname") == "concurrently":
                raise _not_in_txn("REINDEX CONCURRENTLY")
        if stmt.get("kind") in ("REINDEX_OBJECT_SCHEMA", "REINDEX_OBJECT_SYSTEM",
                                "REINDEX_OBJECT_DATABASE"):
            raise _not_in_txn("REINDEX SCHEMA/SYSTEM/DATABASE")

    def _cluster(self, stmt: dict[str, Any]) -> None:
        if not stmt.get("relation"):
            raise _not_in_txn("CLUSTER without a table")

    def _create_function(self, stmt: dict[str, Any]) -> None:
        """A function's body runs later, where the guard cannot look: a tenant's LANGUAGE sql
        function (pg_temp, for types with temp_tables) ran ``SET ROLE`` to another tenant's
        role, or set ``app.*`` for the session (issue 16). So the body is judged now, by
        the same rules as the text it is in. A BEGIN ATOMIC body is part of the tree, walked
        like any node; a string body is parsed here; a body in any other language (SQL
        through SPI, which no parse can see) is refused."""
        language, bodies = None, None
        for option in stmt.get("options", []):
            elem = option.get("DefElem", {}) if isinstance(option, dict) else {}
            if elem.get("defname") == "language":
                language = str(elem.get("arg", {}).get("String", {}).get("sval", "")).lower()
            elif elem.get("defname") == "as":
                items = elem.get("arg", {}).get("List", {}).get("items", [])
                bodies = [item.get("String", {}).get("sval") for item in items]
        if bodies is None:
            return  # no string body: BEGIN ATOMIC (walked), or Postgres refuses it
        if language != "sql":
            raise Refusal(f"functions in language {language or '(none)'} run SQL the statement "
                          "guard cannot check; only LANGUAGE sql functions may be created in "
                          "tenant sessions")
        if len(bodies) != 1 or not isinstance(bodies[0], str):
            raise Refusal("a LANGUAGE sql function has exactly one body string")
        redirects, views = self._redirects, len(self._views)
        self._walk(parse(bodies[0].encode()))  # ParseError: refused as unparsable (_judge)
        if self._redirects != redirects or len(self._views) != views:
            # The stand-ins are reached by rewriting the client's text, and a body is one
            # string literal in it: inside it, the call would reach the locked built-in.
            raise Refusal("a function body may not call set_config(), pg_terminate_backend() "
                          "or pg_notify(), nor read pg_prepared_statements, in tenant "
                          "sessions: pgtenant reaches their tenant-safe versions by "
                          "rewriting statements it sees, and it cannot rewrite a body")


def _const_text(node: Any) -> str | None:
    """Returns: the text of a string/number/boolean constant, or None for anything else."""
    const = node.get("A_Const", {}) if isinstance(node, dict) else {}
    for key, inner in (("sval", "sval"), ("ival", "ival"), ("boolval", "boolval")):
        if key in const:
            return str(const[key].get(inner, "")).lower()
    return None


def _option_text(arg: Any) -> str | None:
    """Returns: an EXPLAIN option's value as text ("true" when bare), None if not a constant."""
    if arg is None:
        return "true"
    if not isinstance(arg, dict):
        return None
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower()
    if "Integer" in arg:  # protobuf JSON leaves out a zero
        return str(arg["Integer"].get("ival", 0))
    if "Boolean" in arg:
        return "true" if arg["Boolean"].get("boolval") else "false"
    return None


def _check_lexer_setting(name: str, value: str | None) -> None:
    if value is None:
        raise Refusal(f"SET {name} to a computed value is not allowed in tenant sessions")
    if name == "client_encoding":
        if encoding_key(value) in _UNSAFE_ENCODINGS:
            raise Refusal(f"client_encoding {value!r} is not allowed in tenant sessions: its "
                          "multibyte characters can contain ASCII bytes; use UTF8")
    elif not is_on(value):
        raise Refusal("standard_conforming_strings can only be on in tenant sessions")


def _no_statements_after_transaction_end(stmt: dict[str, Any]) -> None:
    if ends_transaction(stmt):
        refusal = Refusal("statements after COMMIT, ROLLBACK, CALL or EXECUTE in the same "
                          "query could run outside the tenant's transaction context; send "
                          "them as a separate query")
        refusal.rule = "after_transaction_end"
        raise refusal


_TWO_PHASE: Final = frozenset({"TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED",
                                "TRANS_STMT_ROLLBACK_PREPARED"})


def _transaction(_guard: Guard, stmt: dict[str, Any]) -> None:
    if stmt.get("kind") in _TWO_PHASE:
        # A prepared transaction outlives the session and holds its locks; any session of
        # the same role (every tenant of a shared-role type) may COMMIT/ROLLBACK PREPARED it.
        refusal = Refusal("prepared transactions (PREPARE TRANSACTION, COMMIT/ROLLBACK "
                          "PREPARED) are not available through pgtenant: one would outlive "
                          "the session and could be finished by any session of the same role")
        # Postgres's own SQLSTATE when prepared transactions are disabled
        # (max_prepared_transactions = 0), which drivers map to "not supported".
        refusal.sqlstate = "55000"
        raise refusal
    if stmt.get("chain"):
        raise Refusal("COMMIT/ROLLBACK AND CHAIN is not allowed in tenant sessions: the chained "
                      "transaction would start without the tenant's context")


def _statement_name(_guard: Guard, stmt: dict[str, Any]) -> None:
    # The proxy's own prepared statements (the context statement, renamed client
    # statements) live on pooled servers: SQL that names them could run, replace or drop
    # them under another tenant's transactions. Protocol messages naming them are refused
    # in protocol/refusal.py; this is the same rule for SQL PREPARE/EXECUTE/DEALLOCATE.
    name = str(stmt.get("name") or "")
    if name.lower().startswith(RESERVED_NAME_PREFIX):
        refusal = Refusal(f"prepared statement name {name!r} is reserved: names starting "
                          f"with {RESERVED_NAME_PREFIX} belong to pgtenant")
        refusal.rule = "reserved_name"
        raise refusal


def _refuse(message: str) -> Any:
    def rule(_guard: Guard, _stmt: Any) -> None:
        raise Refusal(message)

    return rule


def _not_in_txn(what: str) -> Refusal:
    return NotInTransaction(what)


_RULES: Final[dict[str, Any]] = {
    "VariableSetStmt": Guard._variable_set,
    "TransactionStmt": _transaction,
    "FuncCall": Guard._func_call,
    "CopyStmt": Guard._copy,
    "VacuumStmt": Guard._vacuum,
    "IndexStmt": Guard._index,
    "DropStmt": Guard._drop,
    "ReindexStmt": Guard._reindex,
    "ClusterStmt": Guard._cluster,
    "CreateFunctionStmt": Guard._create_function,
    "PrepareStmt": _statement_name,
    "ExecuteStmt": _statement_name,
    "DeallocateStmt": _statement_name,
    "LockStmt": Guard._lock,
    "ExplainStmt": Guard._explain,
    "DiscardStmt": Guard._discard,
    "RangeVar": Guard._range_var,
    # Channels are database-wide: the proxy maps a tenant's channels to its own
    # (protocol/listen.py) where it can see the statement; everywhere else, refused.
    "ListenStmt": _refuse(_LISTEN_REFUSAL.format("LISTEN")),
    "UnlistenStmt": _refuse(_LISTEN_REFUSAL.format("UNLISTEN")),
    "NotifyStmt": _refuse(_LISTEN_REFUSAL.format("NOTIFY") + "; elsewhere, call "
                          "pgtenant.pg_notify(channel, payload)"),
    "LoadStmt": _refuse("LOAD is not allowed in tenant sessions"),
    "AlterSystemStmt": _refuse("ALTER SYSTEM is not allowed in tenant sessions"),
    # Per-role and per-database defaults would apply to every later session of the login role.
    "AlterRoleSetStmt": _refuse("ALTER ROLE ... SET is not allowed in tenant sessions"),
    "AlterDatabaseSetStmt": _refuse("ALTER DATABASE ... SET is not allowed in tenant sessions"),
    "DoStmt": _refuse("DO blocks run SQL pgtenant cannot check; they are not allowed in "
                      "tenant sessions"),
    "CreatedbStmt": _refuse(f"CREATE DATABASE cannot run through pgtenant. {_NOT_IN_TXN_HINT}"),
    "DropdbStmt": _refuse(f"DROP DATABASE cannot run through pgtenant. {_NOT_IN_TXN_HINT}"),
    "CreateTableSpaceStmt": _refuse("CREATE TABLESPACE is not allowed in tenant sessions"),
    "DropTableSpaceStmt": _refuse("DROP TABLESPACE is not allowed in tenant sessions"),
    "CreateSubscriptionStmt": _refuse("subscriptions are not allowed in tenant sessions"),
    "AlterSubscriptionStmt": _refuse("subscriptions are not allowed in tenant sessions"),
    "DropSubscriptionStmt": _refuse("subscriptions are not allowed in tenant sessions"),
}


class PinCapped:
    """A session's statement policy: the guard's ``check`` plus its tenant's cap on pinned
    servers (login.pin_capped). Here, compiled with the guard, and not in login.py: it runs
    for every Query and Parse, and interpreted it cost about 5 % of the proxy's CPU per
    ``pgbench -S`` transaction (issue 16). An object with slots, not a closure: every
    session keeps one (a closure and its cells cost an idle client about 250 bytes more)."""

    __slots__ = ("check", "limit", "may_pin")

    def __init__(self, check: StatementPolicy, may_pin: Callable[[], bool],
                 limit: Callable[[], int]):
        self.check, self.may_pin, self.limit = check, may_pin, limit

    def __call__(self, sql: bytes) -> Verdict:
        verdict = self.check(sql)
        # pins_server before may_pin: both are free of side effects, and pins_server is
        # compiled and settles almost every statement (nothing pins) where may_pin() is the
        # interpreted lookup of the tenant's pinned count.
        if isinstance(verdict, str) or not pins_server(sql) or self.may_pin():
            return verdict
        return (f"pgtenant: this statement would keep a server connection for this "
                f"session, and this tenant's sessions already keep {self.limit()} "
                "(max_pinned_servers); end one of them, or avoid session state "
                "(use protocol-level prepared statements, transaction-scoped locks "
                "and cursors)")
