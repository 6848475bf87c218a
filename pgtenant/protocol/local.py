"""Session commands the proxy answers itself, sent as a simple Query or an extended batch.

Owns which of the commands ``sql.local_command`` recognises the proxy answers without a
server, in which transaction states, what answering them changes in the client's view
(its statements, its replayed settings), and the replies of an extended batch answered
this way. It does not own the recognition of the text (sql.py) nor the framing of the
client's stream (frontend.py). No I/O.

Why answer them here: in transaction mode these commands are about the client's own view,
not the server's. ``DISCARD ALL`` and ``RESET ALL`` on a pooled server would also reset the
context pgtenant injected, and the client's settings live in the proxy (replayed with every
transaction); ``RESET search_path`` means "the tenant's own search_path", which is what
every transaction has. Answered here, the client sees what Postgres would answer, and the
server never runs a statement that would drop the tenant's context mid-transaction.

When: ``RESET search_path`` (or ``SET search_path TO DEFAULT``) and ``DEALLOCATE`` of the
client's statements outside a failed transaction (``_deallocate``); ``RESET ALL`` and
``DISCARD ALL`` outside a transaction block, as Postgres requires for DISCARD ALL. A session
that keeps its server for session state (a WITH HOLD cursor, a session temp table...) is not
answered for ``RESET ALL`` (its server's settings would stay), and its server is closed
after ``DISCARD ALL`` (its state goes with it). Anything else is sent on, and the statement
guard refuses the statements that would drop the context, with a message saying how to send
them.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from . import codec
from .constants import (
    BIND,
    DESCRIBE,
    EXECUTE,
    FLUSH,
    PARSE,
    SYNC,
    TARGET_STATEMENT,
    TXN_FAILED,
    TXN_IDLE,
)
from .prepared import PreparedStatements
from .settings import SessionSettings
from .sql import DROPS_STATEMENTS, SESSION_STATE, classify, local_command

__all__ = ["FIRST_WORDS", "WAIT", "Batch", "answer", "batch_answer", "batch_reply",
           "match_batch"]

WAIT: Final = -1  # match_batch: the batch is not all here yet
_PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
_BIND_COMPLETE: Final = b"2\x00\x00\x00\x04"
_NO_DATA: Final = b"n\x00\x00\x00\x04"
_NO_PARAMETERS: Final = b"t\x00\x00\x00\x06\x00\x00"
_NO_DESCRIBE, _DESCRIBE_PORTAL, _DESCRIBE_STATEMENT = 0, 1, 2
# How the texts local_command recognises begin (DEALLOCATE, DISCARD, RESET, SET), or a
# comment before them: every other batch (SELECT..., once per extended transaction) is let
# through by the frontend at the cost of a slice, before any call.
FIRST_WORDS: Final = frozenset({b"dea", b"dis", b"res", b"set", b"/*", b"--"})


def answer(command: tuple[str, str | None], stmts: PreparedStatements,
           settings: SessionSettings, status: int) -> str | None:
    """Answer ``command`` (``sql.local_command``'s) for a client whose transaction status
    is ``status``, applying it to the client's view.

    Returns: the CommandComplete tag, or None to send the text on (nothing was changed).
    """
    kind, arg = command
    if kind == "reset_search_path":
        return arg if status != TXN_FAILED else None
    if kind == "deallocate" or kind == "deallocate_all":
        return _deallocate(arg if kind == "deallocate" else None, stmts, settings, status)
    if status != TXN_IDLE:
        return None
    if kind == "reset_all":
        if settings.pinned:
            return None
        settings.discard_all()
        return "RESET"
    if kind == "discard_all":
        stmts.forget_all(portals=True)
        settings.discard_all()
        if settings.pinned:
            # The server's session state (cursors, temp tables...) is the client's to
            # discard: the server is closed at its release instead of being emptied here.
            settings.pinned = False
            settings.session_dirty = True
        return "DISCARD ALL"
    return None


def _deallocate(name: str | None, stmts: PreparedStatements, settings: SessionSettings,
                status: int) -> str | None:
    """DEALLOCATE [PREPARE] ``name`` (None: ALL). The server knows the client's renamed
    statements by their global names only: deallocating them concerns the client's view,
    inside a transaction block too (DEALLOCATE is not transactional; psycopg evicts and
    clears its statements mid-transaction). In a failed block Postgres refuses it: sent on,
    the server says so. A pinned session's server also holds SQL-PREPAREd statements, which
    DEALLOCATE ALL drops: sent on, and the client's view goes with them.

    Returns: the CommandComplete tag, or None to send the text on.
    """
    if status == TXN_FAILED:
        return None
    if name is not None:
        if not stmts.deallocate(name.encode()):
            return None  # an SQL PREPAREd name, or an unknown one: Postgres answers
        return "DEALLOCATE"
    stmts.forget_all(portals=False)
    return None if settings.pinned else "DEALLOCATE ALL"


class Batch(NamedTuple):
    """A batch ``match_batch`` recognised."""

    end: int  # after its Sync
    text: bytes  # the Parse's text (b"" for a Bind batch)
    describe: int  # what its Describe asks: _NO_DESCRIBE, _DESCRIBE_PORTAL, _STATEMENT
    prepared: bytes  # the statement name a prepare-only batch parses (else b"")
    bound: bytes  # the statement name a Bind batch runs (else b"")


def _cstring(buf: bytearray, at: int, end: int) -> tuple[bytes, int] | None:
    nul = buf.find(0, at, end)
    return (bytes(buf[at:nul]), nul + 1) if nul >= 0 else None


def match_batch(buf: bytearray, pos: int, limit: int) -> Batch | int | None:
    """At a Parse or Bind that starts an extended batch: is it one of the shapes clients
    send a session command in?

    * Parse (unnamed, no parameter types), Bind (unnamed portal of it, no parameters),
      optionally a Describe of either, Execute (unnamed portal), Sync: psycopg, PQexecParams;
    * Parse (named, no parameter types), optionally a Describe of it, Sync: PQprepare;
    * Bind (unnamed portal of a named statement, no parameters), optionally a Describe of
      the portal, Execute, Sync: PQexecPrepared.

    Returns: the Batch; WAIT when the bytes end before its Sync; None when it is anything
    else (a Flush, more messages, parameters...), which then goes the ordinary way.
    """
    n = len(buf)
    frames: list[tuple[int, int, int]] = []
    at = pos
    while len(frames) < 5:
        if n - at < 5:
            return WAIT
        length = int.from_bytes(buf[at + 1:at + 5], "big")
        if length < 4 or length > limit:
            return None  # the general path words the error
        if at + 1 + length > n:
            return WAIT
        t, end = buf[at], at + 1 + length
        frames.append((t, at, end))
        at = end
        if t == SYNC or t == FLUSH:
            break
    kinds = bytes(t for t, _, _ in frames)
    text = prepared = bound = b""
    describe = _NO_DESCRIBE
    for t, start, end in frames:
        if t == PARSE:
            name = _cstring(buf, start + 5, end)
            sql = _cstring(buf, name[1], end) if name is not None else None
            if name is None or sql is None or bytes(buf[sql[1]:end]) != b"\x00\x00":
                return None  # parameter types declared (or a bad frame)
            text, prepared = sql[0], name[0]
        elif t == BIND:
            portal = _cstring(buf, start + 5, end)
            stmt = _cstring(buf, portal[1], end) if portal is not None else None
            if portal is None or stmt is None or portal[0]:
                return None  # a named portal
            body = bytes(buf[stmt[1]:end])
            after = 2 + 2 * int.from_bytes(body[0:2], "big")
            if body[after:after + 2] != b"\x00\x00":
                return None  # parameter values
            bound = stmt[0]
        elif t == DESCRIBE:
            target = _cstring(buf, start + 6, end)
            if target is None:
                return None
            describe = _DESCRIBE_STATEMENT if buf[start + 5] == TARGET_STATEMENT else (
                _DESCRIBE_PORTAL)
            if target[0] != (prepared if describe == _DESCRIBE_STATEMENT else b""):
                return None
        elif t == EXECUTE and buf[start + 5] != 0:
            return None  # a named portal
    last = frames[-1][2]
    if kinds.replace(b"D", b"", 1) == b"PBES" and not prepared and not bound:
        return Batch(last, text, describe, b"", b"")
    if kinds in (b"PS", b"PDS") and prepared:
        return Batch(last, text, describe, prepared, b"")
    if kinds.replace(b"D", b"", 1) == b"BES" and bound and describe != _DESCRIBE_STATEMENT:
        return Batch(last, b"", describe, b"", bound)
    return None


def batch_reply(tag: str, batch: Batch, status: int) -> bytes:
    """Returns: the replies Postgres sends to ``batch`` running ``tag``'s command (or, for a
    prepare-only batch, parsing it)."""
    out = b"" if batch.bound else _PARSE_COMPLETE
    if not batch.prepared:
        out += _BIND_COMPLETE
    if batch.describe == _DESCRIBE_STATEMENT:
        out += _NO_PARAMETERS + _NO_DATA
    elif batch.describe == _DESCRIBE_PORTAL:
        out += _NO_DATA
    if not batch.prepared:
        out += codec.command_complete(tag)
    return out + codec.ready_for_query(bytes((status,)))


def batch_answer(buf: bytearray, pos: int, end: int, owed: bool, stmts: PreparedStatements,
                 settings: SessionSettings, status: int, limit: int,
                 named: dict[bytes, bytes]) -> tuple[int, bytes] | int | None:
    """At a Parse (ending at ``end``) or a Bind that starts a batch: the commands ``answer``
    takes, in one of the batch shapes of ``match_batch``. ``named``: the client's named
    statements holding such a command (prepared here, never on a server).

    Returns: (end of the batch, the replies to send), WAIT, or None (the ordinary way).
    With replies ``owed`` nothing is changed yet: a match is answered after them.
    """
    if buf[pos] == PARSE:
        name = _cstring(buf, pos + 5, end)
        sql = _cstring(buf, name[1], end) if name is not None else None
        text = sql[0] if sql is not None else b""
    else:
        portal = _cstring(buf, pos + 5, end)
        stmt = _cstring(buf, portal[1], end) if portal is not None else None
        text = named.get(stmt[0], b"") if stmt is not None else b""
    # (The frontend let a Parse through FIRST_WORDS already; a Bind's text is one of these.)
    command = (local_command(text) if classify(text) & (DROPS_STATEMENTS | SESSION_STATE)
               else None)
    if command is None:
        return None
    matched = match_batch(buf, pos, limit)
    if not isinstance(matched, Batch):
        return matched
    if owed:
        return matched.end, b""
    if matched.prepared:
        if status == TXN_FAILED:
            return None  # Postgres refuses the Parse: let it say so
        named[matched.prepared] = matched.text
        stmts.close(matched.prepared)  # the name no longer runs what it ran before
        return matched.end, batch_reply("", matched, status)
    tag = answer(command, stmts, settings, status)
    if tag is None:
        return None
    if not matched.bound:
        stmts.unnamed = None  # the client's unnamed statement is not on any server
    if tag in ("DISCARD ALL", "DEALLOCATE ALL"):
        named.clear()
    return matched.end, batch_reply(tag, matched, status)
