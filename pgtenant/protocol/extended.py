"""Client -> server, extended protocol: one handler per message type (Parse, Bind,
Describe, Execute, Close, Flush), and the common batch decided in one pass.

``ExtendedMessages`` is the part of a client link (frontend.py's ``Frontend`` derives from it)
that these handlers need: the ledger, the statements, the settings, the guard. Each handler
records in the ledger what its message will earn, renames statements (prepared.py) and
rewrites what must not reach Postgres as sent. The framing, the segments and the flow state
(COPY, skip to Sync, HOLD) are frontend.py's. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from . import codec, frames, local, redirect
from .constants import (
    BIND,
    CLOSE,
    CLOSE_COMPLETE,
    DESCRIBE,
    EXECUTE,
    FLUSH,
    PARSE,
    TARGET_PORTAL,
    TARGET_STATEMENT,
    TXN_IDLE,
)
from .inject import CLOSE_UNNAMED_PORTAL, EXECUTE_UNNAMED
from .ledger import Ledger, Segment
from .prepared import UNKNOWN_TXN, PreparedStatements
from .pump import IDLE, NEED_SERVER, Pump
from .refusal import StatementPolicy, Verdict, check_statement_name, refused_parse
from .replay import LIMIT as REPLAY_LIMIT
from .replay import Replay
from .replies import (
    BIND_FWD,
    CLOSE_FWD,
    DESC_P_FWD,
    DESC_S_FWD,
    EXEC_FWD,
    PARSE_FWD,
    Expected,
    ReplyAction,
    ReplyKind,
    expected,
)
from .settings import SessionSettings
from .sql import DROPS_STATEMENTS, MAY_COPY_IN, SESSION_STATE, TXN_CONTROL, TXN_END, classify

if TYPE_CHECKING:
    from .listen import Listens

__all__ = ["DISPATCH", "ExtendedMessages", "Handler", "local_head"]

_unpack_i32 = frames.unpack_length
_pack_header = codec.HEADER.pack
_CLOSE_COMPLETE: Final = codec.frame(CLOSE_COMPLETE, b"")
_CLOSE_SYNTH: Final = Expected(ReplyKind.CLOSE, ReplyAction.SYNTH, _CLOSE_COMPLETE)


# The fixed frames of the common batch's tail: a Describe of portal "", an Execute of portal
# "" (its int32 row limit follows), and Sync.
_DESCRIBE_PORTAL: Final = codec.frame(DESCRIBE, bytes((TARGET_PORTAL, 0)))
_EXECUTE_HEAD: Final = codec.frame(EXECUTE, b"\x00\x00\x00\x00\x00")[:6]
_EXECUTE_SIZE: Final = 10
_SYNC_FRAME: Final = codec.sync()
_INJECTION_TAIL: Final = EXECUTE_UNNAMED + CLOSE_UNNAMED_PORTAL
# A Parse longer than this is not a session command local.py answers (frontend.py's
# _LOCAL_PARSE_MAX, the same bound).
LOCAL_PARSE_MAX: Final = 256


def local_head(buf: bytearray, pos: int, end: int) -> bool:
    """Whether the Parse frame at ``pos`` may hold a session command local.py answers: its
    text begins with one of ``local.FIRST_WORDS`` (the frontend then asks local.py)."""
    if not 5 < end - pos <= LOCAL_PARSE_MAX:
        return False
    head = bytes(buf[buf.find(0, pos + 5, end) + 1:end].lstrip()[:3]).lower()
    return head in local.FIRST_WORDS or head[:2] in local.FIRST_WORDS


class ExtendedMessages:
    """The state the extended-protocol handlers share with the rest of the client side."""

    __slots__ = ("attached", "cbuf", "client_pid", "ended_in_batch", "guard", "ledger",
                 "listens", "local_named", "max_message_size", "plain_text", "refused",
                 "replaying", "settings", "stmts")  # no __dict__ per client (issue 16)

    def __init__(self, ledger: Ledger, stmts: PreparedStatements, settings: SessionSettings,
                 max_message_size: int, guard: StatementPolicy | None):
        self.ledger = ledger
        self.stmts = stmts
        self.settings = settings
        self.max_message_size = max_message_size
        self.guard = guard  # statement policy (refusal.Verdict)
        self.refused = 0
        self.client_pid = 0  # the pid the client's BackendKeyData reported (its own)
        self.local_named: dict[bytes, bytes] = {}  # named statements local.py answers
        self.cbuf = bytearray()  # client bytes not yet handled
        self.attached = False
        self.plain_text = b""  # a plain Query's text, classified before NEED_SERVER
        self.ended_in_batch = False  # the open batch executed something that may end a txn
        self.replaying = False  # a healed batch (replay.py) is being re-sent: never healed twice
        self.listens: Listens | None = None  # LISTEN/NOTIFY (listen.py); None: refused

    def session_effects(self, seg: Segment, flags: int,
                         sets: tuple[tuple[str, str | None], ...]) -> None:
        """What running a statement with ``flags`` does to the server's session."""
        if flags & DROPS_STATEMENTS:
            self.stmts.statements_dropped()
            self.settings.session_dirty = True
        self.stmts.catalog_sent(seg, flags)  # DDL: statements parsed before may be stale
        if flags & SESSION_STATE:
            self.settings.session_dirty = True
            seg.sets += sets
            if not sets:
                # LISTEN, WITH HOLD cursors, session advisory locks, SQL PREPARE, temp
                # objects...: once it succeeded, the client keeps this server for the rest
                # of its session, as session mode would (plain SETs are replayed instead).
                seg.pins = True

    def rewritten(self, verdict: bytes | tuple[bytes, ...], out: bytearray | None = None,
                   name: bytes | None = None) -> bytes:
        """The text the guard rewrote, its holes filled (redirect.fill)."""
        if isinstance(verdict, bytes):
            return verdict
        return redirect.fill(verdict, self.stmts, self.client_pid, out, name)

    # ------------------------------------------------------------------ the common batch

    def one_batch(self) -> tuple[bytes, bytes, Pump] | None:
        """The common extended batch, decided in one pass (issue 16, lever 2).

        ``cbuf`` holds exactly one complete batch of the commonest shapes, with nothing in
        flight and no special state (the caller checked ``pending``, COPY, skip, open batch,
        replay, local names): Parse/Bind/[Describe]/Execute/Sync of the unnamed statement and
        portal (``pgbench -M extended``, libpq's PQexecParams, psycopg), or Bind/[Describe]/
        Execute/Sync of a client's named statement to the unnamed portal (``-M prepared``,
        PQexecPrepared). The batch gets the context (the server is outside a transaction
        block), the guard's verdict on the Parse text is None and the statement has no
        classify() flag: then every handler's rule reduces to what is done here, and the bytes
        sent and the ledger's entries are exactly the general path's (tests/unit/
        test_ext_fast_path.py holds both to it). Anything else returns None before any state
        changed, and the general path decides (the same, only slower).

        Returns: what ``Frontend.pump`` returns, or None to take the general path.
        """
        buf = self.cbuf
        n = len(buf)
        limit = self.max_message_size
        if n < 5:
            return None
        (length,) = _unpack_i32(buf, 1)
        first_end = 1 + length
        if length < 6 or length > limit or first_end > n:
            return None  # incomplete, or a bad length (the general path words the error)
        parse = buf[0] == PARSE
        if parse and local_head(buf, 0, first_end):
            return None  # may be a session command local.py answers
        if not self.attached:
            # What the general loop does with a first Parse/Bind that is no local command:
            # ask for a server. The batch is judged in the pass after attach.
            return b"", b"", NEED_SERVER
        sql: bytes | None = None
        types = b""
        bpos = 0
        if parse:
            bpos = first_end
            if buf[5] != 0:
                return None  # a named Parse
            q = buf.find(0, 6, bpos)
            if q < 0:
                return None
            sql = bytes(buf[6:q])
            types = bytes(buf[q + 1:bpos])
        if n - bpos < 5 or buf[bpos] != BIND:
            return None
        (length,) = _unpack_i32(buf, bpos + 1)
        bend = bpos + 1 + length
        if length < 6 or length > limit or bend > n or buf[bpos + 5] != 0:
            return None  # a named portal
        s = buf.find(0, bpos + 6, bend)
        if s < 0:
            return None
        stmt = bytes(buf[bpos + 6:s])
        if (sql is None) == (not stmt):
            return None  # Bind of "" without Parse (ensure_unnamed), or of another statement
        tail = bend
        described = buf.startswith(_DESCRIBE_PORTAL, tail)
        if described:
            tail += len(_DESCRIBE_PORTAL)
        if (n != tail + _EXECUTE_SIZE + len(_SYNC_FRAME) or not buf.startswith(_EXECUTE_HEAD, tail)
                or not buf.endswith(_SYNC_FRAME)):
            return None
        ledger = self.ledger
        settings = self.settings
        stmts = self.stmts
        if (ledger.status != TXN_IDLE or ledger.unsure or settings.reset_pending
                or settings.encoding != settings.server_encoding or stmts.deallocs):
            return None  # no context, a prelude, or an SQL DEALLOCATE: the general path
        mapped = None
        if sql is not None:
            if classify(sql):
                return None
            if self.guard is not None and self.guard(sql) is not None:
                return None  # refused or rewritten: the general path has the rules
        else:
            check_statement_name(stmt)
            mapped = stmts.client.get(stmt)
            if mapped is None or stmts.stmt_flags.get(stmt, UNKNOWN_TXN):
                return None
        # Decided: from here on, nothing returns None.
        out = bytearray()
        seg = stmts.ext_injection(out, settings.injection.ext_bind, _INJECTION_TAIL)
        seg.extended = True
        ledger.push(seg)
        expect = seg.expect
        assert expect is not None
        listens = self.listens
        stmts.portal_flags[b""] = 0
        if mapped is None:
            assert sql is not None
            expect.append(PARSE_FWD)
            stmts.parsed_unnamed(sql, types, seg)
            stmts.note_statement(b"", 0, ())
            if listens is not None:
                listens.parse(b"", sql, settings.encoding)  # (flag-less: nothing to rewrite)
                listens.bind(b"", b"")
            expect.append(BIND_FWD)
            out += buf
        else:
            if listens is not None:
                listens.bind(b"", stmt)
            global_name = stmts.use(out, mapped)
            out += _pack_header(BIND, 4 + 2 + len(global_name) + bend - s - 1)
            out += b"\x00"
            out += global_name
            out += buf[s:]  # the statement name's NUL, the parameters, and the rest
            entry = expected(ReplyKind.BIND, ReplyAction.FWD, global_name)  # its own: replay.py
            expect.append(entry)
            if described and n <= REPLAY_LIMIT:
                # What Replay.note makes of Bind, Describe, Execute of portal "" and Sync: the
                # whole batch, healable (its rows are described); an Execute not described
                # first (no Describe) makes none (replay.py).
                replay = Replay(entry, buf)
                replay.described.add(b"")
                replay.complete = True
                seg.replay = replay
        if described:
            expect.append(DESC_P_FWD)
        if listens is not None and listens.portal_ops:
            listens.execute(b"")
        expect.append(EXEC_FWD)
        seg.synced = True
        self.replaying = False
        self.ended_in_batch = False
        del buf[:]
        return bytes(out), b"", IDLE

    # ------------------------------------------------------------------ handlers

    def _parse(self, buf: bytearray, pos: int, end: int, span: int, out: bytearray,
               reply: bytearray, seg: Segment, fresh: bool) -> int:
        name, npos = codec.read_cstring(buf, pos + 5, limit=end)
        check_statement_name(name)
        if self.local_named:
            self.local_named.pop(name, None)  # the name now holds another statement
        sql, tpos = codec.read_cstring(buf, npos, limit=end)
        types = bytes(buf[tpos:end])
        rewritten = self.listens.parse(name, sql, self.settings.encoding) if self.listens else None
        if rewritten:  # NOTIFY rewritten, LISTEN a no-op (listen.py): it does what they do
            sql = rewritten
        text = sql
        verdict: Verdict = rewritten or (self.guard(sql) if self.guard is not None else None)
        if isinstance(verdict, str):
            self.refused += 1
            text, types = refused_parse(verdict, sql, types)
            sql = b""
        stmts = self.stmts
        text, flags = stmts.dealloc_text(name, sql, text, classify(sql))  # renamed DEALLOCATE
        if name:
            # Renamed to a proxy-global statement (prepared.py).
            out += buf[span:pos]
            span = end
            if verdict is not None and not isinstance(verdict, str):
                text = self.rewritten(verdict, out, name)  # (what it does: ``sql``'s)
            reply += stmts.parse_named(out, name, text, types)
        else:
            if verdict is not None or text is not sql:
                out += buf[span:pos]
                span = end
                if verdict is not None and not isinstance(verdict, str):
                    text = self.rewritten(verdict, out)  # (what it does: ``sql``'s)
                out += codec.frame(PARSE, b"\x00" + text + b"\x00" + types)
            self.ledger.expect(PARSE_FWD)
            stmts.parsed_unnamed(text, types, seg)
        # What the statement does is noted now and applied at each Bind: a named statement
        # may run again in later transactions, on other servers.
        sets = self.settings.replayable_sets(sql) if flags & SESSION_STATE else None
        stmts.note_statement(name, flags, sets or ())
        return span

    def _bind(self, buf: bytearray, pos: int, end: int, span: int, out: bytearray,
              reply: bytearray, seg: Segment, fresh: bool) -> int:
        stmts = self.stmts
        portal, npos = codec.read_cstring(buf, pos + 5, limit=end)
        stmt, rest = codec.read_cstring(buf, npos, limit=end)
        check_statement_name(stmt)
        flags = stmts.stmt_flags.get(stmt, UNKNOWN_TXN)
        stmts.portal_flags[portal] = flags & (TXN_CONTROL | TXN_END | MAY_COPY_IN)
        if self.listens is not None:
            self.listens.bind(portal, stmt)
        self.session_effects(seg, flags, stmts.stmt_sets.get(stmt, ()))
        mapped = stmts.client.get(stmt) if stmt else None
        if not stmt or stmts.deallocs:  # what the statement needs on the server first
            out += buf[span:pos]
            span = pos
            stmts.before_bind(out, stmt)
        if mapped is None:
            self.ledger.expect(BIND_FWD)
            return span
        out += buf[span:pos]
        global_name = stmts.use(out, mapped)
        out += codec.frame(BIND, portal + b"\x00" + global_name + b"\x00" + bytes(buf[rest:end]))
        entry = expected(ReplyKind.BIND, ReplyAction.FWD, global_name)  # its own: replay.py
        self.ledger.expect(entry)
        if fresh and end - pos <= REPLAY_LIMIT:
            seg.replay = Replay(entry, buf[pos:end])
        return end

    def _execute(self, buf: bytearray, pos: int, end: int, span: int, out: bytearray,
                 reply: bytearray, seg: Segment, fresh: bool) -> int:
        portal, _ = codec.read_cstring(buf, pos + 5, limit=end)
        flags = self.stmts.portal_flags.get(portal, UNKNOWN_TXN)
        if self.listens is not None and self.listens.portal_ops:
            self.listens.execute(portal)
        if flags:
            self.ledger.mark_txn(seg)
        if flags & MAY_COPY_IN:
            seg.may_copy = True
        if flags & TXN_END:
            self.ended_in_batch = True
        self.ledger.expect(EXEC_FWD)
        return span

    def _close_or_describe(self, buf: bytearray, pos: int, end: int, span: int,
                           out: bytearray, reply: bytearray, seg: Segment,
                           fresh: bool) -> int:
        t = buf[pos]
        stmts = self.stmts
        what = buf[pos + 5] if end - pos > 5 else 0
        name = b""
        if what == TARGET_STATEMENT:
            name, _ = codec.read_cstring(buf, pos + 6, limit=end)
            check_statement_name(name)
        mapped = stmts.client.get(name) if name else None
        if t == CLOSE and name:
            # Only the client's name goes away; the global statement stays on the server for
            # others. Postgres answers CloseComplete even for a name that does not exist, and
            # so do we.
            stmts.close(name)
            self.local_named.pop(name, None)
            out += buf[span:pos]
            reply += self.ledger.expect(_CLOSE_SYNTH)
            return end
        if t == CLOSE:
            self.ledger.expect(CLOSE_FWD)
        elif mapped is not None:
            out += buf[span:pos]
            global_name = stmts.use(out, mapped)
            out += codec.frame(DESCRIBE, bytes((TARGET_STATEMENT,)) + global_name + b"\x00")
            self.ledger.expect(DESC_S_FWD)
            return end
        elif what == TARGET_STATEMENT and not name:
            out += buf[span:pos]
            span = pos
            stmts.ensure_unnamed(out)
            self.ledger.expect(DESC_S_FWD)
        else:
            self.ledger.expect(DESC_S_FWD if what == TARGET_STATEMENT else DESC_P_FWD)
        return span

    def _flush(self, buf: bytearray, pos: int, end: int, span: int, out: bytearray,
               reply: bytearray, seg: Segment, fresh: bool) -> int:
        return span  # forwarded as it is: it asks the server for what it owes so far


# An extended-protocol message handler: (link side, buf, pos, end, span, out, reply, seg,
# fresh) -> the new start of the bytes not yet copied to ``out``.
Handler = Callable[[ExtendedMessages, bytearray, int, int, int, bytearray, bytearray, Segment,
                    bool], int]

# One handler per extended-protocol message type, for all links (bound per link: 700 bytes).
DISPATCH: Final[dict[int, Handler]] = {
    PARSE: ExtendedMessages._parse, BIND: ExtendedMessages._bind,
    EXECUTE: ExtendedMessages._execute, CLOSE: ExtendedMessages._close_or_describe,
    DESCRIBE: ExtendedMessages._close_or_describe, FLUSH: ExtendedMessages._flush}
