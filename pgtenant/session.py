"""The transaction loop of one logged-in client: its binding to a server.

Owns the server side of a client connection: the ``Link`` of the session, the server
attached for the current transaction (or the wait for one), pinning, the "wait", "buffer"
and "backend" reasons to stop reading the client, and the per-transaction metrics. It talks
to its client connection (client.py) only through ``SessionClient``: fail, close, log.

Where a transaction starts: ``Session.pump``. When the client's Link needs a server for the
next request (NEED_SERVER), ``_request_server`` asks the pool and ``_attach`` binds the
server to this session, at once or, after a wait, in ``server_assigned``.

Where a server is released: ``Session._maybe_release``, after every chunk of server replies
(``server_data``) and after client bytes that owe no reply (``pump``). It gives the server
back only when the Link says ``can_release`` (ReadyForQuery 'I', no reply owed, no COPY
open) and the session is not pinned; if the transaction left session state behind
(``session_dirty``) the server is closed instead, so nothing follows it to another tenant
(ARCHITECTURE §4, fail closed); if the server reported temporary objects (``temp_made``)
it is emptied with DISCARD TEMP first, or closed when that fails. A clean server given back
while nobody waits is parked (``Pool.park``, issue 16): an idle server like any other, that
this session's next ``_request_server`` takes back first, after the same checks (draining,
revocation, then the pool's: pause, holds, caps); the Link is detached all the same, so
between transactions the session holds no server whether its last one is parked or not.
The other ends:
``_leave_server`` (the client goes away: release, roll back then reuse, or close) and
``_drop_server`` (a server out of sync, or one whose session state ends with the client:
closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .cancel import after_cancels
from .errors import (
    AdminShutdown,
    ProxyError,
    QueryCanceled,
    ServerProtocolError,
    ServerUnavailable,
)
from .identity.registry import Registry
from .login import token_revoked
from .protocol import codec
from .protocol.listen import Listens
from .protocol.tracker import HOLD, NEED_SERVER, TERMINATE, Link
from .server import ServerConnection
from .stats import LabelStats, TenantStats

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["CLIENT_BUFFER_HIGH", "Session", "SessionClient", "SessionServices"]

log = logging.getLogger("pgtenant.client")
# Empties the session's temp schema; not DISCARD ALL: the server keeps its prepared
# statements and settings for the same tenant's next transaction.
_DISCARD_TEMP = "DISCARD TEMP"
# Stop reading from a client whose unhandled bytes pile up while it waits or holds.
CLIENT_BUFFER_HIGH = 1 << 20


class SessionClient(Protocol):
    """The client connection, as its session drives it (client.ClientConnection)."""

    @property
    def peer_host(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def writing_paused(self) -> bool: ...  # the client's socket buffer is full

    def fail(self, error: ProxyError) -> None: ...  # a FATAL error, then disconnect
    def close(self, reason: str) -> None: ...
    def log_fields(self, **more: object) -> dict[str, dict[str, object]]: ...


class TenantPins(Protocol):
    """The tenant's count of pinned servers (limits.ClientLimits)."""

    def pin(self, key: object, delta: int) -> None: ...
    def may_pin(self, key: object) -> bool: ...


class SessionServices(Protocol):
    """What a session uses of the proxy (client.ClientServices, read when used: the app
    swaps ``stopping`` on stop)."""

    @property
    def stopping(self) -> bool: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def limits(self) -> TenantPins: ...


class Session:
    """The server side of one logged-in tenant client; see the module docstring.

    It is the pool's ``Waiter`` and the attached server's ``ServerPeer``.
    """

    # One per logged-in client, idle or not: no __dict__ (issue 16).
    __slots__ = ("_attached_at", "_notify_drop_logged", "_pause_reasons", "_pin_counted",
                 "client", "closed", "last_server_data", "link", "listens", "max_servers",
                 "pool", "server", "services", "stats", "tenant_key", "tenant_stats",
                 "transport", "wait_started", "waiting")

    def __init__(self, client: SessionClient, services: SessionServices,
                 transport: asyncio.Transport, *, pool: Pool,
                 link: Callable[[Callable[[], bool]], Link], tenant_key: object,
                 max_servers: int, stats: LabelStats, tenant_stats: TenantStats):
        """``link`` builds the session's Link around its pin check (``may_pin``)."""
        self.client = client
        self.services = services
        self.transport = transport  # the client's
        self.pool = pool
        self.tenant_key = tenant_key  # pool.Waiter: fairness, and the tenant's server cap
        self.max_servers = max_servers
        self.stats = stats
        self.tenant_stats = tenant_stats
        self.link = link(self.may_pin)
        self.link.stats = stats
        self.link.clock = time.monotonic
        self.server: ServerConnection | None = None
        self.waiting = False
        self.wait_started = 0.0
        self.closed = False
        self.last_server_data = time.monotonic()
        self._attached_at = 0.0
        self._pin_counted = False  # its server is pinned and counted in limits.tenant_pinned
        # Why reading from the client is paused: "wait" (for a server), "buffer" (unhandled
        # bytes piling up), "backend" (the server's socket buffer is full). Reading resumes
        # only when no reason is left, so one cause cannot undo another's backpressure. A
        # tuple of at most three: an empty set would cost every idle client 216 bytes.
        self._pause_reasons: tuple[str, ...] = ()
        # LISTEN/NOTIFY (protocol/listen.py, notify.py): only where the database has a
        # signing key, which makes channel names private to a tenant (else refused).
        self.listens: Listens | None = None
        self._notify_drop_logged = False
        notifier = pool.notifier
        self.link.notify_stats = notifier.stats
        if pool.signing_key is not None:
            ident = self.link.injection.context.identity
            self.listens = Listens(pool.signing_key, str(ident.org_id), ident.tenant_type,
                                   _Registrar(self), notifier.stats)
            self.link.listens = self.listens

    def __repr__(self) -> str:
        return repr(self.client)

    def may_pin(self) -> bool:
        """Whether this session may pin a server: it already does, or its tenant is under
        max_pinned_servers (login.pin_capped)."""
        return self._pin_counted or self.services.limits.may_pin(self.tenant_key)

    @property
    def has_running_transaction(self) -> bool:
        """Whether work is under way on a server: an open transaction, or a request whose
        reply is still owed (see ClientConnection.has_running_transaction)."""
        link = self.link
        return (not self.closed and self.server is not None
                and (link.in_transaction or bool(link.pending)))

    # ------------------------------------------------------------------ the client side

    def client_data(self, data: bytes) -> None:
        """Bytes from the client."""
        link = self.link
        self.stats.bytes_received += len(data)
        link.cbuf += data
        if self.server is not None or not self.waiting:
            self.pump()
        elif len(link.cbuf) > CLIENT_BUFFER_HIGH:
            self._pause_reading("buffer")

    def client_backpressure(self, paused: bool) -> None:
        """The client reads slower than its server writes (or caught up again)."""
        if not paused:
            self._flush_notifications()
        if self.server is not None:
            if paused:
                self.server.pause_reading()
            else:
                self.server.resume_reading()

    def pump(self) -> None:
        """Run the client's requests through the Link; a transaction starts here."""
        link = self.link
        if self.listens is not None and self.listens.waiting:
            return  # the next reply waits for the listener (listener_caught_up pumps)
        while True:
            try:
                to_server, to_client, outcome = link.pump_client()
            except ProxyError as exc:
                self.client.fail(exc)
                return
            except Exception as bug:  # a bug must cost one client, never the proxy
                log.exception("%r: internal error handling client data", self)
                self.client.fail(ProxyError(f"pgtenant internal error: {bug!r}"))
                return
            if to_server:
                assert self.server is not None
                self.server.write(to_server)
            if to_client:
                self._write(to_client)
            if outcome == NEED_SERVER:
                if self._request_server():
                    continue
                return
            if outcome == TERMINATE:
                self.client.close("client sent Terminate")
                return
            if outcome == HOLD and len(link.cbuf) > CLIENT_BUFFER_HIGH:
                self._pause_reading("buffer")
            elif self._pause_reasons:
                self._resume_reading("buffer")
            if not link.pending:  # else replies are owed: not releasable yet
                self._maybe_release()
            return

    def cancel_request(self) -> ServerConnection | None:
        """Returns: the server a CancelRequest of this client goes to, or None; a wait for a
        server is ended instead (see ClientConnection.cancel_request)."""
        if self.waiting:
            self.pool.cancel_wait(self)
            self.pool_failed(QueryCanceled("canceling statement due to user request"))
            return None
        server, link = self.server, self.link
        if server is None or server.login is None or not link.pending:
            return None
        return server

    # ------------------------------------------------------------------ getting a server

    def _request_server(self) -> bool:
        """Returns: True when a server is attached now; False when we wait (or failed)."""
        services = self.services
        if services.stopping:
            # Draining (SIGTERM): this is a transaction boundary, and the next transaction
            # does not start; a client retries elsewhere on 57P01.
            self.client.fail(AdminShutdown("pgtenant is shutting down"))
            return False
        # A token revoked since login ends its sessions at their next transaction (the
        # registry hears revocations through LISTEN; see identity/registry.py).
        if services.registry.is_revoked(self.link.injection.context.identity.token_id):
            self.client.fail(token_revoked())
            return False
        try:
            server = self.pool.acquire(self)
        except ProxyError as exc:
            self.client.fail(exc)
            return False
        if server is None:
            self.waiting = True
            self.wait_started = time.monotonic()
            self._pause_reading("wait")
            return False
        self._waited()
        self._attach(server)
        return True

    def _waited(self, seconds: float = 0.0) -> None:
        """Counts a request's wait for a server (0: it had one at once, the common case:
        no sum to add to, and no bucket to look for)."""
        if seconds:
            self.stats.wait_seconds.observe(seconds)
            self.tenant_stats.wait_total += seconds
        else:
            self.stats.wait_seconds.observe_zero()
        self.tenant_stats.wait_count += 1

    def _attach(self, server: ServerConnection) -> None:
        self.server = server
        self._attached_at = time.monotonic()
        server.peer = self
        # A server that last ran another tenant's transactions is emptied before this
        # client's first request (Link._prelude): by construction, whatever that tenant left
        # in the session (settings, statements, sequence state...) is gone.
        key = self.link.tenant_key
        reset = server.last_tenant is not None and server.last_tenant != key
        server.last_tenant = key
        if reset:
            self.stats.server_resets += 1
        self.link.attach(server.ctx_state, server.prepared, server.client_encoding,
                         reset=reset, reset_encoding=server.login_encoding)
        if self.client.writing_paused:
            server.pause_reading()
        else:
            server.resume_reading()

    def server_assigned(self, server: ServerConnection) -> None:
        """Pool callback: a waited-for server is ours (synchronous handoff, always accepted)."""
        self.waiting = False
        if self.closed:
            self.pool.release(server)
            return
        self._waited(time.monotonic() - self.wait_started)
        self._attach(server)
        self._resume_reading("wait")
        self.pump()

    def pool_failed(self, error: ProxyError) -> None:
        """Pool callback: no server will come for this transaction.

        The waiting segment gets an ERROR (not FATAL): like a statement timeout, the client
        keeps its connection and may retry.
        """
        self.waiting = False
        if self.closed:
            return
        self._waited(time.monotonic() - self.wait_started)
        self.stats.error(error.sqlstate)
        client = self.client
        log.warning("transaction refused: client=%s user=%s db=%s tenant=%s reason=%s: %s",
                    client.peer_host, client.user, client.database,
                    self.link.injection.context.identity.slug, error.reason, error.message,
                    extra=client.log_fields(event="error", reason=error.reason,
                                            sqlstate=error.sqlstate, error=error.message))
        self._write(self.link.fail_segment(codec.error_response(
            error.sqlstate, error.message, detail=error.detail, hint=error.hint)))
        self._resume_reading("wait")
        self.pump()

    # ------------------------------------------------------------------ the server side

    def server_data(self, data: bytes) -> None:
        link = self.link
        self.last_server_data = time.monotonic()
        try:
            chunks, resume = link.feed_server(data)
        except ServerProtocolError as exc:
            # The server and the proxy's model of it disagree: that server is closed and
            # this client ended; nothing more of that server reaches anyone.
            log.warning("%r: closing its server: %s", self, exc.message)
            self._drop_server(out_of_sync=True)
            self.client.fail(ServerUnavailable(f"server connection lost: {exc.message}"))
            return
        except Exception as bug:  # a bug: cost one client only
            log.exception("%r: error handling backend data", self)
            self._drop_server(out_of_sync=True)
            self.client.fail(ServerUnavailable(f"server connection lost: {bug}"))
            return
        if link.pinned and not self._pin_counted:
            self._pin_counted = True
            self.services.limits.pin(self.tenant_key, +1)
        if chunks:
            self.transport.writelines(chunks)
            stats = self.stats
            for chunk in chunks:
                stats.bytes_sent += len(chunk)
        if resume:
            self.pump()
        else:
            self._maybe_release()

    def server_lost(self, exc: Exception | None) -> None:
        """The attached server's socket closed under us."""
        self._unpin()
        self.server = None
        self.link.detach()
        if self.link.unsolicited_fatal is not None:  # Postgres's own words, then close
            self._write(self.link.unsolicited_fatal)
            self.client.close("server terminated the session")
            return
        self.client.fail(ServerUnavailable(
            "server connection lost in the middle of a transaction; its outcome is unknown"
        ))

    def server_pause_writing(self) -> None:
        self._pause_reading("backend")

    def server_resume_writing(self) -> None:
        self._resume_reading("backend")

    # ------------------------------------------------------------------ giving it back

    def _maybe_release(self) -> None:
        """The release rule (ARCHITECTURE §4): back to the pool at a provably clean
        transaction boundary; closed if session state would outlive the transaction."""
        link, server = self.link, self.server
        if server is None or not link.can_release or link.pinned:
            return
        dirty, temp_made = link.session_dirty, link.temp_made
        server.client_encoding = link.server_encoding
        server.ctx_state = link.detach()
        self.server = None
        self._transaction_done()
        if self._pause_reasons:  # that server's buffer is no longer our concern
            self._resume_reading("backend")
        if dirty:
            # Session state (LISTEN, WITH HOLD, temp objects, session SET, named statements...)
            # would follow the server to the next tenant: close it instead (fail closed).
            self.pool.discard(server)
        elif temp_made:
            self.stats.temp_resets += 1
            # The server reported temporary objects (an ON COMMIT DROP table, or one a
            # function made where the classifier could not see): none may reach the next
            # client, of this tenant or another. Emptied first, or closed if that fails.
            after_cancels(server, self._discard_temp)
        elif server.cancels_in_flight:
            after_cancels(server, self._park)
        else:  # after_cancels's own test, inline: two calls fewer per transaction
            self.pool.park(server, self)
        self._flush_notifications()

    def _discard_temp(self, server: ServerConnection) -> None:
        """Empty the server's temp schema, then give it back (closed if that fails).

        A method, not a lambda in _maybe_release: compiled (mypyc), a nested function makes
        its caller build a closure environment on every call, used or not."""
        self.pool.release_dirty(server, _DISCARD_TEMP)

    def _park(self, server: ServerConnection) -> None:
        """Give back a clean server, first claim kept while nobody else needs it (issue 16:
        the next transaction takes it back in O(1) after the same admission checks; see
        pool_state's "Parking"). A client gone meanwhile (cancels in flight) keeps none."""
        if self.closed:
            self.pool.release(server)
        else:
            self.pool.park(server, self)

    def _transaction_done(self) -> None:
        """The server goes back (or away): one transaction, in PgBouncer's sense, ended."""
        self.stats.transactions += 1
        self.stats.transaction_seconds.observe(time.monotonic() - self._attached_at)
        self.tenant_stats.transactions += 1

    def _unpin(self) -> None:
        """The pinned server is gone: it no longer counts against the tenant's cap."""
        if self._pin_counted:
            self._pin_counted = False
            self.services.limits.pin(self.tenant_key, -1)

    def _drop_server(self, *, out_of_sync: bool) -> None:
        self._unpin()
        server, self.server = self.server, None
        if server is None:
            return
        server.ctx_state = self.link.detach()
        self._transaction_done()
        self._resume_reading("backend")
        self.pool.discard(server, out_of_sync=out_of_sync)

    def abort(self) -> None:
        """The client is failing: a server inside a transaction is closed (its outcome is
        unknown to the client, and work may still run there)."""
        if self.server is not None and self.link.in_transaction:
            self._drop_server(out_of_sync=True)

    def close(self) -> None:
        """The client is going away: stop waiting, and apply the release rule to its
        server (``_leave_server``)."""
        self.closed = True
        if self.waiting:
            self.pool.cancel_wait(self)
            self.waiting = False
        if self.listens is not None:
            self.listens.close()  # its channels go with it
        self._leave_server()
        self.pool.unpark(self)  # a server it parked is anyone's now

    def _leave_server(self) -> None:
        """Apply the release rule for a client that is going away (ARCHITECTURE §4)."""
        server, link = self.server, self.link
        if server is None:
            return
        in_flight = bool(link.pending) or link.open_extended or link.held
        if in_flight:
            log.warning("%r left with requests in flight; closing its server", self)
            self._drop_server(out_of_sync=True)  # and cancel what still runs there
        elif link.session_dirty or link.pinned:  # its session state ends with the client
            self._drop_server(out_of_sync=False)
        elif link.can_release:
            self._maybe_release()
        else:
            # Open transaction block, nothing in flight: roll it back, then reuse.
            self.server = None
            server.ctx_state = link.detach()
            self._transaction_done()
            server.client_encoding = ""  # the rollback may revert a SET: switch next time
            # Temp objects of earlier transactions never outlive them here (see
            # _maybe_release); ROLLBACK drops this one's, DISCARD TEMP whatever committed.
            sql = "ROLLBACK"
            if link.temp_made:
                self.stats.temp_resets += 1
                sql += "; " + _DISCARD_TEMP
            after_cancels(server, lambda s: self.pool.release_dirty(s, sql))

    # ------------------------------------------------------------------ LISTEN/NOTIFY

    def set_notify_pid(self, pid: int) -> None:
        """The client's BackendKeyData pid: the pid of its own notifications."""
        if self.listens is not None:
            self.listens.pid = pid

    @property
    def notify_pid(self) -> int:
        """notify.Subscriber: the pid other clients see on this client's NOTIFYs."""
        return self.listens.pid if self.listens is not None else 0

    def _between_transactions(self) -> bool:
        """Whether a notification may go to the client now, as Postgres would send it: no
        transaction open, no reply owed or coming, and the client reading."""
        link = self.link
        return (not self.waiting and not self.client.writing_paused
                and (self.server is None or (link.can_release and not link.held)))

    def notified(self, frames: list[bytes]) -> None:
        """notify.Subscriber: NotificationResponses for this client; sent now (in one
        write) when it is between transactions, else queued for its next ReadyForQuery
        'I'."""
        listens = self.listens
        if listens is None or self.closed:
            return
        if not listens.queue and not listens.waiting and self._between_transactions():
            if listens.stats is not None:
                listens.stats.delivered += len(frames)
            self._write(b"".join(frames))
            return
        for frame in frames:
            if not listens.enqueue(frame) and not self._notify_drop_logged:
                self._notify_drop_logged = True  # once per client: a flood must not flood
                log.warning("%r: its notification queue is full (it does not read them): "
                            "notifications dropped", self)

    def listener_caught_up(self) -> None:
        """notify.Subscriber: the listener hears the channel of a LISTEN whose answer waits,
        or heard the NOTIFY whose COMMIT's ReadyForQuery waits."""
        listens = self.listens
        if listens is None or not listens.waiting or self.closed:
            return
        self._write(listens.confirmed())
        self._flush_notifications()
        self.pump()

    def _flush_notifications(self) -> None:
        listens = self.listens
        if (listens is not None and listens.queue and not listens.waiting and not self.closed
                and self._between_transactions()):
            self._write(listens.flush())

    # ------------------------------------------------------------------ the client's socket

    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)
            self.stats.bytes_sent += len(data)

    def _pause_reading(self, reason: str) -> None:
        paused = bool(self._pause_reasons)
        if reason not in self._pause_reasons:
            self._pause_reasons += (reason,)
        if not paused and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons = tuple(r for r in self._pause_reasons if r != reason)
        if not self._pause_reasons and not self.transport.is_closing():
            self.transport.resume_reading()


class _Registrar:
    """protocol/listen.py's Registrar for one session: the database's notify.Notifier,
    with the session as the subscriber and its attached server's pid for its NOTIFYs."""

    __slots__ = ("_session",)

    def __init__(self, session: Session):
        self._session = session

    def subscribe(self, mapped: str, channel: str) -> bool:
        session = self._session
        return session.pool.notifier.subscribe(session, mapped, channel)

    def unsubscribe(self, mapped: str) -> None:
        session = self._session
        session.pool.notifier.unsubscribe(session, mapped)

    def notifying(self, mapped: str, payload: bytes) -> None:
        session = self._session
        server = session.server
        if server is not None and server.login is not None:
            session.pool.notifier.expect(server.login.backend_pid, mapped, payload, session)

    def not_notified(self, mapped: str, payload: bytes) -> None:
        session = self._session
        server = session.server
        if server is not None and server.login is not None:
            session.pool.notifier.unexpect(server.login.backend_pid, mapped, payload)

    def committed(self, mapped: str, payload: bytes) -> bool:
        session = self._session
        server = session.server
        if server is None or server.login is None:
            return False
        return session.pool.notifier.await_echo(server.login.backend_pid, mapped, payload,
                                                session)
