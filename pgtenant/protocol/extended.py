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

from . import codec, redirect
from .constants import (
    BIND,
    CLOSE,
    CLOSE_COMPLETE,
    DESCRIBE,
    EXECUTE,
    FLUSH,
    PARSE,
    TARGET_STATEMENT,
)
from .ledger import Ledger, Segment
from .prepared import UNKNOWN_TXN, PreparedStatements
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

__all__ = ["DISPATCH", "ExtendedMessages", "Handler"]

_CLOSE_COMPLETE: Final = codec.frame(CLOSE_COMPLETE, b"")
_CLOSE_SYNTH: Final = Expected(ReplyKind.CLOSE, ReplyAction.SYNTH, _CLOSE_COMPLETE)


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
        self.plain_text = b""  # a text classify() found flag-less, before NEED_SERVER
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
