"""Client -> server: framing the client's bytes, opening segments, rewriting requests.

Owns the client's unhandled bytes (``cbuf``) and the client-side flow state: whether an
extended batch is open, a failed batch is being skipped to its Sync, the server is in COPY-in
mode, the pump is held, and how many statements were refused. It writes into the ledger
(ledger.py) what each request will earn, and asks prepared.py and settings.py to rename
statements and to note settings. It does not read server bytes (backend.py). No I/O.

Theory of operation
-------------------
Complete frames are cut from ``cbuf`` (``pump``). The first frame of a segment decides three
things (``_start_segment``):

* **server**: with no server attached, the pump stops with ``NEED_SERVER``; the caller
  attaches one and pumps again. Transaction mode: servers are taken per segment and given
  back when idle.
* **injection**: the context is injected iff the server is *known* to be outside a
  transaction block when the segment starts. That is the last ``Z`` status when nothing is
  in flight; with segments in flight it is still that status unless one of them may change
  the transaction state (BEGIN/COMMIT/... found in its SQL). Then the pump stops with
  ``HOLD`` until their replies are in: injecting into an aborted transaction would make the
  client's ROLLBACK fail, and not injecting into a fresh one would run without context.
* **what it owes**: a simple-Query segment drops its leading injected replies (``drop``); an
  extended segment keeps ``expect`` (ledger.py).

Within a segment the pump also rewrites what must not reach Postgres as sent: refused
statements become ``CALL pgtenant.refuse(...)``; named statements are renamed to global ones
(prepared.py); a batch that goes on after COMMIT is cut with a hidden Sync; DEALLOCATE/
DISCARD ALL of the client's own view are answered locally; plain SETs are noted and replayed
with every later context (settings.py); statements that leave session state pin the server
to the client once they succeeded. Extended-protocol messages are handled by one method per
message type of the ``ExtendedMessages`` base (extended.py, ``DISPATCH``), one table for all
links.

The server is the source of truth (issue #10); SQL text may only make the tracker more
careful: the context is skipped only on a status the server reported with nothing in flight
(``_inject_decision``). With segments in flight, one is injected when the last status was
idle and none in flight may change it (a closed set of statements, sql.py: TransactionStmt,
CALL, DO, EXECUTE, recognised by words with false positives only; a statement never seen
parsed counts as "may"), and waits (HOLD) otherwise: a wrong guess costs a pause or repeats
the same tenant's SET LOCALs, never a request without context. COPY-in mode is what the
server said (CopyInResponse, backend.py), not what the client sent: copy messages reach the
server only inside it, and the Syncs Postgres ignores there earn no segment.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..errors import ClientProtocolError
from . import codec, frames, local
from .constants import (
    BIND,
    CLOSE,
    COPY_DATA,
    COPY_DONE,
    COPY_FAIL,
    DESCRIBE,
    EXECUTE,
    FLUSH,
    FUNCTION_CALL,
    PARSE,
    QUERY,
    SYNC,
    TXN_IDLE,
)
from .constants import TERMINATE as TERMINATE_MESSAGE
from .extended import DISPATCH, ExtendedMessages
from .frames import MIN_LENGTH, FrameError, client_frame_error
from .inject import CLOSE_UNNAMED_PORTAL, EXECUTE_UNNAMED, Q_DROP
from .ledger import Ledger, Segment
from .local import WAIT
from .prepared import PreparedStatements
from .pump import HOLD, IDLE, NEED_SERVER, TERMINATE, Pump
from .refusal import FUNCTION_CALL_REFUSAL, StatementPolicy, refusal_sql
from .replies import QUERY_FWD
from .settings import SessionSettings
from .sql import (
    DROPS_STATEMENTS,
    MAY_COPY_IN,
    NOTIFIES,
    SESSION_STATE,
    TXN_CONTROL,
    TXN_END,
    classify,
    local_command,
)

if TYPE_CHECKING:
    from ..stats import LabelStats

__all__ = ["HOLD", "IDLE", "NEED_SERVER", "TERMINATE", "Frontend", "Pump"]


_unpack_i32 = frames.unpack_length
_frame_end = frames.frame_end
_pack_header = codec.HEADER.pack

_CLIENT_COPY: Final = frozenset((COPY_DATA, COPY_DONE, COPY_FAIL))  # only while copying in
_CLIENT_EXTENDED: Final = frozenset((PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, FLUSH))
# What a logged-in client may send.
_CLIENT_TYPES: Final = _CLIENT_EXTENDED | _CLIENT_COPY | frozenset(
    (QUERY, SYNC, TERMINATE_MESSAGE, FUNCTION_CALL))
_QUERY_BYTE: Final = bytes((QUERY,))
_SYNC_FRAME: Final = codec.sync()
_ROLLBACK: Final = re.compile(rb"(?i)\b(rollback|abort)\b")
# The reset of a server that changes tenant (ARCHITECTURE §5: a server changes tenant
# empty): settings, prepared statements (the proxy's too), portals, temp objects, sequence
# state, LISTEN, advisory locks. Sent in the same write as the new tenant's first request.
_DISCARD_ALL: Final = codec.query("DISCARD ALL")
_LOCAL_FLAGS: Final = DROPS_STATEMENTS | SESSION_STATE  # what local_command's texts are
# A Parse longer than this is not one of them (the longest: DEALLOCATE PREPARE of a quoted
# 63-byte name, with comments allowed for): not looked at, so other batches pay nothing.
_LOCAL_PARSE_MAX: Final = 256
_INJECTION_TAIL: Final = EXECUTE_UNNAMED + CLOSE_UNNAMED_PORTAL


class Frontend(ExtendedMessages):
    """The client side of a link: cuts the client's frames and sends them on, rewritten."""

    # issue 16: no __dict__ per client
    __slots__ = ("copy_in", "held", "open_extended", "outside_txn", "skip_to_sync", "stats")

    def __init__(self, ledger: Ledger, stmts: PreparedStatements, settings: SessionSettings,
                 max_message_size: int, guard: StatementPolicy | None,
                 outside_txn: Callable[[bytes], bool] | None):
        super().__init__(ledger, stmts, settings, max_message_size, guard)
        # Whether a refused statement may run outside a transaction block for this tenant.
        self.outside_txn = outside_txn
        # The client's (database, tenant type) counters (metrics.py), set by its owner.
        self.stats: LabelStats | None = None
        self.open_extended = False  # an extended batch was started and not yet synced
        self.held = False  # pump stopped with HOLD
        self.skip_to_sync = False  # a failed extended batch: discard until Sync, as Postgres does
        # The server is in COPY-in mode: from its CopyInResponse until the client's
        # CopyDone/CopyFail or the server's ErrorResponse (see Backend._copy_started).
        self.copy_in = False

    def attach(self) -> None:
        """A server was attached: it is idle, outside COPY, and owes nothing."""
        self.attached = True
        self.ended_in_batch = False
        self.copy_in = False

    # ------------------------------------------------------------------ segments

    def _inject_decision(self) -> bool | None:
        """Whether the next segment gets the context: True, False, or None to wait (HOLD).

        Skipping the context is decided only on a status the server reported with nothing
        in flight after it: with replies outstanding, a segment is injected when the last
        status was idle and nothing in flight may have opened a block (injecting into an
        open block would only repeat the same tenant's SET LOCALs), and waits otherwise.
        """
        ledger = self.ledger
        if ledger.unsure:
            return None
        if ledger.status == TXN_IDLE:
            return True
        return None if ledger.pending else False

    def _start_segment(self, out: bytearray) -> bool | None:
        """A segment starts on the attached server (``out`` holds everything before it).

        Returns: whether it gets the context, or None to wait (then ``held`` is set). An
        injected segment is preceded by the prelude (reset, encoding switch) when needed.
        """
        inject = self._inject_decision()
        if inject is None:
            self.held = True
            return None
        settings = self.settings
        if inject and (settings.reset_pending or settings.encoding != settings.server_encoding):
            self._prelude(out)
        return inject

    def _prelude(self, out: bytearray) -> None:
        """Before the first request of a transaction: empty a server that served another
        tenant (``attach(reset=True)``), then give its session the client's encoding."""
        settings = self.settings
        if settings.reset_pending:
            settings.reset_pending = False
            out += _DISCARD_ALL
            seg = Segment(1)  # CommandComplete; its ParameterStatus reports are ours too
            seg.hide_z = seg.ours = True
            self.ledger.push(seg)
            self.stmts.server_reset()
            settings.server_encoding = settings.reset_encoding
        if settings.encoding != settings.server_encoding:
            # In a hidden Query of its own (its replies are the proxy's).
            out += settings.encoding_switch()
            self.stmts.unnamed_here = False  # a simple Query destroys the unnamed statement
            seg = Segment(1)  # CommandComplete; the ParameterStatus is hidden too
            seg.hide_z = seg.ours = True
            self.ledger.push(seg)

    def _note_sql(self, seg: Segment, sql: bytes, flags: int | None = None) -> int:
        """A simple Query's text is about to run: note what it may do (``flags``: its
        classify() result when already known)."""
        if flags is None:
            flags = classify(sql)
        if flags & TXN_END and _ROLLBACK.search(sql):
            seg.rollback = True
        if flags & TXN_CONTROL:
            self.ledger.mark_txn(seg)
        if flags & MAY_COPY_IN:
            seg.may_copy = True
        sets = self.settings.replayable_sets(sql) if flags & SESSION_STATE else None
        self.session_effects(seg, flags, sets or ())
        return flags

    # ------------------------------------------------------------------ the pump

    def pump(self) -> tuple[bytes, bytes, Pump]:
        """Handle the complete client frames buffered in ``cbuf``.

        Returns: (bytes for the server, bytes for the client, outcome) where outcome is
        IDLE, NEED_SERVER, HOLD or TERMINATE. Unhandled bytes stay in ``cbuf``.
        Raises: ClientProtocolError / MessageTooLarge / UnsupportedProtocol.
        """
        buf = self.cbuf
        ledger = self.ledger
        pending = ledger.pending
        self.held = False
        if buf[:1] == _QUERY_BYTE and not (
                self.skip_to_sync or self.open_extended or ledger.unsure
                or self.ended_in_batch or self.copy_in
                or (pending and pending[-1].may_copy)):
            fast = self._one_plain_query()
            if fast is not None:
                return fast
        elif buf and (buf[0] == PARSE or buf[0] == BIND) and not (
                pending or self.skip_to_sync or self.open_extended or self.copy_in
                or self.replaying or self.local_named or self.ended_in_batch):
            # The common extended batch (extended.py): one pass, or None and the loop below.
            fast = self.one_batch()
            if fast is not None:
                return fast
        return self.pump_frames()

    def pump_frames(self) -> tuple[bytes, bytes, Pump]:
        """``pump`` without its fast paths: every frame through the general loop (the
        reference the fast paths are tested against, tests/unit/test_ext_fast_path.py).

        Returns / Raises: as ``pump``.
        """
        buf = self.cbuf
        ledger = self.ledger
        pending = ledger.pending
        n = len(buf)
        pos = 0
        span = 0
        out = bytearray()
        reply = bytearray()
        outcome: Pump = IDLE
        dispatch = DISPATCH
        limit = self.max_message_size
        while n - pos >= 1:
            t = buf[pos]
            if t not in _CLIENT_TYPES:
                # Judged on the first byte: a second StartupMessage (first byte 0) or garbage
                # must not make us wait for a "frame" of whatever length follows.
                raise ClientProtocolError(f"unexpected message type {chr(t)!r} from client")
            if n - pos < 5:
                break
            # frames.frame_end inline: a call per frame costs 3 % of a transaction here.
            (length,) = _unpack_i32(buf, pos + 1)
            if length < MIN_LENGTH or length > limit:
                raise client_frame_error(FrameError(length, limit, t))
            end = pos + 1 + length
            if end > n:
                break
            if self.skip_to_sync:
                # Postgres's error recovery: discard the rest of the failed batch until its
                # Sync, then report the transaction status (nothing is in flight here).
                out += buf[span:pos]
                span = end
                if t == SYNC:
                    self.skip_to_sync = False
                    status = bytes((ledger.status,)) if self.attached else b"I"
                    reply += codec.ready_for_query(status)
                elif t == TERMINATE_MESSAGE:
                    span = pos
                    outcome = TERMINATE
                    break
                pos = end
                continue
            # COPY from the client is driven by the server's word, not the client's: copy
            # messages go to the server only while it said it is copying in (CopyInResponse,
            # see Backend._copy_started); Sync and Flush then earn no reply, as Postgres
            # ignores them.
            if self.copy_in:
                if t in _CLIENT_COPY:
                    if t != COPY_DATA:
                        self.copy_in = False  # CopyDone/CopyFail ends COPY-in mode
                    pos = end
                    continue
                if t == SYNC or t == FLUSH:
                    out += buf[span:pos]
                    span = pos = end
                    continue
                if t != TERMINATE_MESSAGE:
                    raise ClientProtocolError(
                        f"unexpected message type {chr(t)!r} during COPY from stdin")
            elif pending and pending[-1].may_copy and (
                    t in _CLIENT_COPY or not self.open_extended):
                # The last request may start a COPY: wait for the server to say whether it
                # did, so that which of the following messages it ignores is known.
                outcome = HOLD
                self.held = True
                break
            elif t in _CLIENT_COPY:
                # Not copying: Postgres ignores stray copy messages, and they are not sent.
                out += buf[span:pos]
                span = pos = end
                continue
            text = bytes(buf[pos + 5 : end - 1]) if t == QUERY else b""  # without the NUL
            text_flags = classify(text) if t == QUERY else 0
            # local_command's words are flagged DROPS_STATEMENTS (DEALLOCATE, DISCARD) or
            # SESSION_STATE (RESET, SET); a lone LISTEN/UNLISTEN is answered too (listen.py).
            if t == QUERY and not self.open_extended and (
                    (text_flags & _LOCAL_FLAGS and local_command(text) is not None)
                    or (text_flags & NOTIFIES and self.listens is not None
                        and self.listens.is_listen(text))):
                if pending:  # decide (and answer) in order, after the replies owed
                    outcome = HOLD
                    self.held = True
                    break
                answer = self._answer_locally(text)
                if answer is not None:
                    out += buf[span:pos]
                    span = pos = end
                    reply += answer
                    if self.listens is not None and self.listens.waiting:
                        outcome = HOLD  # answered once the listener hears the channel
                        self.held = True
                        break
                    continue
            if (t == QUERY or t == FUNCTION_CALL) and not self.open_extended:
                if not self.attached:
                    outcome = NEED_SERVER
                    break
                out += buf[span:pos]
                span = pos
                inject = self._start_segment(out)
                if inject is None:
                    outcome = HOLD
                    break
                self._simple(buf, pos, end, out, t, text, text_flags, inject)
                span = pos = end
                continue
            if self.ended_in_batch and (t == QUERY or (t in _CLIENT_EXTENDED and t != FLUSH)):
                # The batch executed COMMIT/ROLLBACK/CALL and goes on: what follows would run
                # in a new transaction without the tenant's context. Close this part with a
                # Sync of our own (its ReadyForQuery is hidden) and judge the rest as a new
                # segment once the server has answered (HOLD); after an error the rest is
                # discarded up to the client's Sync, as Postgres itself would do.
                out += buf[span:pos]
                span = pos
                out += _SYNC_FRAME
                last = pending[-1]
                last.hide_z = True
                last.split = True
                last.replay = None
                ledger.mark_txn(last)
                self.open_extended = False
                self.ended_in_batch = False
                continue
            if t == QUERY:  # a Query inside an unsynced extended batch shares its ReadyForQuery
                self.open_extended = False
                self.stmts.unnamed_here = False
                seg = pending[-1]
                seg.replay = None
                reply += ledger.expect(QUERY_FWD)
                verdict = self.guard(text) if self.guard is not None else None
                if isinstance(verdict, str):
                    self.refused += 1
                    out += buf[span:pos]
                    out += codec.query(refusal_sql(verdict))
                    span = end
                else:
                    if verdict is not None:  # run the rewritten text instead
                        out += buf[span:pos]
                        out += codec.query(self.rewritten(verdict))
                        span = end
                    self._note_sql(seg, text, text_flags)
                ledger.mark_txn(seg)
                pos = end
                continue
            if ((t == PARSE or (t == BIND and self.local_named)) and not self.open_extended
                    and 5 < end - pos <= _LOCAL_PARSE_MAX and (t == BIND or (
                        head := bytes(buf[buf.find(0, pos + 5, end) + 1:end].lstrip()[:3]
                                      ).lower())
                        in local.FIRST_WORDS or head[:2] in local.FIRST_WORDS)):
                # A batch of a session command the proxy answers (local.py)?
                answered = local.batch_answer(
                    buf, pos, end, bool(pending), self.stmts, self.settings,
                    self.ledger.status if self.attached else TXN_IDLE, self.max_message_size,
                    self.local_named)
                if answered == WAIT:
                    break  # the rest of the batch decides: wait for its bytes
                if isinstance(answered, tuple):
                    if pending:  # answer in order, after the replies owed
                        outcome = HOLD
                        self.held = True
                        break
                    out += buf[span:pos]
                    span = pos = answered[0]
                    reply += answered[1]
                    continue
            handler = dispatch.get(t)
            if handler is not None:
                fresh = False
                if not self.open_extended:
                    if not self.attached:
                        if t == FLUSH:  # Flush with nothing in flight: nothing to do
                            out += buf[span:pos]
                            span = pos = end
                            continue
                        outcome = NEED_SERVER
                        break
                    out += buf[span:pos]
                    span = pos
                    inject = self._start_segment(out)
                    if inject is None:
                        outcome = HOLD
                        break
                    if inject:
                        seg = self.stmts.ext_injection(
                            out, self.settings.injection.ext_bind, _INJECTION_TAIL)
                    else:
                        seg = Segment(0)
                        seg.expect = deque()
                    seg.extended = True
                    ledger.push(seg)
                    self.open_extended = True
                    fresh = inject and not self.replaying
                    self.replaying = False
                seg = pending[-1]
                if seg.replay is not None and not seg.replay.note(t, buf[pos:end]):
                    seg.replay = None
                span = handler(self, buf, pos, end, span, out, reply, seg, fresh)
                pos = end
                continue
            if t == SYNC:
                self.ended_in_batch = False
                if self.open_extended:
                    self.open_extended = False
                    last = pending[-1]
                    last.synced = True
                    if last.replay is not None and not last.replay.note(t, buf[pos:end]):
                        last.replay = None
                elif self.attached:  # a bare Sync still earns a ReadyForQuery
                    ledger.push(Segment(0))
                else:  # no server, no transaction: answer it ourselves
                    out += buf[span:pos]
                    span = end
                    reply += codec.ready_for_query(b"I")
                pos = end
                continue
            if t == TERMINATE_MESSAGE:
                out += buf[span:pos]
                span = pos = end
                outcome = TERMINATE
                break
            raise ClientProtocolError(f"unexpected message type {chr(t)!r} from client")
        out += buf[span:pos]
        del buf[:pos]
        return bytes(out), bytes(reply), outcome

    def _simple(self, buf: bytearray, pos: int, end: int, out: bytearray, t: int,
                text: bytes, text_flags: int, inject: bool) -> None:
        """A Query or FunctionCall opens a segment of its own: refused, injected or
        forwarded as it is. Writes the frame (rewritten or not) into ``out``."""
        injection = self.settings.injection
        rewritten = b""  # NOTIFY c: to the tenant's channel, in the client's transaction
        if self.listens is not None:
            rewritten = self.listens.query(text, text_flags, self.settings.encoding)
        if t == FUNCTION_CALL:
            refusal: str | None = FUNCTION_CALL_REFUSAL
            if self.stats is not None:
                self.stats.function_calls_refused += 1
            body = b""
        else:
            verdict = self.guard(text) if self.guard is not None and not rewritten else None
            refusal = verdict if isinstance(verdict, str) else None
            rewritten = (self.rewritten(verdict) if verdict is not None
                         and not isinstance(verdict, str) else rewritten)
        if (refusal is not None and inject and t == QUERY and self.outside_txn is not None
                and self.outside_txn(text)):
            # Allowed for this tenant type (VACUUM, CREATE INDEX CONCURRENTLY...): set the
            # context for the session in a hidden Query of its own, send the statement bare,
            # and retire the server afterwards.
            out += codec.query(injection.q_session[:-1])
            self.stmts.unnamed_here = False  # a simple Query destroys the unnamed one
            hidden = Segment(Q_DROP)
            hidden.hide_z = True
            self.ledger.push(hidden)
            self.ledger.push(Segment(0))
            self.settings.session_dirty = True
            out += buf[pos:end]
            return
        if refusal is not None:
            # Postgres raises the refusal itself, so replies stay in order and an open
            # transaction block is aborted exactly as for any other error.
            self.refused += 1
            text = b""
            body = refusal_sql(refusal) + b"\x00"
        elif rewritten:
            body = rewritten + b"\x00"
        elif inject:
            body = bytes(buf[pos + 5 : end])
        self.stmts.unnamed_here = False  # a simple Query destroys the unnamed statement
        if inject:
            seg = Segment(injection.q_drop, injection.q_shift, True)
            out += _pack_header(QUERY, 4 + len(injection.q_prefix) + len(body))
            out += injection.q_prefix
            out += body
        elif refusal is not None or rewritten:
            seg = Segment(0)
            out += _pack_header(QUERY, 4 + len(body))
            out += body
        else:
            seg = Segment(0)
            out += buf[pos:end]  # forwarded unchanged
        self.ledger.push(seg)
        if text:
            self._note_sql(seg, text, text_flags)

    # ------------------------------------------------------------------ answered locally

    def _one_plain_query(self) -> tuple[bytes, bytes, Pump] | None:
        """The common case, decided without the general loop: ``cbuf`` is exactly one
        Query whose text has no flag (no transaction control, no session state), sent
        outside a transaction block. Returns: what ``pump`` returns, or None to take the
        general path (which then decides everything the same way, only slower)."""
        buf = self.cbuf
        n = len(buf)
        if n < 6 or buf[n - 1] != 0:
            return None
        (length,) = _unpack_i32(buf, 1)  # frames.frame_end inline (hot path)
        if (length + 1 != n or length > self.max_message_size
                or self.ledger.status != TXN_IDLE):
            return None  # a bad length included: the general path words the error
        text = bytes(buf[5 : n - 1])
        # The pass before a server was attached (NEED_SERVER) classified this same text.
        if text != self.plain_text and classify(text):
            return None
        if not self.attached:
            self.plain_text = text
            return b"", b"", NEED_SERVER
        self.plain_text = b""
        settings = self.settings
        if settings.encoding != settings.server_encoding or settings.reset_pending:
            return None
        if self.guard is not None and self.guard(text) is not None:
            return None  # refused: the general path has the rules (outside_txn...)
        injection = settings.injection
        del buf[:]
        self.stmts.unnamed_here = False  # a simple Query destroys the unnamed statement
        self.ledger.push(Segment(injection.q_drop, injection.q_shift, True))
        prefix = injection.q_prefix
        return (_pack_header(QUERY, 5 + len(prefix) + len(text)) + prefix + text + b"\x00",
                b"", IDLE)

    def _answer_locally(self, sql: bytes) -> bytes | None:
        """A session command the proxy answers itself (local.py), sent as a Query.

        Returns: the replies to send, or None to send ``sql`` on. Call it only when no reply
        is owed, so the answer is in order and the transaction status known.
        """
        command = local_command(sql)
        status = self.ledger.status if self.attached else TXN_IDLE
        if command is None and self.listens is not None:  # LISTEN/UNLISTEN (listen.py)
            return self.listens.answer(sql, status, self.settings.encoding)
        tag = local.answer(command, self.stmts, self.settings, status) if command else None
        if tag is None:
            return None
        if tag in ("DISCARD ALL", "DEALLOCATE ALL"):
            self.local_named.clear()
        if tag == "DISCARD ALL" and self.listens is not None:
            self.listens.close()  # DISCARD ALL includes UNLISTEN *
        return codec.command_complete(tag) + codec.ready_for_query(bytes((status,)))

    def fail_segment(self, error: bytes) -> bytes:
        """The segment at the head of ``cbuf`` cannot get a server: answer it with ``error``.

        A Query is consumed and answered with ``error`` + ReadyForQuery; an extended batch
        gets ``error`` now and its ReadyForQuery when its Sync arrives (Postgres's own
        error-recovery rule), so the client stays usable.

        Returns: bytes for the client.
        """
        assert not self.attached
        if len(self.cbuf) >= 5 and self.cbuf[0] == QUERY:
            try:  # the pump framed it already: this cannot fail
                end = _frame_end(self.cbuf, 0, self.max_message_size)
            except FrameError as exc:
                raise client_frame_error(exc) from None
            del self.cbuf[:end]
            return error + codec.ready_for_query(b"I")
        self.skip_to_sync = True
        return error

