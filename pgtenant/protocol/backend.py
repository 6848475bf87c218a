"""Server -> client: matching every server frame against the ledger, forwarding in bulk.

Owns a FATAL the server sent unasked and the flag that a healed batch waits to be pumped
again; the stream position (a frame cut by a read) is the ledger's. Every frame is checked
against the ledger (ledger.py); ReadyForQuery settles the segment's settings (settings.py);
errors mark statements stale (prepared.py) and may heal a plan change (replay.py) by putting
the client's batch back in front of the client side's buffer (frontend.py). No I/O.

Theory of operation
-------------------
Frames are forwarded in contiguous spans; which types pass without a look depends on the
head segment (``Ledger.pass_``): everything but ``Z``/``E``/``S`` normally, rows and copy
data while a forwarded Execute runs, nothing while injected replies are owed. The rest go
through ``_ready`` (``Z``, the commonest) or ``_special``:

* ``Z`` closes the head segment, checks that it owed nothing more, records the status and
  emits the SYNTH replies whose turn has come.
* ``E`` ends what the segment owes (Postgres skips to the Sync); its position is shifted back
  by the simple-Query prefix length. A simple Query whose text held no statement gets the
  EmptyQueryResponse Postgres would have sent, since the prefix made it non-empty.
* ``S`` (ParameterStatus) for ``search_path`` and for settings the client manages is hidden.
* ``N``: the temp-object notice (``_temp_notice``) is swallowed and marks the server's temp
  schema for emptying; other notices pass.
* ``G``/``W``: the server entered COPY-in mode (``_copy_started``).

The injected context's replies are dropped with one comparison when they arrived whole:
``Injection.q_reply`` for the simple-query prefix, ``Injection.ext_reply`` for the extended
injection (``_injection_dropped``, which also forwards the client's Parse/BindComplete that
follow unlooked-at). A miss costs only the frame-by-frame path below.

Every reply is matched against what was sent (the server is the source of truth, issue #10):
a ReadyForQuery before what a segment owes, a frame with nothing outstanding, or a COPY the
model cannot place raise ServerProtocolError, and the owner closes that server and ends the
client. Injected replies never reach the client; SYNTH replies are emitted exactly when
everything before them has been answered.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

from ..errors import ServerProtocolError
from . import codec, frames
from .constants import (
    BIND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_IN_RESPONSE,
    ERROR_RESPONSE,
    FIELD_MESSAGE,
    FIELD_POSITION,
    FIELD_SEVERITY,
    FIELD_SEVERITY_NONLOCALIZED,
    FIELD_SQLSTATE,
    NOTICE_RESPONSE,
    NOTIFICATION_RESPONSE,
    PARAMETER_STATUS,
    PARSE_COMPLETE,
    READY_FOR_QUERY,
    TEMP_NOTICE,
    TXN_IDLE,
)
from .frames import MIN_LENGTH
from .ledger import (
    FWD,
    NOT_A_REPLY,
    SERVER_ASYNC,
    SYNTH,
    TERMINAL_OF,
    Expected,
    Ledger,
    ReplyKind,
    Segment,
)
from .listen import Listens
from .prepared import PreparedStatements
from .replies import BIND_DROP, CLOSE_DROP, EXEC_DROP
from .settings import SessionSettings

if TYPE_CHECKING:
    from ..stats import LabelStats, NotifyStats
    from .frontend import Frontend

__all__ = ["Backend"]

_unpack_i32 = frames.unpack_length
_PLAN_CHANGED: Final = b"0A000"  # feature_not_supported: "cached plan must not change ..."
_TEMP_NOTICE: Final = TEMP_NOTICE.encode()
_PARSE_COMPLETE: Final = codec.frame(PARSE_COMPLETE, b"")
_BIND_COMPLETE: Final = codec.frame(BIND_COMPLETE, b"")


class Backend:
    """The server side of a link: checks each reply, forwards the client's ones."""

    __slots__ = ("_replay_ready", "front", "ledger", "listens", "notify_stats", "settings",
                 "stats", "stmts", "unsolicited_fatal")  # no __dict__ per client (issue 16)

    def __init__(self, ledger: Ledger, stmts: PreparedStatements, settings: SessionSettings,
                 front: Frontend):
        self.ledger = ledger
        self.stmts = stmts
        self.settings = settings
        self.front = front  # its flow state (COPY, skip, held) follows the server's word
        self.stats: LabelStats | None = None
        # A FATAL the server sent while the client awaited nothing (pg_terminate_backend):
        # kept until the socket closes, so the client gets error and close together.
        self.unsolicited_fatal: bytes | None = None
        # A healed batch (replay.py) was put back at the head of cbuf: pump it again.
        self._replay_ready = False
        self.listens: Listens | None = None  # the client's LISTEN state (listen.py)
        self.notify_stats: NotifyStats | None = None  # the database's (notify.py)

    def feed(self, data: bytes) -> tuple[list[bytes | memoryview], bool]:
        """Handle bytes from the attached server.

        Returns: (chunks for the client, whether a held client segment may now proceed).
        Raises: ServerProtocolError when the server breaks the protocol.
        """
        ledger = self.ledger
        if ledger.leftover:
            data = ledger.leftover + data
            ledger.leftover = b""
        mv = memoryview(data)
        n = len(data)
        pos = 0
        chunks: list[bytes | memoryview] = []
        resume = False
        if ledger.remaining:
            take = min(ledger.remaining, n)
            ledger.remaining -= take
            pos = take
        span = 0
        head = ledger.pending[0] if ledger.pending else None
        injection = self.settings.injection
        if (head is not None and pos == 0 and head.drop == injection.q_drop
                and injection.q_reply and data.startswith(injection.q_reply)):
            # The common case of a simple-query prefix: its fixed replies all arrived, in one
            # piece and with nothing between them; dropped with one comparison.
            pos = span = len(injection.q_reply)
            head.drop = 0
            if n > pos and data[pos] not in NOT_A_REPLY:
                head.await_first = False  # the client's first reply is here already
            ledger.update_pass()
        elif (head is not None and pos == 0 and head.expect and head.expect[0] is BIND_DROP
                and injection.ext_reply and data.startswith(injection.ext_reply)):
            # The common case of an extended injection: its replies, fixed per context
            # (Injection.ext_reply), all arrived in one piece; dropped with one comparison.
            pos = self._injection_dropped(head, head.expect, data, len(injection.ext_reply))
            span = len(injection.ext_reply) if pos else 0
        front = self.front
        while n - pos >= 5:
            t = data[pos]
            # frames.frame_end inline (a call per frame costs 3 % of a transaction), with
            # NO_LIMIT: no int32 is above it, so only the minimum is checked. Before anything
            # else: a negative length would loop or walk back.
            (length,) = _unpack_i32(data, pos + 1)
            if length < MIN_LENGTH:
                raise ServerProtocolError(
                    f"invalid length {length} in {chr(t)!r} from server")
            end = pos + 1 + length
            if t in ledger.pass_:
                if end > n:
                    ledger.remaining = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                break
            if pos > span:
                chunks.append(mv[span:pos])
            span = end
            if t == READY_FOR_QUERY:  # the commonest frame that needs a look: one call
                replacement = self._ready(data, pos, end)
            else:
                replacement = self._special(t, data, pos, end)
            if replacement is not None:
                chunks.append(replacement)
            if t == COPY_IN_RESPONSE and front.held:
                resume = True  # a COPY started: held copy data may go now
            if t == READY_FOR_QUERY and (
                    (front.held and not ledger.unsure) or self._replay_ready):
                self._replay_ready = False
                resume = True
            pos = end
        if pos > span:
            chunks.append(mv[span:pos])
        if pos < n:
            ledger.leftover = bytes(data[pos:])
        return chunks, resume

    def _special(self, t: int, data: bytes, pos: int, end: int) -> bytes | memoryview | None:
        """One frame that needs a look. Returns: what to send the client for it, if anything."""
        ledger = self.ledger
        head = ledger.pending[0] if ledger.pending else None
        frame = memoryview(data)[pos:end]
        if t == NOTIFICATION_RESPONSE:
            # A pooled server listens to nothing the proxy asked for: a LISTEN the guard
            # could not see (in a function) must not reach a client. Dropped, counted.
            if self.notify_stats is not None:
                self.notify_stats.dropped_pooled += 1
            return None
        if t == NOTICE_RESPONSE and self._temp_notice(frame):
            return None
        if t == ERROR_RESPONSE:
            return self._error(head, frame)
        if t == PARAMETER_STATUS:
            name, value = codec.parse_parameter_status(bytes(frame[5:]))
            return frame if self.settings.reported(name, value, head) else None
        if t == COPY_IN_RESPONSE or t == COPY_BOTH_RESPONSE:
            self._copy_started(head)
            return frame
        # Slow path for ordinary frames: the head segment is dropping or awaiting a reply.
        if head is None:
            if t in SERVER_ASYNC:
                return frame  # a notice between requests
            raise ServerProtocolError(f"message {chr(t)!r} with no request outstanding")
        if head.expect is not None:
            return self._expected(head.expect, t, frame)
        if head.drop:
            if t in SERVER_ASYNC:
                return None
            head.drop -= 1
            ledger.update_pass()
            return None
        if t not in SERVER_ASYNC:
            head.await_first = False
            ledger.update_pass()
        return frame

    def _temp_notice(self, frame: memoryview) -> bool:
        """Whether a NoticeResponse is the database's report that a command created a
        temporary object (constants.TEMP_NOTICE). Then the session's temp schema must be
        emptied before the server serves anyone else (``temp_made``); the notice is the
        proxy's, not the client's. A forged one only costs that reset; a suppressed one
        cannot happen: the event trigger's function sets its own client_min_messages."""
        body = bytes(frame[5:])
        if _TEMP_NOTICE not in body:
            return False
        if dict(codec.parse_error_fields(body)).get(FIELD_MESSAGE) != _TEMP_NOTICE:
            return False
        self.settings.temp_made = True
        return True

    def _ready(self, data: bytes, pos: int, end: int) -> bytes | memoryview | None:
        """A ReadyForQuery closes the head segment. Returns: what the client gets for it."""
        ledger = self.ledger
        if not ledger.pending:
            raise ServerProtocolError("ReadyForQuery with no request outstanding")
        if end - pos != 6:
            raise ServerProtocolError("malformed ReadyForQuery")
        head = ledger.pending[0]
        status = data[pos + 5]
        if not head.failed and (head.drop or (head.expect and any(
                e.action != SYNTH and e.kind != ReplyKind.QUERY for e in head.expect))):
            # Postgres answers every request of a segment before its ReadyForQuery, unless
            # one failed: the model and the server disagree (ARCHITECTURE §5).
            unanswered = [int(e.kind) for e in head.expect or ()
                          if e.action != SYNTH and e.kind != ReplyKind.QUERY]
            raise ServerProtocolError(
                f"ReadyForQuery before the replies pgtenant expected ({head.drop} "
                f"injected, requests {unanswered} unanswered)")
        front = self.front
        front.copy_in = False
        ledger.pending.popleft()
        if head.txn_control:
            ledger.unsure -= 1
        ledger.status = status
        if head.catalog or self.stmts.catalog_txn:  # DDL: statement copies may be stale
            self.stmts.catalog_settled(head.catalog, status)
        self.settings.settle(head, status)
        listens = self.listens
        if listens is not None:
            listens.settle(head, status)
        ledger.update_pass()
        # Replies the proxy owes itself (CloseComplete for a client's Close just before the
        # Sync): their turn has come.
        owed = b"".join(e.data for e in head.expect
                        if e.action == SYNTH and e.data is not None) if head.expect else b""
        if not head.hide_z and self.stats is not None:
            self.stats.queries += 1
            self.stats.query_seconds.observe(ledger.clock() - head.t0)
        if head.hide_z:  # our own request's answer; the client's goes on
            if head.heal:  # the client's batch goes again, in front of anything newer
                assert head.replay is not None
                front.cbuf[:0] = head.replay.data
                front.replaying = self._replay_ready = True
                return None
            if head.failed and head.split:
                front.skip_to_sync = True  # the rest of the client's batch must not run
            return owed or None
        frame = memoryview(data)[pos:end]
        if not owed and head.await_first and head.drop == 0:
            owed = codec.empty_query_response()
        if listens is not None and status == TXN_IDLE:
            if listens.queue:
                # Between transactions, before the ReadyForQuery: where Postgres sends them.
                owed += listens.flush()
            if listens.waiting and not ledger.pending:
                # Its LISTEN took effect: the client hears of it once the listener hears
                # the channel (session.py sends ``deferred``); nothing else is in flight.
                listens.deferred += owed + bytes(frame)
                return None
        if owed:
            return owed + bytes(frame)
        return frame

    def _error(self, head: Segment | None, frame: memoryview) -> bytes | memoryview | None:
        """An ErrorResponse. Returns: what the client gets for it."""
        if head is None and _is_fatal(frame):
            self.unsolicited_fatal = bytes(frame)
            return None
        code = _error_code(frame)
        if self.stats is not None:
            self.stats.error(code.decode("ascii", "replace"))
        if head is None:
            raise ServerProtocolError("ErrorResponse with no request outstanding")
        if head.ours:
            # The proxy's own reset or encoding switch failed: the session is not known to be
            # empty (or in the client's encoding), so nobody may use it.
            raise ServerProtocolError("pgtenant's reset of the server session failed: "
                                      + _error_message(frame))
        self.front.copy_in = False  # an error ends COPY-in mode; later copy messages are stray
        head.failed = True
        if head.expect is not None:
            entry = head.expect[0] if head.expect else None
            if entry is not None and entry.kind == ReplyKind.BIND and entry.data is not None:
                # A Bind of a renamed statement failed: when the error says its copy went
                # stale (after DDL, "cached plan must not change result type", "cache lookup
                # failed for type"...), the next Parse or Bind prepares it again, on every
                # server (prepared.py, freshness.py).
                self.stmts.bind_failed(entry.data, code)
            if (entry is not None and entry.kind == ReplyKind.BIND and entry.data is not None
                    and code == _PLAN_CHANGED):
                replay = head.replay
                if (replay is not None and replay.entry is entry and replay.complete
                        and len(self.ledger.pending) == 1):
                    # Provably harmless to retry (replay.py): hide the error, and hold newer
                    # client requests until the batch went again.
                    head.heal = head.hide_z = True
                    self.ledger.mark_txn(head)
                # Otherwise the client sees the error and re-prepares (asyncpg and pgjdbc do
                # it by themselves): its Parse must then really re-parse.
        # Postgres now skips the batch up to its Sync: what was not answered yet never ran
        # (prepared.py marks what it may have lost, the unnamed statement included).
        self.stmts.batch_failed(head)
        if head.expect is not None:
            head.expect.clear()
        head.drop = 0
        head.await_first = False
        self.ledger.update_pass()
        if head.heal:
            return None
        if head.shift:
            return _shift_error(bytes(frame[5:]), head.shift)
        return frame

    def _copy_started(self, head: Segment | None) -> None:
        """The server entered COPY-in mode (CopyInResponse): until CopyDone/CopyFail it
        ignores Sync and Flush, and ends the COPY with an error at any other message.

        A request that may start a COPY holds what the client sends after it (the frontend's
        pump), so the COPY's segment is the only one in flight and its own Sync, if the client
        sent it before the copy data (libpq does), is the only Sync the server ignores: that
        segment is open again and the Sync after CopyDone closes it.

        Raises: ServerProtocolError when the COPY is not where the model can account for
        it (more requests in flight, or a request not known to possibly start a COPY).
        """
        if (head is None or len(self.ledger.pending) > 1
                or (head.extended and head.expect is None)):
            raise ServerProtocolError("COPY started where pgtenant did not expect one")
        self.front.copy_in = True
        if head.extended and head.synced and head.expect is not None:
            later = list(head.expect)[1:]  # after the Execute that started it
            if not any(e.action != SYNTH for e in later):
                head.synced = False
                self.front.open_extended = True

    def _expected(self, expect: deque[Expected], t: int,
                  frame: memoryview) -> bytes | memoryview | None:
        """One reply of an extended segment, matched against the request it answers."""
        entry = expect[0] if expect else None
        if entry is None:  # nothing owed (a Flush-less oddity): the client's, then
            return frame
        forward = entry.action == FWD
        if t in SERVER_ASYNC:
            return frame if forward else None
        if t not in TERMINAL_OF[entry.kind]:
            return frame if forward else None
        expect.popleft()
        owed = b""
        while expect and expect[0].action == SYNTH:
            owed += expect.popleft().data or b""
        if not forward and expect and expect[0].action == FWD:  # the proxy's part is over
            self._forward_rest(expect)
        self.ledger.update_pass()
        if owed:
            return (bytes(frame) if forward else b"") + owed
        return frame if forward else None

    def _injection_dropped(self, head: Segment, expect: deque[Expected], data: bytes,
                           pos: int) -> int:
        """The extended injection's replies (``_INJECTED``: Bind, Execute, Close, all DROP)
        are the first ``pos`` bytes of ``data``: they are dropped. The client's own
        ParseComplete and BindComplete that follow are forwarded as they are, without a
        look each (an answered Bind cannot fail any more: no replay, no stale mark), and the
        rest of a synced batch is passed through (``_forward_rest``).

        Returns: where the frames still to be looked at start (those before are forwarded).
        A SYNTH reply right behind the injection (the general path emits it there) or
        anything unexpected: nothing is done and 0 is returned, so the loop matches all.
        """
        if (len(expect) < 3 or expect[1] is not EXEC_DROP or expect[2] is not CLOSE_DROP
                or (len(expect) > 3 and expect[3].action == SYNTH)):
            return 0
        expect.popleft()
        expect.popleft()
        expect.popleft()
        n = len(data)
        while len(expect) > 1 and n - pos >= 5:
            entry = expect[0]
            if entry.action != FWD or expect[1].action == SYNTH:
                break  # the proxy's own, or a SYNTH reply due right after it
            if entry.kind == ReplyKind.PARSE:
                frame = _PARSE_COMPLETE
            elif entry.kind == ReplyKind.BIND:
                frame = _BIND_COMPLETE
            else:
                break
            if not data.startswith(frame, pos):
                break
            expect.popleft()
            pos += 5
            if head.replay is not None and head.replay.entry is entry:
                head.replay = None  # only a failed Bind of this entry could be healed
        if expect and expect[0].action == FWD:
            self._forward_rest(expect)
        self.ledger.update_pass()
        return pos

    def _forward_rest(self, expect: deque[Expected]) -> None:
        """After the proxy's own replies of a synced batch: when everything still owed is
        forwarded as it comes and names no statement of ours, stop matching replies one by
        one (``expect = None``: only ReadyForQuery, errors and ParameterStatus get a look).

        Entries naming a statement (``data``) stay matched: an error must mark the statement
        stale or heal a plan change (replay.py), and that needs to know which request
        failed. A batch still open (no Sync yet) may get more requests, so it stays too.
        """
        head = self.ledger.pending[0]
        if (head.expect is expect and head.synced and head.replay is None
                and not head.may_copy
                and all(e.action == FWD and e.data is None for e in expect)):
            head.expect = None


def _error_code(frame: memoryview) -> bytes:
    return dict(codec.parse_error_fields(bytes(frame[5:]))).get(FIELD_SQLSTATE, b"")


def _error_message(frame: memoryview) -> str:
    fields = dict(codec.parse_error_fields(bytes(frame[5:])))
    return fields.get(FIELD_MESSAGE, b"").decode("utf-8", "replace")


def _is_fatal(frame: memoryview) -> bool:
    fields = dict(codec.parse_error_fields(bytes(frame[5:])))
    severity = fields.get(FIELD_SEVERITY_NONLOCALIZED, fields.get(FIELD_SEVERITY, b""))
    return severity in (b"FATAL", b"PANIC")


def _shift_error(body: bytes, shift: int) -> bytes:
    """The client's error position: ``shift`` characters of injected prefix removed."""
    fields = codec.parse_error_fields(body)
    out: list[tuple[int, bytes]] = []
    for code, value in fields:
        if code == FIELD_POSITION:
            try:
                position = int(value) - shift
            except ValueError:
                continue
            if position < 1:
                continue  # inside the injected prefix: the client has no such position
            value = str(position).encode()
        out.append((code, value))
    return codec.frame(ERROR_RESPONSE, codec.encode_error_fields(out))
