"""What a client's SQL may do to the server session, as flags the tracker acts on.

Owns the cheap classification of Query/Parse texts: may it change the transaction status
(the tracker then waits before judging the next pipelined request), may it drop the proxy's
context statement, and may it leave session state behind (then the server is closed instead
of pooled: reuse only when provably clean). Regexes pre-filter; pglast (libpq_query, the
server's own grammar) confirms session state; verdicts are cached by text. It does not
decide what tenants may run at all (that is the statement guard, issue #3). No I/O.
"""

from __future__ import annotations

import gc
import json
import re
from typing import Any, Final

from pglast.parser import ParseError, parse_sql_json

from .textcache import TextCache

__all__ = [
    "DDL",
    "DROPS_STATEMENTS",
    "MAY_COPY_IN",
    "NOTIFIES",
    "SESSION_STATE",
    "TXN_CONTROL",
    "TXN_END",
    "classify",
    "ends_transaction",
    "has_word",
    "is_on",
    "local_command",
    "parse",
    "pins_server",
    "plain_sets",
    "words",
]

TXN_CONTROL: Final = 1  # may move the transaction status between I and T/E
DROPS_STATEMENTS: Final = 2  # may deallocate prepared statements (ours included)
SESSION_STATE: Final = 4  # may leave state that outlives the transaction
TXN_END: Final = 8  # may end the transaction (COMMIT, ROLLBACK, PREPARE TRANSACTION, CALL)
# May put the server in COPY-in mode (COPY ... FROM STDIN, or EXECUTE of a statement that
# might be one): the tracker waits for its replies before the next request, so that the
# server's CopyInResponse tells exactly which Syncs it will ignore (see backend.py, _copy_started).
MAY_COPY_IN: Final = 16
# May be a LISTEN, UNLISTEN or NOTIFY, which the proxy answers or rewrites (listen.py).
NOTIFIES: Final = 32
# May change the catalog (DDL; DO and CALL may run some): a prepared statement parsed before
# may be stale after it (a parameter type dropped, a column's type altered, objects created
# in a transaction that rolls back). The proxy-global statements' copies are then
# re-established before they are relied on (protocol/freshness.py).
DDL: Final = 64
_DDL_WORDS: Final = frozenset(b"create drop alter import do call".split())
# Statements that cannot change the catalog, read on the parse tree of a text with one of the
# words above (INSERT ... ON CONFLICT DO UPDATE is no DDL); any other statement may.
_NOT_DDL: Final = frozenset((
    "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TransactionStmt",
    "VariableSetStmt", "VariableShowStmt", "ExplainStmt", "CopyStmt", "PrepareStmt",
    "ExecuteStmt", "DeallocateStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt", "LockStmt",
    "DeclareCursorStmt", "FetchStmt", "ClosePortalStmt", "DiscardStmt", "TruncateStmt",
))

# What may change the transaction status is a closed set of statements in Postgres's
# grammar: TransactionStmt (BEGIN, START, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE,
# PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED), CALL and DO (procedures and DO blocks may
# COMMIT), and SQL EXECUTE, which runs any statement prepared on the session, including one
# a client prepared with the protocol's Parse (whose text may be COMMIT). Functions cannot
# (they run in an atomic context), nor can rules or triggers. Each of those statements starts
# with one of the words below, and words() splits more eagerly than Postgres's lexer, so a
# text without them cannot change the status: the classification errs only on the careful
# side (a false positive costs a pipelining pause).
# False positives only cost a pipelining pause or a server reconnect; false negatives would
# be bugs, so the patterns are generous (CASE ... END matches "end", for instance).
_TXN_RE = re.compile(
    rb"(?i)\b(begin|start|commit|end|rollback|abort|prepare|call|do|execute)\b")
_DROPS_RE = re.compile(rb"(?i)\b(deallocate|discard)\b")
_END_RE = re.compile(rb"(?i)\b(commit|end|rollback|abort|prepare|call|execute)\b")
_COPY_RE = re.compile(rb"(?i)\b(copy|execute)\b")
_NOTIFY_RE = re.compile(rb"(?i)\b(listen|unlisten|notify)\b")
_ENDING_KINDS = frozenset({"TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE",
                           "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"})
_SESSION_RE = re.compile(
    rb"(?i)advisory|pg_temp|\b(set|reset|listen|prepare|hold|temp|temporary|load|set_config|do|call"
    rb"|into|execute)\b"
)
_SESSION_LOCK_FUNCS = frozenset({
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
})
# The words of the four patterns above (and of local_command's): a text with none of them
# (and none of _SUBWORDS) has no flag at all. Checked with words() below, about ten times
# faster than one search with the combined pattern, which matters once per transaction.
_ANY_WORDS: Final = frozenset(
    b"begin start commit end rollback abort prepare call do deallocate discard set reset "
    b"listen hold temp temporary load set_config into execute copy unlisten notify".split()
) | _DDL_WORDS
# Inside a word: session advisory locks (pg_advisory_lock...) and objects created in the
# temp schema by name (pg_temp.t, pg_temp_3.t).
_SUBWORDS: Final = re.compile(rb"(?i)advisory|pg_temp")
_WORD_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
# bytes.translate table: ASCII letters lower-cased, digits and '_' kept, all else a space,
# so split() yields exactly the regex \w+ runs of a bytes pattern, lower-cased.
_WORDS_TABLE: Final = bytes(
    (c + 32 if 65 <= c <= 90 else c if c in _WORD_CHARS else 32) for c in range(256))


def words(sql: bytes) -> list[bytes]:
    """Returns: the lower-cased ``\\w+`` words of ``sql`` (ASCII letters, digits, '_')."""
    return sql.translate(_WORDS_TABLE).split()


_WORDS_CHUNK: Final = 1 << 20


def has_word(sql: bytes, wanted: frozenset[bytes], chunk: int = _WORDS_CHUNK) -> bool:
    """Returns: whether one of ``sql``'s words (see ``words``) is in ``wanted``.

    A big text is split a chunk at a time, cut at a non-word byte: as one list, the words of
    a 64 MB text take some 600 MB.
    """
    if len(sql) <= chunk:
        return not wanted.isdisjoint(sql.translate(_WORDS_TABLE).split())
    table = sql.translate(_WORDS_TABLE)
    start, size = 0, len(table)
    while start < size:
        end = table.find(b" ", start + chunk)
        end = size if end < 0 else end
        if not wanted.isdisjoint(table[start:end].split()):
            return True
        start = end
    return False


def _flagless(sql: bytes) -> bool:
    """Returns: whether ``sql`` has no word of ``_ANY_WORDS`` and no ``_SUBWORDS`` match:
    no flag at all (``classify``'s prefilter, once per transaction of plain texts).

    A text up to a chunk is translated once for both tests: the table keeps letters
    (lower-cased), digits and '_' and blanks every other byte, so a run of those,
    "advisory" or "pg_temp", is in it exactly where the case-insensitive regex finds it in
    the text. The regex search was 2 % of the proxy's CPU under pgbench -S. ``find``, not
    ``in``: ``bytes in bytes`` first tries the needle as an int, and formats (then clears)
    a TypeError each time.
    """
    if len(sql) > _WORDS_CHUNK:
        return not has_word(sql, _ANY_WORDS) and not _SUBWORDS.search(sql)
    table = sql.translate(_WORDS_TABLE)
    return (table.find(b"advisory") < 0 and table.find(b"pg_temp") < 0
            and _ANY_WORDS.isdisjoint(table.split()))


_CURSOR_OPT_HOLD: Final = 0x0020  # parsenodes.h
# The classifier parses no text above this and assumes the worst of it instead (session
# state: the server is closed after the transaction; it may end the transaction). Parsing and
# walking the tree hold the event loop for every client, 2-5 s per MB of many short
# statements; the classifier runs before the statement guard, so this is also what bounds
# a text the guard then refuses (max_parsed_query_size, whose default this is).
CLASSIFY_PARSE_MAX: Final = 64 * 1024
_cache: TextCache[int] = TextCache(4 << 20, CLASSIFY_PARSE_MAX)  # bounded in text bytes


def classify(sql: bytes) -> int:
    """Returns: the TXN_CONTROL | DROPS_STATEMENTS | SESSION_STATE flags for ``sql``."""
    flags = _cache.get(sql)
    if flags is not None:
        return flags
    if _flagless(sql):
        return 0  # not cached: texts differing only by literals would churn the cache
    if len(sql) > CLASSIFY_PARSE_MAX:
        # Too big to parse (see CLASSIFY_PARSE_MAX), and not cached: every flag, without
        # even the four regex passes (some 70 ms per MB each, and asked more than once).
        return (TXN_CONTROL | DROPS_STATEMENTS | SESSION_STATE | TXN_END | MAY_COPY_IN | NOTIFIES
                | DDL)
    flags = DDL if has_word(sql, _DDL_WORDS) and _may_change_catalog(sql) else 0
    if _TXN_RE.search(sql):
        flags |= TXN_CONTROL
    if _DROPS_RE.search(sql):
        flags |= DROPS_STATEMENTS
    if _SESSION_RE.search(sql) and _leaves_session_state(sql):
        flags |= SESSION_STATE
    if _END_RE.search(sql) and _may_end_transaction(sql):
        flags |= TXN_END
    if _COPY_RE.search(sql) and _may_copy_in(sql):
        flags |= MAY_COPY_IN
    if _NOTIFY_RE.search(sql):
        flags |= NOTIFIES
    _cache.put(sql, flags)
    return flags


# A tree takes some 20-50 times its text's size in memory: only small texts, 1 MB of them.
_TREES: TextCache[dict[str, Any] | Exception] = TextCache(1 << 20, 8192)
# And the last bigger one (up to CLASSIFY_PARSE_MAX): classify and then the statement guard
# ask for the same text in a row, so it is parsed once; one tree of a few MB at most.
_last: list[tuple[bytes, dict[str, Any] | Exception]] = []


def parse(sql: bytes) -> dict[str, Any]:
    """Returns: the parse tree of ``sql`` as pglast's JSON, cached for small texts and
    shared: the statement guard, classify, plain_sets and local_command read the same texts.
    Raises: ParseError, ValueError or RecursionError when it cannot be parsed.
    """
    tree = _TREES.get(sql)
    if tree is None and _last and _last[0][0] == sql:
        tree = _last[0][1]
    if tree is None:
        try:
            text = parse_sql_json(sql.decode("utf-8", "replace"))  # releases the GIL
            # json.loads makes a container per node; with the collector on, its full passes
            # over the whole heap cost 4-5 times the load itself for a big tree (measured:
            # 1.7 s against 0.37 s for 1 MB of statements). No cycles are made here.
            enabled = gc.isenabled()
            gc.disable()
            try:
                tree = json.loads(text)
            finally:
                if enabled:
                    gc.enable()
        except (ParseError, ValueError, RecursionError) as exc:
            tree = exc
        if len(sql) <= _TREES.max_item:
            _TREES.put(sql, tree)
        elif len(sql) <= CLASSIFY_PARSE_MAX:
            _last[:] = [(sql, tree)]
    if isinstance(tree, Exception):
        raise tree.with_traceback(None)
    return tree


def _tree(sql: bytes) -> dict[str, Any] | None:
    """Returns: the parse tree of ``sql``, or None when it does not parse or is too big to
    parse here (callers then assume the worst)."""
    if len(sql) > CLASSIFY_PARSE_MAX:
        return None
    try:
        return parse(sql)
    except (ParseError, ValueError, RecursionError):
        return None


def _single_statement(sql: bytes) -> dict[str, Any] | None:
    """Returns: the only statement of ``sql``, or None (several, none, or no parse)."""
    tree = _tree(sql)
    stmts = tree.get("stmts", []) if tree is not None else []
    return stmts[0].get("stmt", {}) if len(stmts) == 1 else None


def _may_end_transaction(sql: bytes) -> bool:
    tree = _tree(sql)
    if tree is None:
        return True  # cannot tell: assume it may (it only costs a round trip)
    return any(ends_transaction(item.get("stmt", {})) for item in tree.get("stmts", []))


def _may_change_catalog(sql: bytes) -> bool:
    tree = _tree(sql)
    if tree is None:
        return True  # cannot tell: assume it may (it only costs fresh Parses)
    return any(not _NOT_DDL.issuperset(item.get("stmt", {}))
               for item in tree.get("stmts", []))


def ends_transaction(stmt: dict[str, Any]) -> bool:
    """Returns: whether a parsed statement may end the transaction (COMMIT, ROLLBACK,
    PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED, a CALL whose procedure may commit, or an
    EXECUTE of a prepared statement, which may be any of those)."""
    txn = stmt.get("TransactionStmt")
    return ("CallStmt" in stmt or "ExecuteStmt" in stmt
            or (txn is not None and txn.get("kind") in _ENDING_KINDS))


def _may_copy_in(sql: bytes) -> bool:
    tree = _tree(sql)
    if tree is None:
        return True  # cannot tell: assume it may (it only costs a round trip)
    for item in tree.get("stmts", []):
        stmt = item.get("stmt", {})
        copy = stmt.get("CopyStmt")
        if "ExecuteStmt" in stmt or (copy is not None and copy.get("is_from")
                                     and not copy.get("filename")):
            return True
    return False


def is_on(value: str) -> bool:
    """Returns: whether a boolean setting's text means on."""
    return value.lower() in ("on", "true", "yes", "1")


def _leaves_session_state(sql: bytes) -> bool:
    tree = _tree(sql)
    if tree is None:
        return True  # cannot prove it harmless: treat as dirty (fail closed)
    try:
        return _walk(tree)
    except RecursionError:
        return True


# Statements that create a named object: one named in pg_temp (``CREATE TABLE pg_temp.t``,
# ``CREATE FUNCTION pg_temp.f``) is a temp object although relpersistence says 'p'.
_CREATING: Final = frozenset({"DefineStmt", "CompositeTypeStmt", "ViewStmt"})
_PG_TEMP_RE = re.compile(r"(?i)pg_temp(_\d+)?$")


def _drop_on_commit(node: dict[str, Any], rel_key: str, on_commit: str) -> dict[str, Any]:
    """``node`` without the relation it creates when that is an ``ON COMMIT DROP`` temp
    table (gone at the transaction's end, so not session state); else ``node``."""
    if node.get(on_commit) == "ONCOMMIT_DROP":
        return {k: v for k, v in node.items() if k != rel_key}
    return node


def _names_temp(node: Any) -> bool:
    """Whether a creating statement names the temp schema anywhere (as the schema of what
    it creates, or of a type it uses: either ties the new object to the session)."""
    if isinstance(node, list):
        return any(_names_temp(item) for item in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key in ("schemaname", "sval") and isinstance(value, str) \
                and _PG_TEMP_RE.match(value):
            return True
        if isinstance(value, (dict, list)) and _names_temp(value):
            return True
    return False


def _walk(node: Any) -> bool:
    if isinstance(node, list):
        return any(_walk(item) for item in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        # ON COMMIT DROP: the temp table ends with the transaction (the client expects no
        # more), so it neither pins nor closes the server; what else the statement holds is
        # still walked. The server's own report (the pgtenant_temp_objects notice, see
        # backend.py) still has the server's temp schema emptied before anyone reuses it.
        if key == "CreateStmt" and isinstance(value, dict):
            value = _drop_on_commit(value, "relation", "oncommit")
        elif key in ("into", "intoClause") and isinstance(value, dict):
            value = _drop_on_commit(value, "rel", "onCommit")
        if (key.startswith("Create") or key in _CREATING) and _names_temp(value):
            return True
        if key == "VariableSetStmt":
            # SET LOCAL and SET TRANSACTION end with the transaction; anything else stays.
            if not value.get("is_local") and value.get("name") != "TRANSACTION":
                return True
        elif key in ("ListenStmt", "PrepareStmt", "LoadStmt", "DoStmt", "CallStmt",
                     "ExecuteStmt"):
            return True
        elif key == "DeclareCursorStmt" and value.get("options", 0) & _CURSOR_OPT_HOLD:
            return True
        elif key == "relpersistence" and value == "t":  # temp table/view/sequence/SELECT INTO
            return True
        elif key == "FuncCall" and _session_func(value):
            return True
        if isinstance(value, (dict, list)) and _walk(value):
            return True
    return False


def _session_func(call: dict[str, Any]) -> bool:
    names = [part.get("String", {}).get("sval", "") for part in call.get("funcname", [])]
    name = names[-1].lower() if names else ""
    if name in _SESSION_LOCK_FUNCS:
        return True
    if name == "set_config":
        args = call.get("args", [])
        first = args[0] if args and isinstance(args[0], dict) else {}
        if str(first.get("A_Const", {}).get("sval", {}).get("sval", "")).lower() == (
                "client_encoding"):
            # The server session's, followed through its ParameterStatus like a SET of it
            # (settings.py): the proxy switches it back for the next client.
            return False
        is_local = args[2] if len(args) == 3 else None
        return not (isinstance(is_local, dict)
                    and is_local.get("A_Const", {}).get("boolval", {}).get("boolval") is True)
    return False


def pins_server(sql: bytes) -> bool:
    """Returns: whether running ``sql`` may leave session state the proxy cannot replay (so
    the server is pinned to its client): LISTEN, WITH HOLD, SQL PREPARE, session advisory
    locks, temp objects... Plain SETs are replayed instead and do not pin."""
    return bool(classify(sql) & SESSION_STATE) and not plain_sets(sql)


def plain_sets(sql: bytes) -> tuple[tuple[str, str | None], ...] | None:
    """The session settings a text makes, when it is a single plain ``SET``/``RESET``.

    Returns: ((name, value), ...) with value None for RESET/DEFAULT, or None when the text
    is anything else (or a value the proxy cannot replay, such as SET TIME ZONE INTERVAL).
    """
    if b"set" not in sql.lower():
        return None
    stmt = (_single_statement(sql) or {}).get("VariableSetStmt")
    if stmt is None or stmt.get("is_local") or not stmt.get("name"):
        return None
    name, kind = str(stmt["name"]), stmt.get("kind")
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return ((name, None),)
    if kind != "VAR_SET_VALUE":
        return None
    values = []
    for arg in stmt.get("args", []):
        const = arg.get("A_Const") if isinstance(arg, dict) else None
        if const is None:
            return None
        for key in ("sval", "ival", "fval", "boolval"):
            if key in const:
                values.append(str(const[key].get(key, "")).lower() if key == "boolval"
                              else str(const[key].get(key, 0 if key == "ival" else "")))
                break
        else:
            return None
    return ((name, ", ".join(values)),)


def local_command(sql: bytes) -> tuple[str, str | None] | None:
    """Recognise the session commands the proxy answers itself (protocol/local.py).

    Returns: ("deallocate", name), ("deallocate_all", None), ("discard_all", None),
    ("reset_all", None) or ("reset_search_path", tag) when the text is exactly one such
    statement (``tag``: "RESET", or "SET" for ``SET search_path TO DEFAULT``); None
    otherwise.
    """
    if not _LOCAL_RE.search(sql):
        return None
    stmt = _single_statement(sql)
    if stmt is None:
        return None
    if "DeallocateStmt" in stmt:
        dealloc = stmt["DeallocateStmt"]
        if dealloc.get("isall"):
            return ("deallocate_all", None)
        return ("deallocate", str(dealloc.get("name", "")))
    if stmt.get("DiscardStmt", {}).get("target") == "DISCARD_ALL":
        return ("discard_all", None)
    var = stmt.get("VariableSetStmt")
    if var is not None:
        kind = var.get("kind")
        if kind == "VAR_RESET_ALL":
            return ("reset_all", None)
        if str(var.get("name", "")).lower() == "search_path" and not var.get("is_local"):
            if kind == "VAR_RESET":
                return ("reset_search_path", "RESET")
            if kind == "VAR_SET_DEFAULT":
                return ("reset_search_path", "SET")
    return None


_LOCAL_RE = re.compile(rb"(?i)\b(deallocate|discard|reset|set)\b")
