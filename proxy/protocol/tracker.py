"""The per-client link tracker: framing both directions, segments, injection and release.

Theory of operation
-------------------
A *segment* is the unit the backend answers with exactly one ReadyForQuery: a simple
``Query``, or a run of extended-protocol messages closed by ``Sync``. The tracker keeps the
segments sent to the current server in ``pending`` (FIFO); each ``Z`` pops one. Replies of a
segment arrive in order, so the head of ``pending`` describes the frames now arriving.

Client -> server (``pump_client``): complete frames are cut from the client buffer. The first
frame of a segment decides three things:

* **server**: with no server attached, the pump stops with ``NEED_SERVER``; the caller
  attaches one (``attach``) and pumps again. Transaction mode: servers are taken per segment
  and given back when idle.
* **injection**: the context is injected iff the server is *known* to be outside a
  transaction block when the segment starts. That is the last ``Z`` status when nothing is
  in flight; with segments in flight it is still that status unless one of them may change
  the transaction state (BEGIN/COMMIT/... found in its SQL). Then the pump stops with
  ``HOLD`` until their replies are in: injecting into an aborted transaction would make the
  client's ROLLBACK fail, and not injecting into a fresh one would run without context.
* **what it owes**: a simple-Query segment drops its leading injected replies (``drop``);
  an extended segment keeps ``expect``, one ``[kind, action, data]`` entry per request in
  reply order: FWD (the client's), DROP (the proxy's own: the injection, a quiet re-Parse,
  an LRU Close) or SYNTH (answered by the proxy: ParseComplete for a statement already on
  the server, CloseComplete for a client's Close).

Within a segment the pump also rewrites what must not reach Postgres as sent: refused
statements become ``CALL pgtenant.refuse(...)``; named statements are renamed to global ones
(keyed by text, types and search_path) prepared lazily per server; a batch that goes on after
COMMIT is cut with a hidden Sync; DEALLOCATE/DISCARD ALL of the client's own view are
answered locally; plain SETs are noted and replayed with every later context; statements that
leave session state pin the server to the client once they succeeded.

Server -> client (``feed_server``): frames are forwarded in contiguous spans; which types pass
without a look depends on the head segment (``_pass``): everything but ``Z``/``E``/``S``
normally, rows and copy data while a forwarded Execute runs, nothing while injected replies
are owed. An ``E`` ends what the segment owes (Postgres skips to the Sync); its position is
shifted back by the simple-Query prefix length. A simple Query whose text held no statement
gets the EmptyQueryResponse Postgres would have sent, since the prefix made it non-empty.
ParameterStatus for ``search_path`` and for settings the client manages is hidden.

Invariants: a server may be released only when ``pending`` is empty, the last status is
``I`` and no extended batch is open (``can_release``), and it is not pinned. ``unsure`` counts
pending segments that may change the transaction state. Injected replies never reach the
client; SYNTH replies are emitted exactly when everything before them has been answered.

The server is the source of truth (issue #10); SQL text may only make the tracker more
careful:

* The context is skipped only on a status the server reported with nothing in flight
  (``_inject_decision``). With segments in flight, one is injected when the last status was
  idle and none in flight may change it (a closed set of statements, sql.py: TransactionStmt,
  CALL, DO, EXECUTE, recognised by words with false positives only; a statement never seen
  parsed counts as "may"), and waits (HOLD) otherwise: a wrong guess costs a pause or
  repeats the same tenant's SET LOCALs, never a request without context.
* Every reply is matched against what was sent: a ReadyForQuery before what a segment owes,
  a frame with nothing outstanding, or a COPY the model cannot place raise
  ServerProtocolError, and the owner closes that server and ends the client.
* COPY-in mode is what the server said (CopyInResponse), not what the client sent: copy
  messages reach the server only inside it, and the Syncs Postgres ignores there earn no
  segment (``_copy_started``).
* What the tracker records at send time and the server may not have done (a Parse skipped
  after an error) is re-established before it is relied on (``_ensure_unnamed``).
* A server that last served another tenant is emptied (DISCARD ALL) before the next
  request (``attach(reset=True)``), so nothing of one tenant's session reaches another.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..errors import ClientProtocolError, MessageTooLarge, ServerProtocolError
from . import codec
from .encoding import UNSAFE as _UNSAFE_ENCODINGS
from .encoding import encoding_key
from .inject import (
    CLOSE_UNNAMED_PORTAL,
    CLOSE_UNNAMED_STATEMENT,
    CTX_CLOSE,
    CTX_PARSE,
    EXECUTE_UNNAMED,
    Q_DROP,
    Injection,
)
from .refusal import FUNCTION_CALL_REFUSAL, check_statement_name, refusal_sql, refused_parse
from .replay import LIMIT as REPLAY_LIMIT
from .replay import Replay
from .segment import (
    DROP,
    FWD,
    K_BIND,
    K_CLOSE,
    K_DESC_P,
    K_DESC_S,
    K_EXEC,
    K_PARSE,
    K_QUERY,
    SYNTH,
    TERMINAL_OF,
    Segment,
)
from .sql import (
    DROPS_STATEMENTS,
    MAY_COPY_IN,
    SESSION_STATE,
    TXN_CONTROL,
    TXN_END,
    classify,
    local_command,
    plain_sets,
)

if TYPE_CHECKING:
    from ..metrics import LabelStats

__all__ = [
    "CTX_NONE",
    "CTX_READY",
    "CTX_UNKNOWN",
    "HOLD",
    "IDLE",
    "NEED_SERVER",
    "TERMINATE",
    "Link",
    "Segment",
]

_unpack_i32 = struct.Struct("!i").unpack_from
_pack_header = codec.HEADER.pack

# Client pump outcomes.
IDLE: Final = 0  # everything complete was handled
NEED_SERVER: Final = 1  # a segment starts and no server is attached
HOLD: Final = 2  # waiting for in-flight replies before the next segment can be judged
TERMINATE: Final = 3  # the client sent Terminate

# State of the proxy's context statement on the attached server.
CTX_NONE: Final = 0  # never parsed on this server
CTX_READY: Final = 1  # parsed and believed alive
CTX_UNKNOWN: Final = 2  # may have been deallocated: Close + Parse before use

# Type bytes as plain ints for the loops.
_Q = ord("Q")
_S = ord("S")
_X = ord("X")
_P = ord("P")
_B = ord("B")
_E = ord("E")
_F = ord("F")
_D = ord("D")
_COPY_DATA = ord("d")
_H = ord("H")
_Z = ord("Z")
_N = ord("N")
_A = ord("A")
_C = ord("C")
_I = ord("I")
_E_STATUS = ord("E")
_G = ord("G")  # CopyInResponse
_W = ord("W")  # CopyBothResponse
_COPY_DONE = ord("c")
_COPY_FAIL = ord("f")
_CLIENT_COPY = frozenset(b"dcf")  # CopyData/CopyDone/CopyFail: only while the server copies in
_CLIENT_EXTENDED = frozenset(b"PBDECH")
_CLIENT_TYPES = frozenset(b"QPBDECHSXFdcf")  # what a logged-in client may send
# Backend frames that always need a look: ReadyForQuery, ErrorResponse, ParameterStatus,
# and CopyInResponse/CopyBothResponse (the server then ignores Syncs: see _copy_started).
_SERVER_SPECIAL = frozenset(b"ZESGW")
# Frames that are neither counted nor dropped while dropping injected replies.
_SERVER_ASYNC = frozenset(b"NSA")
_NOT_A_REPLY: Final = frozenset(b"ZES") | _SERVER_ASYNC
# Frame types forwarded without a look, by state of the head segment.
_PASS_ALL: Final = frozenset(range(256)) - _SERVER_SPECIAL
_PASS_EXEC: Final = frozenset(b"DdcHNA")  # rows and copy-out data of a forwarded Execute
_PASS_NONE: Final[frozenset[int]] = frozenset()
_PARSE_COMPLETE: Final = codec.frame(ord("1"), b"")
_CLOSE_COMPLETE: Final = codec.frame(ord("3"), b"")
# ParameterStatus names the client must not see change: they reflect the injected context.
HIDDEN_PARAMETERS: Final = frozenset({"search_path"})



_SYNC: Final = codec.sync()
_Q_BYTE: Final = b"Q"
_PLAN_CHANGED: Final = b"0A000"  # feature_not_supported: "cached plan must not change ..."
_ROLLBACK: Final = re.compile(rb"(?i)\b(rollback|abort)\b")
_STMT_PREFIX: Final = b"__pgtenant_p"
# Global statement names are a keyed hash of what they hold: stable within this process (so
# servers share them), unguessable outside it, so no tenant can name another's statement
# even through SQL the guard cannot see (the guard also refuses SQL naming __pgtenant*).
_NAME_KEY: Final = secrets.token_bytes(16)
# A statement or portal name we never saw parsed/bound is one made by SQL (PREPARE, DECLARE):
# those hold only SELECT/DML, which cannot move the transaction status; or it does not exist
# and its Execute fails. Not knowing is still treated as "may": the next request waits.
_UNKNOWN_TXN: Final = TXN_CONTROL
# The reset of a server that changes tenant (ARCHITECTURE §5: a server changes tenant
# empty): settings, prepared statements (the proxy's too), portals, temp objects, sequence
# state, LISTEN, advisory locks. Sent in the same write as the new tenant's first request.
_DISCARD_ALL: Final = codec.query("DISCARD ALL")


def _no_clock() -> float:
    return 0.0


class Link:
    """Client session protocol state plus the state of the link to the attached server.

    The owner (``client.py``) feeds bytes in and writes what comes out; this class never
    touches a socket.
    """

    def __init__(self, injection: Injection, max_message_size: int,
                 guard: Callable[[bytes], str | None] | None = None,
                 outside_txn: Callable[[bytes], bool] | None = None,
                 max_prepared: int = 200, client_encoding: str = "UTF8"):
        self.injection = injection
        # Which tenant's state a server carries once this client used it: a server attached
        # with another tenant's key is reset first (attach(reset=True), _DISCARD_ALL).
        ctx = injection.context
        self.tenant_key: tuple[object, ...] = (
            ctx.identity.org_id, ctx.identity.tenant_type, ctx.identity.entity_id, ctx.role,
            ctx.search_path)
        # client_encoding is the server session's, not replayed per transaction: Postgres
        # decodes a message with the encoding in force when it arrives, so a change must come
        # before the client's text (protocol/encoding.py says which encodings are served).
        # Both are canonical names, as Postgres reports them; both follow the ParameterStatus
        # of the client's own statements (SET, RESET, rollback, set_config alike).
        self.encoding = client_encoding  # the client's
        self.server_encoding = "UTF8"  # the attached server session's
        # Named prepared statements (issue #4): the client's names map to proxy-global names
        # keyed by (text, parameter types, search_path), prepared lazily on each server.
        self.max_prepared = max_prepared
        # The attached server's LRU: True when prepared there, False when stale (see
        # ServerConnection.prepared).
        self.prepared: OrderedDict[bytes, bool] = OrderedDict()
        self._client_stmts: dict[bytes, tuple[bytes, bytes, bytes]] = {}  # name->(G, sql, types)
        self._global_names: dict[tuple[bytes, bytes], bytes] = {}
        # The client's unnamed statement outlives Sync in Postgres; a later transaction may
        # land on another server (or after a Query, which destroys it): it is re-parsed
        # quietly before the Bind that needs it.
        self._unnamed: tuple[bytes, bytes] | None = None  # (text, types) of the last Parse ""
        self._unnamed_here = False  # that Parse is the attached server's unnamed statement
        self._unnamed_seg: Segment | None = None  # the segment that sent that Parse
        self._pass: frozenset[int] = _PASS_NONE
        # The client's own settings (startup parameters, plain SETs): re-applied with every
        # transaction's context; the servers' reports of them are the proxy's business.
        self.managed = {name.lower() for name, _ in injection.settings}
        self._startup_settings = injection.settings
        self._txn_sets: list[tuple[str, str | None]] = []  # SETs inside an open block
        self._txn_rolled_back = False
        self.guard = guard  # statement policy: None to allow, else the refusal message
        # Whether a refused statement may run outside a transaction block for this tenant.
        self.outside_txn = outside_txn
        self.refused = 0
        # The client's (database, tenant type) counters (metrics.py), set by its owner.
        self.stats: LabelStats | None = None
        self.clock: Callable[[], float] = _no_clock  # the owner's monotonic clock
        self.max_message_size = max_message_size
        self.cbuf = bytearray()  # client bytes not yet handled
        # Server link state: valid while attached, reset by attach().
        self.attached = False
        self.pending: deque[Segment] = deque()
        self.status = _I  # transaction status from the last ReadyForQuery
        self.unsure = 0  # pending segments that may change the transaction status
        self.ctx_state = CTX_NONE
        self.drops_statements = False  # a segment may have deallocated our statement
        self.session_dirty = False  # a segment may have left session state: close, not pool
        self.pinned = False  # session state the client relies on: keep the server attached
        self._scrub_unnamed = False  # the server's unnamed statement may be another client's
        self.open_extended = False  # an extended batch was started and not yet synced
        self.held = False  # pump_client stopped with HOLD
        self.skip_to_sync = False  # a failed extended batch: discard until Sync, as Postgres does
        # A FATAL the server sent while the client awaited nothing (pg_terminate_backend):
        # kept until the socket closes, so the client gets error and close together.
        self.unsolicited_fatal: bytes | None = None
        self._plain_text = b""  # a plain Query's text, classified before NEED_SERVER
        self._sleftover = b""  # incomplete server frame
        self._sremaining = 0  # bytes of a large pass-through frame still to forward
        # Client session state that outlives servers.
        # TXN_CONTROL | TXN_END flags of the client's statements and portals, by name.
        self._stmt_txn: dict[bytes, int] = {}  # all classify() flags, by statement name
        self._stmt_sets: dict[bytes, tuple[tuple[str, str | None], ...]] = {}
        self._portal_txn: dict[bytes, int] = {}
        self._ended_in_batch = False  # the open batch executed something that may end a txn
        # The server is in COPY-in mode: from its CopyInResponse until the client's
        # CopyDone/CopyFail or the server's ErrorResponse (see _copy_started).
        self.copy_in = False
        self._reset_pending = False  # DISCARD ALL before the next request (tenant change)
        self._reset_encoding = "UTF8"  # the attached server's client_encoding after a reset
        # A healed batch (replay.py) was put back at the head of cbuf: pump it again.
        self._replay_ready = False
        self._replaying = False  # the batch being re-sent: never healed twice

    # ------------------------------------------------------------------ attachment

    @property
    def client_statements(self) -> dict[bytes, tuple[bytes, bytes, bytes]]:
        """The client's named prepared statements (name -> global name, text, types)."""
        return self._client_stmts

    def attach(self, ctx_state: int, prepared: OrderedDict[bytes, bool] | None = None,
               server_encoding: str = "UTF8", *, reset: bool = False,
               reset_encoding: str = "UTF8") -> None:
        """A server was attached; it is idle (pool invariant).

        ``reset``: it last served another tenant, so its session is emptied (DISCARD ALL)
        before this client's first request; ``reset_encoding`` is its client_encoding then.
        """
        self.attached = True
        self.server_encoding = server_encoding
        self._reset_pending = reset
        self._reset_encoding = reset_encoding
        self.prepared = prepared if prepared is not None else OrderedDict()
        self._pass = _PASS_NONE
        self.pending.clear()
        self.status = _I
        self.unsure = 0
        self.ctx_state = ctx_state
        self.drops_statements = False
        self.session_dirty = False
        self.pinned = False
        self._scrub_unnamed = True
        self._unnamed_here = False
        self._ended_in_batch = False
        self.copy_in = False
        self._sleftover = b""
        self._sremaining = 0

    def detach(self) -> int:
        """The server goes away (released or closed). Returns: its context-statement state."""
        self.attached = False
        state = CTX_UNKNOWN if self.drops_statements and self.ctx_state else self.ctx_state
        self.ctx_state = CTX_NONE
        return state

    @property
    def can_release(self) -> bool:
        """Whether the attached server is provably idle: the release rule of §4."""
        return (
            self.attached
            and not self.pending
            and self.status == _I
            and not self.open_extended
            and not self._sleftover
            and not self._sremaining
        )

    @property
    def in_transaction(self) -> bool:
        """Whether the link has work in flight or an open transaction block."""
        return bool(self.pending) or self.status != _I or self.open_extended

    # ------------------------------------------------------------------ client -> server

    def _inject_decision(self) -> bool | None:
        """Whether the next segment gets the context: True, False, or None to wait (HOLD).

        Skipping the context is decided only on a status the server reported with nothing
        in flight after it: with replies outstanding, a segment is injected when the last
        status was idle and nothing in flight may have opened a block (injecting into an
        open block would only repeat the same tenant's SET LOCALs), and waits otherwise.
        """
        if self.unsure:
            return None
        if self.status == _I:
            return True
        return None if self.pending else False

    def _ext_injection(self, out: bytearray) -> Segment:
        seg = Segment(0)
        expect: deque[list[object]] = deque()
        if self.ctx_state != CTX_READY:
            if self.ctx_state == CTX_UNKNOWN:
                out += CTX_CLOSE
                expect.append([K_CLOSE, DROP, None])
            out += CTX_PARSE
            expect.append([K_PARSE, DROP, None])
            self.ctx_state = CTX_READY
        out += self.injection.ext_bind
        out += EXECUTE_UNNAMED
        out += CLOSE_UNNAMED_PORTAL
        expect.extend(([K_BIND, DROP, None], [K_EXEC, DROP, None], [K_CLOSE, DROP, None]))
        seg.expect = expect
        return seg

    def _prelude(self, out: bytearray) -> None:
        """Before the first request of a transaction: empty a server that served another
        tenant (``attach(reset=True)``), then give its session the client's encoding."""
        if self._reset_pending:
            self._reset_pending = False
            out += _DISCARD_ALL
            seg = Segment(1)  # CommandComplete; its ParameterStatus reports are ours too
            seg.hide_z = seg.ours = True
            self._push(seg)
            # What DISCARD ALL (and the Query carrying it) removed from the session.
            self.prepared.clear()
            self.ctx_state = CTX_NONE
            self._unnamed_here = False
            self._scrub_unnamed = False
            self.server_encoding = self._reset_encoding
        if self.encoding != self.server_encoding:
            self._switch_encoding(out)

    def _switch_encoding(self, out: bytearray) -> None:
        """Before a transaction's first message: give the server's session the client's
        encoding, in a hidden Query of its own (its replies are the proxy's)."""
        out += codec.query(f"SET client_encoding TO '{self.encoding}'")
        self._unnamed_here = False  # a simple Query destroys the unnamed statement
        seg = Segment(1)  # CommandComplete; the ParameterStatus is hidden too (_special)
        seg.hide_z = seg.ours = True
        self._push(seg)
        self.server_encoding = self.encoding

    def _expect(self, kind: int, action: int, data: object = None) -> bytes:
        """Record the reply owed for one request of the open extended segment.

        Returns: bytes for the client now (a SYNTH reply whose turn has already come).
        """
        seg = self.pending[-1]
        assert seg.expect is not None
        seg.expect.append([kind, action, data])
        if len(seg.expect) == 1 and len(self.pending) == 1:
            if action == SYNTH:  # everything before it is answered: answer it right away
                seg.expect.popleft()
                assert isinstance(data, bytes)
                return data
            self._update_pass()
        return b""

    def _global_name(self, sql: bytes, types: bytes) -> bytes:
        name = self._global_names.get((sql, types))
        if name is None:
            # Keyed by search_path too: tenants on different schemas never share a plan.
            path = self.injection.context.search_path_value.encode()
            digest = hashlib.blake2b(sql + b"\x00" + types + b"\x00" + path, key=_NAME_KEY,
                                     digest_size=12).hexdigest()
            name = _STMT_PREFIX + digest.encode()
            if len(self._global_names) > 10_000:
                self._global_names.clear()
            self._global_names[(sql, types)] = name
        return name

    def _prepare(self, out: bytearray, name: bytes, sql: bytes, types: bytes,
                 action: int) -> None:
        """Parse global statement ``name`` on the attached server (evicting LRU-wise)."""
        if self.prepared.get(name) is False:  # may still exist: Close (never fails) first
            out += codec.frame(_C, b"S" + name + b"\x00")
            self._expect(K_CLOSE, DROP, None)
        out += codec.frame(_P, name + b"\x00" + sql + b"\x00" + types)
        self._expect(K_PARSE, action, name)
        self.prepared[name] = True
        self.prepared.move_to_end(name)
        while len(self.prepared) > self.max_prepared:
            old, _ = self.prepared.popitem(last=False)
            out += codec.frame(_C, b"S" + old + b"\x00")
            self._expect(K_CLOSE, DROP, None)

    def _ensure_unnamed(self, out: bytearray, buf: bytearray, span: int, pos: int) -> None:
        """Before a Bind/Describe of the unnamed statement: re-parse it quietly when the
        attached server's unnamed statement is not the client's, or close it when the client
        has none, so a previous client's is never used (flushing ``buf[span:pos]`` first, so
        the caller continues from ``pos``). Only here: a client that parses its own unnamed
        statement first (nearly all) replaces the server's and pays nothing."""
        out += buf[span:pos]
        seg = self.pending[-1]
        if self._unnamed_here and (self._unnamed_seg is None or self._unnamed_seg is seg
                                   or self._unnamed_seg not in self.pending):
            return
        if self._unnamed is None:
            if self._scrub_unnamed:
                out += CLOSE_UNNAMED_STATEMENT
                self._expect(K_CLOSE, DROP, None)
                self._scrub_unnamed = False
            return
        # Not known to be there: never parsed on this server, destroyed since, or parsed in
        # an earlier batch still in flight whose Parse the server may skip after an error
        # (then the server keeps an older statement than the client's). Parse it again.
        text, types = self._unnamed
        out += codec.frame(_P, b"\x00" + text + b"\x00" + types)
        self._expect(K_PARSE, DROP, None)
        self._unnamed_here = True
        self._unnamed_seg = seg
        seg.unnamed_parse = True

    def _use(self, out: bytearray, mapped: tuple[bytes, bytes, bytes]) -> bytes:
        """Make sure a client's renamed statement exists on the attached server.

        Returns: its global name.
        """
        global_name, text, types = mapped
        if self.prepared.get(global_name):
            self.prepared.move_to_end(global_name)
        else:  # parsed on another server, or evicted here: prepare it again, quietly
            self._prepare(out, global_name, text, types, DROP)
        return global_name

    def _update_pass(self) -> None:
        """Which frame types the head segment lets through without a look."""
        head = self.pending[0] if self.pending else None
        if head is None:
            self._pass = _PASS_NONE  # nothing is owed: anything but async frames is wrong
        elif head.expect is not None:
            entry = head.expect[0] if head.expect else None
            if entry is not None and entry[0] == K_EXEC and entry[1] == FWD:
                self._pass = _PASS_EXEC
            elif entry is not None and entry[0] == K_QUERY:
                self._pass = _PASS_ALL
            else:
                self._pass = _PASS_NONE
        elif head.drop or head.await_first:
            self._pass = _PASS_NONE
        else:
            self._pass = _PASS_ALL

    def _push(self, seg: Segment) -> None:
        seg.t0 = self.clock()
        self.pending.append(seg)
        if len(self.pending) == 1:
            self._update_pass()

    def _note_sql(self, seg: Segment, sql: bytes, flags: int | None = None) -> int:
        """A simple Query's text is about to run: note what it may do (``flags``: its
        classify() result when already known)."""
        if flags is None:
            flags = classify(sql)
        if flags & TXN_END and _ROLLBACK.search(sql):
            seg.rollback = True
        if flags & TXN_CONTROL:
            self._mark_txn(seg)
        if flags & MAY_COPY_IN:
            seg.may_copy = True
        sets = self._replayable_sets(sql) if flags & SESSION_STATE else None
        self._session_effects(seg, flags, sets or ())
        return flags

    def _replayable_sets(self, sql: bytes) -> tuple[tuple[str, str | None], ...] | None:
        """The plain SETs of ``sql`` the proxy can replay, or None (then the server that
        runs it is pinned instead): the proxy reads text as UTF-8, so a non-ASCII value from
        a client in another encoding would be replayed garbled."""
        if self.encoding not in ("UTF8", "SQL_ASCII") and not sql.isascii():
            return None
        return plain_sets(sql)

    def _session_effects(self, seg: Segment, flags: int,
                         sets: tuple[tuple[str, str | None], ...]) -> None:
        """What running a statement with ``flags`` does to the server's session."""
        if flags & DROPS_STATEMENTS:
            # DEALLOCATE [ALL] may drop the proxy's statements too: which ones survive is
            # guesswork. Shared servers are retired; a pinned one re-establishes them (Close
            # first) before their next use.
            self.drops_statements = True
            self.session_dirty = True
            self.ctx_state = CTX_UNKNOWN
            for name in self.prepared:
                self.prepared[name] = False
        if flags & SESSION_STATE:
            self.session_dirty = True
            seg.sets += sets
            if not sets:
                # LISTEN, WITH HOLD cursors, session advisory locks, SQL PREPARE, temp
                # objects...: once it succeeded, the client keeps this server for the rest
                # of its session, as session mode would (plain SETs are replayed instead).
                seg.pins = True

    def _mark_txn(self, seg: Segment) -> None:
        if not seg.txn_control:
            seg.txn_control = True
            self.unsure += 1

    def pump_client(self) -> tuple[bytes, bytes, int]:
        """Handle the complete client frames buffered in ``cbuf``.

        Returns: (bytes for the server, bytes for the client, outcome) where outcome is
        IDLE, NEED_SERVER, HOLD or TERMINATE. Unhandled bytes stay in ``cbuf``.
        Raises: ClientProtocolError / MessageTooLarge / UnsupportedProtocol.
        """
        buf = self.cbuf
        self.held = False
        if buf[:1] == _Q_BYTE and not (self.skip_to_sync or self.open_extended or self.unsure
                                       or self._ended_in_batch or self.copy_in
                                       or (self.pending and self.pending[-1].may_copy)):
            fast = self._one_plain_query()
            if fast is not None:
                return fast
        n = len(buf)
        pos = 0
        span = 0
        out = bytearray()
        reply = b""
        outcome = IDLE
        while n - pos >= 1:
            t = buf[pos]
            if t not in _CLIENT_TYPES:
                # Judged on the first byte: a second StartupMessage (first byte 0) or garbage
                # must not make us wait for a "frame" of whatever length follows.
                raise ClientProtocolError(f"unexpected message type {chr(t)!r} from client")
            if n - pos < 5:
                break
            (length,) = _unpack_i32(buf, pos + 1)
            if length < 4:
                raise ClientProtocolError(f"invalid length {length} in message {chr(t)!r}")
            if length > self.max_message_size:
                raise MessageTooLarge(
                    f"message {chr(t)!r} of {length} bytes exceeds max_message_size "
                    f"({self.max_message_size})"
                )
            end = pos + 1 + length
            if end > n:
                break
            if self.skip_to_sync:
                # Postgres's error recovery: discard the rest of the failed batch until its
                # Sync, then report the transaction status (nothing is in flight here).
                out += buf[span:pos]
                span = end
                if t == _S:
                    self.skip_to_sync = False
                    status = bytes((self.status,)) if self.attached else b"I"
                    reply += codec.ready_for_query(status)
                elif t == _X:
                    span = pos
                    outcome = TERMINATE
                    break
                pos = end
                continue
            # COPY from the client is driven by the server's word, not the client's: copy
            # messages go to the server only while it said it is copying in (CopyInResponse,
            # see _copy_started); Sync and Flush then earn no reply, as Postgres ignores them.
            if self.copy_in:
                if t in _CLIENT_COPY:
                    if t != _COPY_DATA:
                        self.copy_in = False  # CopyDone/CopyFail ends COPY-in mode
                    pos = end
                    continue
                if t == _S or t == _H:
                    out += buf[span:pos]
                    span = pos = end
                    continue
                if t != _X:
                    raise ClientProtocolError(
                        f"unexpected message type {chr(t)!r} during COPY from stdin")
            elif self.pending and self.pending[-1].may_copy and (
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
            text = bytes(buf[pos + 5 : end - 1]) if t == _Q else b""  # without the NUL
            text_flags = classify(text) if t == _Q else 0
            # local_command's words (DEALLOCATE, DISCARD) are what DROPS_STATEMENTS flags.
            if (t == _Q and text_flags & DROPS_STATEMENTS and not self.open_extended
                    and not self.pinned and local_command(text) is not None):
                if self.pending:  # decide (and answer) in order, after the replies owed
                    outcome = HOLD
                    self.held = True
                    break
                answer = self._answer_locally(text)
                if answer is not None:
                    out += buf[span:pos]
                    span = pos = end
                    reply += answer
                    continue
            if (t == _Q or t == _F) and not self.open_extended:
                if not self.attached:
                    outcome = NEED_SERVER
                    break
                inject = self._inject_decision()
                if inject is None:
                    outcome = HOLD
                    self.held = True
                    break
                if inject and (self._reset_pending or self.encoding != self.server_encoding):
                    out += buf[span:pos]
                    span = pos
                    self._prelude(out)
                if t == _F:
                    refusal: str | None = FUNCTION_CALL_REFUSAL
                    if self.stats is not None:
                        self.stats.function_calls_refused += 1
                    body = b""
                else:
                    refusal = self.guard(text) if self.guard is not None else None
                if (refusal is not None and inject and t == _Q and self.outside_txn is not None
                        and self.outside_txn(text)):
                    # Allowed for this tenant type (VACUUM, CREATE INDEX CONCURRENTLY...):
                    # set the context for the session in a hidden Query of its own, send the
                    # statement bare, and retire the server afterwards.
                    out += buf[span:pos]
                    out += codec.query(self.injection.q_session[:-1])
                    self._unnamed_here = False  # a simple Query destroys the unnamed one
                    hidden = Segment(Q_DROP)
                    hidden.hide_z = True
                    self._push(hidden)
                    self._push(Segment(0))
                    self.session_dirty = True
                    span = pos
                    pos = end
                    continue
                if refusal is not None:
                    # Postgres raises the refusal itself, so replies stay in order and an
                    # open transaction block is aborted exactly as for any other error.
                    self.refused += 1
                    text = b""
                    body = refusal_sql(refusal) + b"\x00"
                elif inject:
                    body = bytes(buf[pos + 5 : end])
                out += buf[span:pos]
                span = end
                self._unnamed_here = False  # a simple Query destroys the unnamed statement
                if inject:
                    seg = Segment(self.injection.q_drop, self.injection.q_shift, True)
                    out += _pack_header(_Q, 4 + len(self.injection.q_prefix) + len(body))
                    out += self.injection.q_prefix
                    out += body
                elif refusal is not None:
                    seg = Segment(0)
                    out += _pack_header(_Q, 4 + len(body))
                    out += body
                else:
                    seg = Segment(0)
                    span = pos  # forwarded unchanged
                self._push(seg)
                if text:
                    self._note_sql(seg, text, text_flags)
                pos = end
                continue
            if self._ended_in_batch and (t == _Q or (t in _CLIENT_EXTENDED and t != _H)):
                # The batch executed COMMIT/ROLLBACK/CALL and goes on: what follows would run
                # in a new transaction without the tenant's context. Close this part with a
                # Sync of our own (its ReadyForQuery is hidden) and judge the rest as a new
                # segment once the server has answered (HOLD); after an error the rest is
                # discarded up to the client's Sync, as Postgres itself would do.
                out += buf[span:pos]
                span = pos
                out += _SYNC
                self.pending[-1].hide_z = True
                self.pending[-1].split = True
                self.pending[-1].replay = None
                self._mark_txn(self.pending[-1])
                self.open_extended = False
                self._ended_in_batch = False
                continue
            if t == _Q:  # a Query inside an unsynced extended batch shares its ReadyForQuery
                self.open_extended = False
                self._unnamed_here = False
                seg = self.pending[-1]
                seg.replay = None
                reply += self._expect(K_QUERY, FWD)
                refusal = self.guard(text) if self.guard is not None else None
                if refusal is not None:
                    self.refused += 1
                    out += buf[span:pos]
                    out += codec.query(refusal_sql(refusal))
                    span = end
                else:
                    self._note_sql(seg, text, text_flags)
                self._mark_txn(seg)
                pos = end
                continue
            if t in _CLIENT_EXTENDED:
                fresh = False
                if not self.open_extended:
                    if not self.attached:
                        if t == _H:  # Flush with nothing in flight: nothing to do
                            out += buf[span:pos]
                            span = pos = end
                            continue
                        outcome = NEED_SERVER
                        break
                    inject = self._inject_decision()
                    if inject is None:
                        outcome = HOLD
                        self.held = True
                        break
                    out += buf[span:pos]
                    span = pos
                    if inject:
                        self._prelude(out)
                    if inject:
                        seg = self._ext_injection(out)
                    else:
                        seg = Segment(0)
                        seg.expect = deque()
                    seg.extended = True
                    self._push(seg)
                    self.open_extended = True
                    fresh = inject and not self._replaying
                    self._replaying = False
                seg = self.pending[-1]
                if seg.replay is not None and not seg.replay.note(t, buf[pos:end]):
                    seg.replay = None
                if t == _P:
                    name, npos = codec.read_cstring(buf, pos + 5, limit=end)
                    check_statement_name(name)
                    sql, tpos = codec.read_cstring(buf, npos, limit=end)
                    types = bytes(buf[tpos:end])
                    text = sql
                    refusal = self.guard(sql) if self.guard is not None else None
                    if refusal is not None:
                        self.refused += 1
                        text, types = refused_parse(refusal, sql, types)
                        sql = b""
                    if name:
                        # Renamed to a proxy-global statement, prepared on this server only
                        # when it is not there already (then ParseComplete is ours to send).
                        out += buf[span:pos]
                        span = end
                        global_name = self._global_name(text, types)
                        self._client_stmts[name] = (global_name, text, types)
                        if self.prepared.get(global_name):
                            self.prepared.move_to_end(global_name)
                            reply += self._expect(K_PARSE, SYNTH, _PARSE_COMPLETE)
                        else:
                            self._prepare(out, global_name, text, types, FWD)
                    else:
                        if refusal is not None:
                            out += buf[span:pos]
                            span = end
                            out += codec.frame(_P, b"\x00" + text + b"\x00" + types)
                        self._expect(K_PARSE, FWD)
                        self._unnamed = (text, types)
                        self._unnamed_here = True
                        self._unnamed_seg = seg
                        seg.unnamed_parse = True
                    # What the statement does is noted now and applied at each Bind: a named
                    # statement may run again in later transactions, on other servers.
                    flags = classify(sql)
                    sets = self._replayable_sets(sql) if flags & SESSION_STATE else None
                    self._stmt_txn[name] = flags
                    self._stmt_sets[name] = sets or ()
                elif t == _B:
                    portal, npos = codec.read_cstring(buf, pos + 5, limit=end)
                    stmt, rest = codec.read_cstring(buf, npos, limit=end)
                    check_statement_name(stmt)
                    flags = self._stmt_txn.get(stmt, _UNKNOWN_TXN)
                    self._portal_txn[portal] = flags & (TXN_CONTROL | TXN_END | MAY_COPY_IN)
                    self._session_effects(seg, flags, self._stmt_sets.get(stmt, ()))
                    mapped = self._client_stmts.get(stmt) if stmt else None
                    global_name = None
                    if not stmt:
                        self._ensure_unnamed(out, buf, span, pos)
                        span = pos
                    if mapped is not None:
                        out += buf[span:pos]
                        span = end
                        global_name = self._use(out, mapped)
                        out += codec.frame(_B, portal + b"\x00" + global_name + b"\x00"
                                           + bytes(buf[rest:end]))
                    self._expect(K_BIND, FWD, global_name)
                    if fresh and mapped is not None and end - pos <= REPLAY_LIMIT:
                        assert seg.expect
                        seg.replay = Replay(seg.expect[-1], buf[pos:end])
                elif t == _E:
                    portal, _ = codec.read_cstring(buf, pos + 5, limit=end)
                    flags = self._portal_txn.get(portal, _UNKNOWN_TXN)
                    if flags:
                        self._mark_txn(seg)
                    if flags & MAY_COPY_IN:
                        seg.may_copy = True
                    if flags & TXN_END:
                        self._ended_in_batch = True
                    self._expect(K_EXEC, FWD)
                elif t == _C or t == _D:
                    what = buf[pos + 5] if end - pos > 5 else 0
                    name = b""
                    if what == ord("S"):
                        name, _ = codec.read_cstring(buf, pos + 6, limit=end)
                        check_statement_name(name)
                    mapped = self._client_stmts.get(name) if name else None
                    if t == _C and name:
                        # Only the client's name goes away; the global statement stays on
                        # the server for others. Postgres answers CloseComplete even for a
                        # name that does not exist, and so do we.
                        self._stmt_txn.pop(name, None)
                        self._stmt_sets.pop(name, None)
                        self._client_stmts.pop(name, None)
                        out += buf[span:pos]
                        span = end
                        reply += self._expect(K_CLOSE, SYNTH, _CLOSE_COMPLETE)
                    elif t == _C:
                        self._expect(K_CLOSE, FWD)
                    elif mapped is not None:
                        out += buf[span:pos]
                        span = end
                        global_name = self._use(out, mapped)
                        out += codec.frame(_D, b"S" + global_name + b"\x00")
                        self._expect(K_DESC_S, FWD)
                    elif what == ord("S") and not name and t == _D:
                        self._ensure_unnamed(out, buf, span, pos)
                        span = pos
                        self._expect(K_DESC_S, FWD)
                    else:
                        self._expect(K_DESC_S if what == ord("S") else K_DESC_P, FWD)
                pos = end
                continue
            if t == _S:
                self._ended_in_batch = False
                if self.open_extended:
                    self.open_extended = False
                    last = self.pending[-1]
                    last.synced = True
                    if last.replay is not None and not last.replay.note(t, buf[pos:end]):
                        last.replay = None
                elif self.attached:  # a bare Sync still earns a ReadyForQuery
                    self._push(Segment(0))
                else:  # no server, no transaction: answer it ourselves
                    out += buf[span:pos]
                    span = end
                    reply += codec.ready_for_query(b"I")
                pos = end
                continue
            if t == _X:
                out += buf[span:pos]
                span = pos = end
                outcome = TERMINATE
                break
            raise ClientProtocolError(f"unexpected message type {chr(t)!r} from client")
        out += buf[span:pos]
        del buf[:pos]
        return bytes(out), reply, outcome

    def _one_plain_query(self) -> tuple[bytes, bytes, int] | None:
        """The common case, decided without the general loop: ``cbuf`` is exactly one
        Query whose text has no flag (no transaction control, no session state), sent
        outside a transaction block. Returns: what ``pump_client`` returns, or None to take
        the general path (which then decides everything the same way, only slower)."""
        buf = self.cbuf
        n = len(buf)
        if n < 6 or buf[n - 1] != 0:
            return None
        (length,) = _unpack_i32(buf, 1)
        if length + 1 != n or length > self.max_message_size or self.status != _I:
            return None
        text = bytes(buf[5 : n - 1])
        # The pass before a server was attached (NEED_SERVER) classified this same text.
        if text != self._plain_text and classify(text):
            return None
        if not self.attached:
            self._plain_text = text
            return b"", b"", NEED_SERVER
        self._plain_text = b""
        if self.encoding != self.server_encoding or self._reset_pending:
            return None
        if self.guard is not None and self.guard(text) is not None:
            return None  # refused: the general path has the rules (outside_txn...)
        injection = self.injection
        del buf[:]
        self._unnamed_here = False  # a simple Query destroys the unnamed statement
        self._push(Segment(injection.q_drop, injection.q_shift, True))
        prefix = injection.q_prefix
        return (_pack_header(_Q, 5 + len(prefix) + len(text)) + prefix + text + b"\x00",
                b"", IDLE)

    def fail_segment(self, error: bytes) -> bytes:
        """The segment at the head of ``cbuf`` cannot get a server: answer it with ``error``.

        A Query is consumed and answered with ``error`` + ReadyForQuery; an extended batch
        gets ``error`` now and its ReadyForQuery when its Sync arrives (Postgres's own
        error-recovery rule), so the client stays usable.

        Returns: bytes for the client.
        """
        assert not self.attached
        if len(self.cbuf) >= 5 and self.cbuf[0] == _Q:
            (length,) = _unpack_i32(self.cbuf, 1)
            del self.cbuf[: 1 + length]
            return error + codec.ready_for_query(b"I")
        self.skip_to_sync = True
        return error

    # ------------------------------------------------------------------ server -> client

    def feed_server(self, data: bytes) -> tuple[list[bytes | memoryview], bool]:
        """Handle bytes from the attached server.

        Returns: (chunks for the client, whether a held client segment may now proceed).
        Raises: ServerProtocolError when the server breaks the protocol.
        """
        if self._sleftover:
            data = self._sleftover + data
            self._sleftover = b""
        mv = memoryview(data)
        n = len(data)
        pos = 0
        chunks: list[bytes | memoryview] = []
        resume = False
        if self._sremaining:
            take = min(self._sremaining, n)
            self._sremaining -= take
            pos = take
        span = 0
        head = self.pending[0] if self.pending else None
        if (head is not None and pos == 0 and head.drop == self.injection.q_drop
                and self.injection.q_reply and data.startswith(self.injection.q_reply)):
            # The common case of a simple-query prefix: its fixed replies all arrived, in one
            # piece and with nothing between them; dropped with one comparison.
            pos = span = len(self.injection.q_reply)
            head.drop = 0
            if n > pos and data[pos] not in _NOT_A_REPLY:
                head.await_first = False  # the client's first reply is here already
            self._update_pass()
        while n - pos >= 5:
            t = data[pos]
            (length,) = _unpack_i32(data, pos + 1)
            if length < 4:  # before anything else: a negative length would loop or walk back
                raise ServerProtocolError(f"invalid length {length} in {chr(t)!r} from server")
            end = pos + 1 + length
            if t in self._pass:
                if end > n:
                    self._sremaining = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                break
            if pos > span:
                chunks.append(mv[span:pos])
            span = end
            replacement = self._special(t, data, pos, end)
            if replacement is not None:
                chunks.append(replacement)
            if t == _G and self.held:
                resume = True  # a COPY started: held copy data may go now
            if t == _Z and ((self.held and not self.unsure) or self._replay_ready):
                self._replay_ready = False
                resume = True
            pos = end
        if pos > span:
            chunks.append(mv[span:pos])
        if pos < n:
            self._sleftover = bytes(data[pos:])
        return chunks, resume

    def _special(self, t: int, data: bytes, pos: int, end: int) -> bytes | memoryview | None:
        """One frame that needs a look. Returns: what to send the client for it, if anything."""
        head = self.pending[0] if self.pending else None
        frame = memoryview(data)[pos:end]
        if t == _Z:
            if head is None:
                raise ServerProtocolError("ReadyForQuery with no request outstanding")
            if end - pos != 6:
                raise ServerProtocolError("malformed ReadyForQuery")
            if not head.failed and (head.drop or (head.expect and any(
                    e[1] != SYNTH and e[0] != K_QUERY for e in head.expect))):
                # Postgres answers every request of a segment before its ReadyForQuery,
                # unless one failed: the model and the server disagree (ARCHITECTURE §5).
                unanswered = [e[0] for e in head.expect or ()
                              if e[1] != SYNTH and e[0] != K_QUERY]
                raise ServerProtocolError(
                    f"ReadyForQuery before the replies pgtenant expected ({head.drop} "
                    f"injected, requests {unanswered} unanswered)")
            self.copy_in = False
            self.pending.popleft()
            if head.txn_control:
                self.unsure -= 1
            self.status = data[pos + 5]
            self._settle_settings(head)
            self._update_pass()
            # Replies the proxy owes itself (CloseComplete for a client's Close just before
            # the Sync): their turn has come.
            owed = b"".join(e[2] for e in head.expect  # type: ignore[misc]
                            if e[1] == SYNTH) if head.expect else b""
            if not head.hide_z and self.stats is not None:
                self.stats.queries += 1
                self.stats.query_seconds.observe(self.clock() - head.t0)
            if head.hide_z:  # our own request's answer; the client's goes on
                if head.heal:  # the client's batch goes again, in front of anything newer
                    assert head.replay is not None
                    self.cbuf[:0] = head.replay.data
                    self._replaying = self._replay_ready = True
                    return None
                if head.failed and head.split:
                    self.skip_to_sync = True  # the rest of the client's batch must not run
                return owed or None
            if owed:
                return owed + bytes(frame)
            if head.await_first and head.drop == 0:
                return codec.empty_query_response() + bytes(frame)
            return frame
        if t == _E:
            if head is None and self._is_fatal(frame):
                self.unsolicited_fatal = bytes(frame)
                return None
            code = self._error_code(frame)
            if self.stats is not None:
                self.stats.error(code.decode("ascii", "replace"))
            if head is None:
                raise ServerProtocolError("ErrorResponse with no request outstanding")
            if head.ours:
                # The proxy's own reset or encoding switch failed: the session is not known
                # to be empty (or in the client's encoding), so nobody may use it.
                raise ServerProtocolError("pgtenant's reset of the server session failed: "
                                          + self._error_message(frame))
            self.copy_in = False  # an error ends COPY-in mode; later copy messages are stray
            if head.unnamed_parse:
                # That Parse may have been skipped: the server's unnamed statement is not
                # known to be the client's; parse it again before it is used.
                self._unnamed_here = False
            if head is not None:
                head.failed = True
                if head.expect is not None:
                    entry = head.expect[0] if head.expect else None
                    if (entry is not None and entry[0] == K_BIND and isinstance(entry[2], bytes)
                            and code == _PLAN_CHANGED):
                        # "cached plan must not change result type" after DDL: the statement
                        # is stale here, so the next Parse or Bind prepares it again.
                        self.prepared[entry[2]] = False
                        replay = head.replay
                        if (replay is not None and replay.entry is entry and replay.complete
                                and len(self.pending) == 1):
                            # Provably harmless to retry (replay.py): hide the error, and
                            # hold newer client requests until the batch went again.
                            head.heal = head.hide_z = True
                            self._mark_txn(head)
                        # Otherwise the client sees the error and re-prepares (asyncpg and
                        # pgjdbc do it by themselves): its Parse must then really re-parse.
                    # Postgres now skips the batch up to its Sync: what was not answered yet
                    # never ran. Statements whose Parse was skipped or failed are stale.
                    for kind, action, data_ in head.expect:
                        if (kind == K_PARSE and isinstance(data_, bytes) and action != SYNTH
                                and data_ in self.prepared):
                            self.prepared[data_] = False  # may or may not exist now
                    if any(action == DROP for _, action, _ in head.expect):
                        # The injection failed or was skipped: its statement may be gone (a
                        # client's DEALLOCATE, a failed Parse). Close and re-Parse next time.
                        self.ctx_state = CTX_UNKNOWN
                    head.expect.clear()
                head.drop = 0
                head.await_first = False
                self._update_pass()
                if head.heal:
                    return None
                if head.shift:
                    return self._shift_error(bytes(frame[5:]), head.shift)
            return frame
        if t == _S:
            name, value = codec.parse_parameter_status(bytes(frame[5:]))
            lname = name.lower()
            # The statement guard reads SQL the way Postgres lexes it only with these: a
            # change made by any path the guard did not see must end this link, before any
            # text lexed the other way is judged (the server's word over the model's).
            if lname == "standard_conforming_strings" and value.lower() != "on":
                raise ServerProtocolError("the server reported standard_conforming_strings "
                                          "off, which the statement guard cannot read")
            if lname == "client_encoding" and encoding_key(value) in _UNSAFE_ENCODINGS:
                raise ServerProtocolError(f"the server reported client_encoding {value!r}, "
                                          "which the statement guard cannot read")
            if head is not None and head.ours:
                return None  # the proxy's own reset or encoding switch
            if name in HIDDEN_PARAMETERS:
                return None
            if name == "client_encoding":
                self.encoding = self.server_encoding = value
                return frame
            if lname in self.managed and not (
                head is not None and any(n.lower() == lname for n, _ in head.sets)
            ):
                return None  # the injected value coming or going: the client knows its own
            return frame
        if t == _G or t == _W:
            self._copy_started(head)
            return frame
        # Slow path for ordinary frames: the head segment is dropping or awaiting a reply.
        if head is None:
            if t in _SERVER_ASYNC:
                return frame  # a notice or notification between requests
            raise ServerProtocolError(f"message {chr(t)!r} with no request outstanding")
        if head.expect is not None:
            return self._expected(head.expect, t, frame)
        if head.drop:
            if t in _SERVER_ASYNC:
                return frame if t == _A else None
            head.drop -= 1
            self._update_pass()
            return None
        if t not in _SERVER_ASYNC:
            head.await_first = False
            self._update_pass()
        return frame

    def _copy_started(self, head: Segment | None) -> None:
        """The server entered COPY-in mode (CopyInResponse): until CopyDone/CopyFail it
        ignores Sync and Flush, and ends the COPY with an error at any other message.

        A request that may start a COPY holds what the client sends after it (pump_client),
        so the COPY's segment is the only one in flight and its own Sync, if the client sent
        it before the copy data (libpq does), is the only Sync the server ignores: that
        segment is open again and the Sync after CopyDone closes it.

        Raises: ServerProtocolError when the COPY is not where the model can account for
        it (more requests in flight, or a request not known to possibly start a COPY).
        """
        if head is None or len(self.pending) > 1 or (head.extended and head.expect is None):
            raise ServerProtocolError("COPY started where pgtenant did not expect one")
        self.copy_in = True
        if head.extended and head.synced and head.expect is not None:
            later = list(head.expect)[1:]  # after the Execute that started it
            if not any(action != SYNTH for _, action, _ in later):
                head.synced = False
                self.open_extended = True

    def _answer_locally(self, sql: bytes) -> bytes | None:
        """DEALLOCATE of the client's statements and DISCARD ALL concern only the client's
        own view (renamed statements, replayed settings): the proxy answers them itself.

        Returns: CommandComplete + ReadyForQuery to send, or None to send ``sql`` on (then
        nothing was changed). Call it only when no reply is owed, so the answer is in order.
        """
        command = local_command(sql)
        if command is None or (self.attached and self.status != _I):
            return None
        kind, name = command
        if kind == "deallocate":
            if name is None or name.encode() not in self._client_stmts:
                return None  # an SQL PREPAREd name, or an unknown one: Postgres answers
            del self._client_stmts[name.encode()]
            self._stmt_txn.pop(name.encode(), None)
            self._stmt_sets.pop(name.encode(), None)
            tag = "DEALLOCATE"
        elif kind == "deallocate_all":
            self._client_stmts.clear()
            tag = "DEALLOCATE ALL"
        else:
            self._client_stmts.clear()
            self._portal_txn.clear()
            self.injection = self.injection.with_settings(self._startup_settings)
            self.managed = {n.lower() for n, _ in self._startup_settings}
            tag = "DISCARD ALL"
        return codec.command_complete(tag) + codec.ready_for_query(b"I")

    def _settle_settings(self, seg: Segment) -> None:
        """At a ReadyForQuery: keep the plain SETs that took effect, as Postgres would, and
        pin the server when session state was made (a failed attempt pins nothing)."""
        if seg.pins and not seg.failed:
            self.pinned = True
        if seg.sets and not seg.failed:
            self._txn_sets.extend(seg.sets)
        if seg.rollback or self.status == _E_STATUS:
            self._txn_rolled_back = True
        if self.status != _I:
            return
        sets, rolled_back = self._txn_sets, self._txn_rolled_back
        self._txn_sets, self._txn_rolled_back = [], False
        if not sets or rolled_back:
            return
        current = {name.lower(): (name, value) for name, value in self.injection.settings}
        for name, value in sets:
            if name.lower() == "client_encoding":
                continue  # session state of the server, followed through ParameterStatus
            if value is None:
                current.pop(name.lower(), None)
            else:
                current[name.lower()] = (name, value)
        self.injection = self.injection.with_settings(tuple(current.values()))
        self.managed = set(current)

    def _expected(self, expect: deque[list[object]], t: int,
                  frame: memoryview) -> bytes | memoryview | None:
        """One reply of an extended segment, matched against the request it answers."""
        entry = expect[0] if expect else None
        if entry is None:  # nothing owed (a Flush-less oddity): the client's, then
            return frame
        forward = entry[1] == FWD
        if t in _SERVER_ASYNC:
            return frame if forward or t == _A else None
        kind = entry[0]
        assert isinstance(kind, int)
        if t not in TERMINAL_OF[kind]:
            return frame if forward else None
        expect.popleft()
        owed = []
        while expect and expect[0][1] == SYNTH:
            owed.append(expect.popleft()[2])
        if not forward and expect and expect[0][1] == FWD:  # the proxy's part is over
            self._forward_rest(expect)
        self._update_pass()
        if owed:
            return (bytes(frame) if forward else b"") + b"".join(owed)  # type: ignore[arg-type]
        return frame if forward else None

    def _forward_rest(self, expect: deque[list[object]]) -> None:
        """After the proxy's own replies of a synced batch: when everything still owed is
        forwarded as it comes and names no statement of ours, stop matching replies one by
        one (``expect = None``: only ReadyForQuery, errors and ParameterStatus get a look).

        Entries naming a statement (``data``) stay matched: an error must mark the statement
        stale or heal a plan change (replay.py), and that needs to know which request
        failed. A batch still open (no Sync yet) may get more requests, so it stays too.
        """
        head = self.pending[0]
        if (head.expect is expect and head.synced and head.replay is None
                and not head.may_copy
                and all(e[1] == FWD and e[2] is None for e in expect)):
            head.expect = None

    @staticmethod
    def _error_code(frame: memoryview) -> bytes:
        return dict(codec.parse_error_fields(bytes(frame[5:]))).get(ord("C"), b"")

    @staticmethod
    def _error_message(frame: memoryview) -> str:
        fields = dict(codec.parse_error_fields(bytes(frame[5:])))
        return fields.get(ord("M"), b"").decode("utf-8", "replace")

    @staticmethod
    def _is_fatal(frame: memoryview) -> bool:
        fields = dict(codec.parse_error_fields(bytes(frame[5:])))
        return fields.get(ord("V"), fields.get(ord("S"), b"")) in (b"FATAL", b"PANIC")

    @staticmethod
    def _shift_error(body: bytes, shift: int) -> bytes:
        fields = codec.parse_error_fields(body)
        out: list[tuple[int, bytes]] = []
        for code, value in fields:
            if code == ord("P"):
                try:
                    position = int(value) - shift
                except ValueError:
                    continue
                if position < 1:
                    continue  # inside the injected prefix: the client has no such position
                value = str(position).encode()
            out.append((code, value))
        return codec.frame(_E, codec.encode_error_fields(out))
