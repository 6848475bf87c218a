"""The per-client link tracker: one client's protocol state and its link to a server.

Owns nothing of its own but the composition: ``Link`` is the front the rest of the proxy
uses (client.py feeds bytes in and writes what comes out; this never touches a socket), built
from parts that each own one piece of state, in dependency order:

* ledger.py: the replies owed by the attached server, segment by segment, and its status;
* prepared.py: prepared statements (renaming, per-server LRU, the context statement);
* settings.py: the client's settings replayed with each context, encodings, session state;
* frontend.py: client -> server framing, segments, injection and rewriting;
* backend.py: server -> client framing, reply matching, errors and healing.

Theory of operation (the whole; each module has its part)
---------------------------------------------------------
A *segment* is the unit the backend answers with exactly one ReadyForQuery. The frontend
pushes the segments sent to the current server into the ledger; the backend pops one per
``Z`` and checks every frame in between against what the segment owes. The first frame of a
segment decides whether a server is needed (``NEED_SERVER``), whether the context is injected
(only when the server is *known* to be outside a transaction block) or the pump must wait for
replies in flight (``HOLD``), and what the segment owes.

Invariants: a server may be released only when nothing is pending, the last status is ``I``,
no extended batch is open and no server frame is half read (``can_release``), and it is not
pinned. Injected replies never reach the client; SYNTH replies are emitted exactly when
everything before them has been answered.

The server is the source of truth (issue #10); SQL text may only make the tracker more
careful:

* The context is skipped only on a status the server reported with nothing in flight
  (frontend.py, ``_inject_decision``); with segments in flight that may change the status,
  the next one waits (HOLD): a wrong guess costs a pause, never a request without context.
* Every reply is matched against what was sent: a ReadyForQuery before what a segment owes,
  a frame with nothing outstanding, or a COPY the model cannot place raise
  ServerProtocolError, and the owner closes that server and ends the client (backend.py).
* COPY-in mode is what the server said (CopyInResponse), not what the client sent.
* What the tracker records at send time and the server may not have done (a Parse skipped
  after an error) is re-established before it is relied on (prepared.py, ``ensure_unnamed``).
* A server that last served another tenant is emptied (DISCARD ALL) before the next
  request (``attach(reset=True)``), so nothing of one tenant's session reaches another.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from .backend import Backend
from .constants import TXN_IDLE
from .frontend import HOLD, IDLE, NEED_SERVER, TERMINATE, Frontend, Pump
from .inject import Injection
from .ledger import Ledger, Segment
from .listen import Listens
from .prepared import CTX_NONE, CTX_READY, CTX_UNKNOWN, PreparedStatements
from .refusal import StatementPolicy
from .settings import HIDDEN_PARAMETERS, SessionSettings

if TYPE_CHECKING:
    from ..stats import LabelStats, NotifyStats

__all__ = [
    "CTX_NONE",
    "CTX_READY",
    "CTX_UNKNOWN",
    "HIDDEN_PARAMETERS",
    "HOLD",
    "IDLE",
    "NEED_SERVER",
    "TERMINATE",
    "Link",
    "Pump",
    "Segment",
]


class Link:
    """Client session protocol state plus the state of the link to the attached server.

    ``pump_client()`` (Frontend.pump) handles the client bytes buffered in ``cbuf`` and
    returns (bytes for the server, bytes for the client, a ``Pump`` outcome);
    ``feed_server(data)`` (Backend.feed) returns (chunks for the client, whether a held
    client segment may now proceed). Both are the parts' bound methods, stored on the
    instance so that the hot path pays no extra call.
    """

    __slots__ = ("_back", "_front", "_ledger", "_settings", "_stmts", "cbuf", "fail_segment",
                 "feed_server", "pending", "pump_client", "tenant_key")  # issue 16: no __dict__

    def __init__(self, injection: Injection, max_message_size: int,
                 guard: StatementPolicy | None = None,
                 outside_txn: Callable[[bytes], bool] | None = None,
                 max_prepared: int = 200, client_encoding: str = "UTF8"):
        # Which tenant's state a server carries once this client used it: a server attached
        # with another tenant's key is reset first (attach(reset=True)).
        self.tenant_key = injection.tenant_key
        ctx = injection.context
        self._ledger = ledger = Ledger()
        self._stmts = PreparedStatements(ledger, max_prepared,
                                         ctx.search_path_value.encode())
        self._settings = SessionSettings(injection, client_encoding)
        self._front = Frontend(ledger, self._stmts, self._settings, max_message_size, guard,
                               outside_txn)
        self._back = Backend(ledger, self._stmts, self._settings, self._front)
        self.cbuf = self._front.cbuf  # client bytes not yet handled (never rebound)
        ledger.release()  # no server yet: no FIFO of its own (issue 16)
        # Segments in flight: the ledger's, rebound with it at attach and detach only.
        self.pending = ledger.pending
        self.pump_client: Callable[[], tuple[bytes, bytes, Pump]] = self._front.pump
        self.feed_server: Callable[[bytes], tuple[list[bytes | memoryview], bool]] = (
            self._back.feed)
        self.fail_segment: Callable[[bytes], bytes] = self._front.fail_segment

    # ------------------------------------------------------------------ attachment

    def attach(self, ctx_state: int, prepared: OrderedDict[bytes, int] | None = None,
               server_encoding: str = "UTF8", *, reset: bool = False,
               reset_encoding: str = "UTF8") -> None:
        """A server was attached; it is idle (pool invariant).

        ``reset``: it last served another tenant, so its session is emptied (DISCARD ALL)
        before this client's first request; ``reset_encoding`` is its client_encoding then.
        """
        self._ledger.reset()
        self.pending = self._ledger.pending
        self._stmts.attach(prepared, ctx_state)
        self._settings.attach(server_encoding, reset, reset_encoding)
        self._front.attach()

    def detach(self) -> int:
        """The server goes away (released or closed). Returns: its context-statement state."""
        self._front.attached = False
        self._ledger.release()
        self.pending = self._ledger.pending
        return self._stmts.detach()

    @property
    def can_release(self) -> bool:
        """Whether the attached server is provably idle: the release rule of §4."""
        return (
            self._front.attached
            and not self.pending
            and self._ledger.status == TXN_IDLE
            and not self._front.open_extended
            and not self._ledger.leftover
            and not self._ledger.remaining
        )

    @property
    def in_transaction(self) -> bool:
        """Whether the link has work in flight or an open transaction block."""
        return (bool(self.pending) or self._ledger.status != TXN_IDLE
                or self._front.open_extended)

    # ------------------------------------------------------------------ state the owner reads

    @property
    def attached(self) -> bool:
        """Whether a server is attached."""
        return self._front.attached

    @property
    def open_extended(self) -> bool:
        """An extended batch was started and not yet synced."""
        return self._front.open_extended

    @property
    def held(self) -> bool:
        """The last pump stopped with HOLD."""
        return self._front.held

    @property
    def copy_in(self) -> bool:
        """The server is in COPY-in mode."""
        return self._front.copy_in

    @property
    def status(self) -> int:
        """The transaction status of the last ReadyForQuery."""
        return self._ledger.status

    @property
    def session_dirty(self) -> bool:
        """A segment may have left session state: close the server, do not pool it."""
        return self._settings.session_dirty

    @property
    def temp_made(self) -> bool:
        """The server reported a temporary object created in its session: empty its temp
        schema (DISCARD TEMP) before it serves anyone else."""
        return self._settings.temp_made

    @property
    def pinned(self) -> bool:
        """Session state the client relies on: keep the server attached."""
        return self._settings.pinned

    @property
    def server_encoding(self) -> str:
        """The attached server session's client_encoding."""
        return self._settings.server_encoding

    @property
    def encoding(self) -> str:
        """The client's client_encoding."""
        return self._settings.encoding

    @property
    def ctx_state(self) -> int:
        """The state of the proxy's context statement on the attached server."""
        return self._stmts.ctx_state

    @property
    def prepared(self) -> OrderedDict[bytes, int]:
        """The attached server's LRU of global statements (the generation each was prepared
        at, protocol/freshness.py; False: stale)."""
        return self._stmts.server

    @property
    def quiet_parses(self) -> int:
        """How many times the client's unnamed statement was parsed again quietly (its
        Parse may have been skipped by the server): for tests and debugging."""
        return self._stmts.quiet_parses

    @property
    def client_statements(self) -> dict[bytes, tuple[bytes, bytes, bytes]]:
        """The client's named prepared statements (name -> global name, text, types)."""
        return self._stmts.client

    @property
    def refused(self) -> int:
        """Statements refused by the guard so far."""
        return self._front.refused

    @property
    def unsolicited_fatal(self) -> bytes | None:
        """A FATAL the server sent while the client awaited nothing."""
        return self._back.unsolicited_fatal

    # ------------------------------------------------------------------ set by the owner

    @property
    def injection(self) -> Injection:
        """The context (with the client's settings) injected into each transaction."""
        return self._settings.injection

    @injection.setter
    def injection(self, value: Injection) -> None:
        self._settings.injection = value

    @property
    def client_pid(self) -> int:
        """The pid the client's BackendKeyData reported: a session may terminate only its
        own backend, by that pid or pg_backend_pid() (guard.py, redirect.py)."""
        return self._front.client_pid

    @client_pid.setter
    def client_pid(self, value: int) -> None:
        self._front.client_pid = value

    @property
    def guard(self) -> StatementPolicy | None:
        """The statement policy: None to allow, else the refusal message."""
        return self._front.guard

    @guard.setter
    def guard(self, value: StatementPolicy | None) -> None:
        self._front.guard = value

    @property
    def outside_txn(self) -> Callable[[bytes], bool] | None:
        """Whether a refused statement may run outside a transaction block."""
        return self._front.outside_txn

    @outside_txn.setter
    def outside_txn(self, value: Callable[[bytes], bool] | None) -> None:
        self._front.outside_txn = value

    @property
    def max_prepared(self) -> int:
        """The cap of each server's LRU of global statements."""
        return self._stmts.max_prepared

    @max_prepared.setter
    def max_prepared(self, value: int) -> None:
        self._stmts.max_prepared = value

    @property
    def stats(self) -> LabelStats | None:
        """The client's (database, tenant type) counters (metrics.py)."""
        return self._front.stats

    @stats.setter
    def stats(self, value: LabelStats | None) -> None:
        self._front.stats = self._back.stats = value

    @property
    def listens(self) -> Listens | None:
        """The client's LISTEN/NOTIFY state (listen.py); None refuses them."""
        return self._front.listens

    @listens.setter
    def listens(self, value: Listens | None) -> None:
        self._front.listens = self._back.listens = value

    @property
    def notify_stats(self) -> NotifyStats | None:
        """The database's LISTEN/NOTIFY counters (notifications dropped on pooled servers)."""
        return self._back.notify_stats

    @notify_stats.setter
    def notify_stats(self, value: NotifyStats | None) -> None:
        self._back.notify_stats = value

    @property
    def clock(self) -> Callable[[], float]:
        """The owner's monotonic clock (query durations)."""
        return self._ledger.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self._ledger.clock = value

