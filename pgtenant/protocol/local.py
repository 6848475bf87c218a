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

from typing import Final

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

__all__ = ["WAIT", "answer", "batch_answer", "batch_reply", "match_batch"]

WAIT: Final = -1  # match_batch: the batch is not all here yet
_PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
_BIND_COMPLETE: Final = b"2\x00\x00\x00\x04"
_NO_DATA: Final = b"n\x00\x00\x00\x04"
_NO_PARAMETERS: Final = b"t\x00\x00\x00\x06\x00\x00"
_NO_DESCRIBE, _DESCRIBE_PORTAL, _DESCRIBE_STATEMENT = 0, 1, 2


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


def match_batch(buf: bytearray, pos: int, limit: int) -> tuple[int, bytes, int] | int | None:
    """At a Parse that starts an extended batch: is the batch exactly Parse (unnamed, no
    parameter types), Bind (unnamed portal of the unnamed statement, no parameters),
    optionally a Describe of either, Execute (unnamed portal), Sync?

    Returns: (end of the Sync, the statement text, what was described) when it is; WAIT
    when the bytes end before its Sync; None when it is anything else (a Flush, more
    messages, parameters...), which then goes the ordinary way.
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
    kinds = [t for t, _, _ in frames]
    describe = _NO_DESCRIBE
    if kinds == [PARSE, BIND, DESCRIBE, EXECUTE, SYNC]:
        d_at, d_end = frames[2][1], frames[2][2]
        if bytes(buf[d_at + 6:d_end]) != b"\x00":
            return None
        describe = _DESCRIBE_STATEMENT if buf[d_at + 5] == TARGET_STATEMENT else (
            _DESCRIBE_PORTAL)
    elif kinds != [PARSE, BIND, EXECUTE, SYNC]:
        return None
    p_at, p_end = frames[0][1], frames[0][2]
    text_end = buf.index(0, p_at + 6, p_end)  # the name is empty (checked by the caller)
    if bytes(buf[text_end + 1:p_end]) != b"\x00\x00":
        return None  # parameter types declared
    b_at, b_end = frames[1][1], frames[1][2]
    body = bytes(buf[b_at + 5:b_end])
    if not body.startswith(b"\x00\x00"):
        return None  # a named portal or statement
    formats = int.from_bytes(body[2:4], "big")
    after = 4 + 2 * formats
    if body[after:after + 2] != b"\x00\x00":
        return None  # parameter values
    if buf[frames[-2][1] + 5] != 0:
        return None  # a named portal
    return frames[-1][2], bytes(buf[p_at + 6:text_end]), describe


def batch_reply(tag: str, describe: int, status: int) -> bytes:
    """Returns: the replies Postgres sends to a matched batch running ``tag``'s command."""
    out = _PARSE_COMPLETE + _BIND_COMPLETE
    if describe == _DESCRIBE_STATEMENT:
        out += _NO_PARAMETERS + _NO_DATA
    elif describe == _DESCRIBE_PORTAL:
        out += _NO_DATA
    return out + codec.command_complete(tag) + codec.ready_for_query(bytes((status,)))


def batch_answer(buf: bytearray, pos: int, end: int, owed: bool, stmts: PreparedStatements,
                 settings: SessionSettings, status: int,
                 limit: int) -> tuple[int, bytes] | int | None:
    """At a Parse of the unnamed statement ending at ``end`` that starts a batch: the
    commands ``answer`` takes, sent as Parse/Bind/[Describe]/Execute/Sync.

    Returns: (end of the batch, the replies to send), WAIT, or None (the ordinary way).
    With replies ``owed`` nothing is changed yet: a match is answered after them.
    """
    nul = buf.find(0, pos + 6, end)
    text = bytes(buf[pos + 6:nul]) if nul > 0 else b""
    if not classify(text) & (DROPS_STATEMENTS | SESSION_STATE) or local_command(text) is None:
        return None
    matched = match_batch(buf, pos, limit)
    if not isinstance(matched, tuple):
        return matched
    if owed:
        return matched[0], b""
    batch_end, text, describe = matched
    command = local_command(text)
    tag = answer(command, stmts, settings, status) if command else None
    if tag is None:
        return None
    stmts.unnamed = None  # the client's unnamed statement is not on any server
    return batch_end, batch_reply(tag, describe, status)
