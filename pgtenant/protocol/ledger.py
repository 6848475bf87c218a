"""The replies-owed ledger: what the attached server still owes, request by request.

Owns the in-flight model of the server (``Ledger``): the segments sent and not yet closed by
a ReadyForQuery, the transaction status the server last reported, how many segments in flight
may change it, which frame types may pass without a look, and where the server's byte stream
stands (a frame cut by a read). It does not own what the
requests were made of (prepared.py, settings.py) nor the byte framing (frontend.py,
backend.py). No I/O.

Theory of operation
-------------------
A *segment* (``Segment``) is one request the backend closes with exactly one ReadyForQuery: a
simple ``Query``, or a run of extended-protocol messages closed by ``Sync``. Segments are
answered in the order they were sent, so ``Ledger.pending`` is a FIFO: the client side
appends (``push``), each ``Z`` pops the head, and the head describes the frames arriving now.

An extended segment keeps ``expect``, one ``Expected`` per request in reply order (as PgDog's
``ProtocolState`` keeps one ``ExecutionItem`` per request, pgdog/src/backend/protocol/
state.rs). Its ``action`` says whose reply it is:

* ``FWD``: the client asked for it; forward it.
* ``DROP``: the proxy asked for it (the context injection, a quiet re-Parse, an LRU Close);
  the client must never see it.
* ``SYNTH``: nothing comes from the server; the proxy answers with ``data`` (ParseComplete
  for a statement already on the server, CloseComplete for a client's Close) exactly when
  everything before it has been answered.

Each kind of request ends with one terminal reply (``TERMINAL_OF``): until it arrives, the
frames in between (rows, descriptions) belong to that request. A simple-Query segment owes
``drop`` leading injected replies instead of an ``expect`` queue.

Invariants: ``unsure`` is the number of pending segments with ``txn_control`` set; ``pass_``
always matches the head of ``pending`` (``update_pass`` after every change of the head); an
``Expected`` is immutable, so the constant entries below are shared by every segment.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .constants import (
    COPY_BOTH_RESPONSE,
    COPY_DATA,
    COPY_DONE,
    COPY_IN_RESPONSE,
    COPY_OUT_RESPONSE,
    DATA_ROW,
    ERROR_RESPONSE,
    NOTICE_RESPONSE,
    NOTIFICATION_RESPONSE,
    PARAMETER_STATUS,
    READY_FOR_QUERY,
    TXN_IDLE,
)
from .replies import (
    DROP,
    FWD,
    SYNTH,
    TERMINAL_OF,
    Expected,
    ReplyAction,
    ReplyKind,
    expected,
)

if TYPE_CHECKING:
    from .replay import Replay

_EXECUTE: Final = ReplyKind.EXECUTE  # module-level aliases for the hot path (Rule 9)
_QUERY: Final = ReplyKind.QUERY

__all__ = [
    "DROP",
    "FWD",
    "NO_SEGMENTS",
    "PASS_ALL",
    "PASS_EXEC",
    "PASS_NONE",
    "SERVER_ASYNC",
    "SYNTH",
    "TERMINAL_OF",
    "Expected",
    "Ledger",
    "ReplyAction",
    "ReplyKind",
    "Segment",
    "expected",
]


# Backend frames that always need a look: ReadyForQuery, ErrorResponse, ParameterStatus,
# CopyInResponse/CopyBothResponse (the server then ignores Syncs: see
# Backend._copy_started), NotificationResponse (a pooled server's never reach a client:
# the proxy's own listener delivers them, see notify.py) and NoticeResponse (the temp-object
# notice must never slip past with a run of rows: see Backend._temp_notice).
_SERVER_SPECIAL: Final = frozenset((READY_FOR_QUERY, ERROR_RESPONSE, PARAMETER_STATUS,
                                     COPY_IN_RESPONSE, COPY_BOTH_RESPONSE,
                                     NOTIFICATION_RESPONSE, NOTICE_RESPONSE))
# Frames that are neither counted nor dropped while dropping injected replies.
SERVER_ASYNC: Final = frozenset((NOTICE_RESPONSE, PARAMETER_STATUS, NOTIFICATION_RESPONSE))
NOT_A_REPLY: Final = frozenset((READY_FOR_QUERY, ERROR_RESPONSE, PARAMETER_STATUS)) | SERVER_ASYNC
# Frame types forwarded without a look, by state of the head segment.
PASS_ALL: Final = frozenset(range(256)) - _SERVER_SPECIAL
# Rows and copy-out data of a forwarded Execute (notices and notifications need a look).
PASS_EXEC: Final = frozenset((DATA_ROW, COPY_DATA, COPY_DONE, COPY_OUT_RESPONSE))
PASS_NONE: Final[frozenset[int]] = frozenset()


class Segment:
    """One request the server will close with one ReadyForQuery."""

    __slots__ = ("await_first", "catalog", "drop", "expect", "extended", "failed", "heal",
                 "hide_z", "may_copy", "ours", "pins", "replay", "rollback", "sets", "shift",
                 "split", "synced", "t0", "txn_control", "unnamed_parse")

    def __init__(self, drop: int, shift: int = 0, await_first: bool = False):
        self.drop = drop  # leading injected replies still to drop
        self.shift = shift  # ErrorResponse position shift (simple-query prefix length)
        self.await_first = await_first  # injected Query: no client reply seen yet
        self.txn_control = False
        self.hide_z = False  # closed by a Sync the proxy inserted: its Z is not the client's
        self.ours = False  # a request of the proxy's own: no reply of it is the client's
        self.failed = False  # an ErrorResponse arrived for it
        self.split = False  # the first part of a client batch cut at a transaction end
        self.extended = False  # opened by an extended-protocol message
        self.synced = False  # an extended segment whose Sync was sent
        self.sets: tuple[tuple[str, str | None], ...] = ()  # plain SETs it makes (replayed)
        self.rollback = False  # its text may roll the transaction back
        self.pins = False  # it may create session state the client relies on (LISTEN...)
        self.may_copy = False  # it may start a COPY FROM STDIN: later requests wait for it
        self.unnamed_parse = False  # it parses the client's unnamed statement
        self.catalog = False  # it may change the catalog (sql.DDL): see freshness.py
        # Extended segments: one Expected per request, in reply order.
        self.expect: deque[Expected] | None = None
        # A batch that may be re-sent once if its prepared statement's plan changed
        # (see replay.py), and whether that is happening: its error and Z are hidden.
        self.replay: Replay | None = None
        self.heal = False
        self.t0 = 0.0  # when it was sent (for pgtenant_query_duration_seconds)


def _no_clock() -> float:
    return 0.0


# ``Ledger.pending`` of every link with no server attached and nothing in flight: shared and
# always empty, because an empty deque costs each idle client 600 bytes (issue 16). Only
# ``push`` adds to a ledger, and it refuses this one: one client's segment can never land
# where another's ledger would see it.
NO_SEGMENTS: Final[deque[Segment]] = deque()
# The FIFOs ``release`` gave up, empty, for the next ``reset`` to take instead of allocating
# one per transaction (0.5 % of the proxy's CPU under pgbench -S). A FIFO goes here only
# empty and from the one ledger that held it, which holds NO_SEGMENTS from then on; there
# are about as many as servers were ever attached at once (one FIFO per attached link), and
# never more than _SPARE_MAX, so idle clients still hold none. A small cap: every new
# ledger's own FIFO comes here when its link is set up unattached, so the spares are full
# at once, and each is some 760 bytes kept for good (256 of them made memory per idle
# client 100 bytes worse over 2,000 clients); a pool's attach/release churn needs few.
_SPARE: Final[list[deque[Segment]]] = []
_SPARE_MAX: Final = 32


class Ledger:
    """The segments in flight on the attached server and the status it last reported.

    A new ledger has a FIFO of its own (as if attached); ``release`` gives it up when the
    server goes with nothing in flight, ``reset`` takes one (a spare, else a new one) at the
    next attach.
    """

    __slots__ = ("clock", "leftover", "pass_", "pending", "remaining", "status", "unsure")

    def __init__(self) -> None:
        self.pending: deque[Segment] = deque()
        self.status = TXN_IDLE  # transaction status from the last ReadyForQuery
        self.unsure = 0  # pending segments that may change the transaction status
        # Which frame types the head segment lets through without a look (update_pass).
        self.pass_: frozenset[int] = PASS_NONE
        self.clock: Callable[[], float] = _no_clock  # the owner's monotonic clock
        # Where the server's byte stream stands: a frame cut by a read is owed too.
        self.leftover = b""  # incomplete server frame
        self.remaining = 0  # bytes of a large pass-through frame still to forward

    def reset(self) -> None:
        """A server was attached: it is idle and owes nothing (pool invariant)."""
        self.pass_ = PASS_NONE
        if self.pending is NO_SEGMENTS:
            self.pending = _SPARE.pop() if _SPARE else deque()
        else:
            self.pending.clear()
        self.status = TXN_IDLE
        self.unsure = 0
        self.leftover = b""
        self.remaining = 0

    def release(self) -> None:
        """The server goes: with nothing in flight, the FIFO goes too (NO_SEGMENTS), to the
        spares (``_SPARE``) unless it is the shared one."""
        pending = self.pending
        if not pending and pending is not NO_SEGMENTS:
            self.pending = NO_SEGMENTS
            if len(_SPARE) < _SPARE_MAX:
                _SPARE.append(pending)

    def push(self, seg: Segment) -> None:
        """``seg`` was sent: its replies come after those of every segment before it."""
        seg.t0 = self.clock()
        if self.pending is NO_SEGMENTS:  # the shared empty FIFO: nothing is sent unattached
            raise AssertionError("a segment was sent with no server attached")
        self.pending.append(seg)
        if len(self.pending) == 1:
            self.update_pass()

    def expect(self, entry: Expected) -> bytes:
        """Record the reply owed for one request of the open extended segment.

        Returns: bytes for the client now (a SYNTH reply whose turn has already come).
        """
        pending = self.pending
        seg = pending[-1]
        expect = seg.expect
        assert expect is not None
        expect.append(entry)
        if len(expect) == 1 and len(pending) == 1:
            if entry.action == SYNTH:  # everything before it is answered: answer it now
                expect.popleft()
                assert entry.data is not None
                return entry.data
            self.update_pass()
        return b""

    def mark_txn(self, seg: Segment) -> None:
        """``seg`` may change the transaction status: the next segment waits for it."""
        if not seg.txn_control:
            seg.txn_control = True
            self.unsure += 1

    def update_pass(self) -> None:
        """Which frame types the head segment lets through without a look."""
        head = self.pending[0] if self.pending else None
        if head is None:
            self.pass_ = PASS_NONE  # nothing is owed: anything but async frames is wrong
        elif head.expect is not None:
            entry = head.expect[0] if head.expect else None
            if entry is not None and entry.kind == _EXECUTE and entry.action == FWD:
                self.pass_ = PASS_EXEC
            elif entry is not None and entry.kind == _QUERY:
                self.pass_ = PASS_ALL
            else:
                self.pass_ = PASS_NONE
        elif head.drop or head.await_first:
            self.pass_ = PASS_NONE
        else:
            self.pass_ = PASS_ALL
