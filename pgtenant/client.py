"""One client connection: the asyncio adapter around startup, token auth and, once logged
in, its session.

Owns the client socket, the login and the connection's end. Startup parsing is the
sans-I/O generator of ``protocol/startup.py``, driven here by ``_advance``; login checks are
``login.py``'s; cancel keys are ``cancel.py``'s; the proxy's tables reach it as
``ClientServices``. The transaction loop (the server attached for the current transaction,
where a transaction starts and where a server is released) is ``session.py``'s ``Session``,
created at login. This is the one place where exceptions become a FATAL ErrorResponse for
the client (STYLE rule 7).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Final, Protocol
from uuid import UUID

from . import __version__
from .cancel import CancelTable
from .config import Config, TenantTypeConfig, is_loopback
from .errors import (
    AdminShutdown,
    AuthFailed,
    ClientProtocolError,
    ProxyError,
    TooManyConnections,
)
from .guard import Guard
from .identity.context import TenantContext, shared_context
from .identity.registry import Registry
from .identity.throttle import AuthThrottle
from .limits import ClientLimits, login_timeout, session_timeout
from .login import (
    Attempt,
    check_admin_token,
    new_link,
    resolve_tenant,
    served_from,
    tenant_caps,
    token_revoked,
)
from .logs import fields
from .protocol import codec
from .protocol.handshake import Recv, Send
from .protocol.inject import OMITTABLE
from .protocol.startup import (
    MAX_STARTUP,
    Authenticate,
    Cancel,
    Goodbye,
    Identify,
    StartTls,
    Startup,
    StartupRules,
    admin_greeting,
    client_startup,
    greeting,
)
from .server import ServerConnection
from .session import Session
from .stats import LabelStats, Metrics, TenantStats
from .tls import cleartext_token_allowed

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["ClientConnection", "ClientServices", "ClientState", "Console"]


class Console(Protocol):
    """An admin-console session (admin.AdminConsole), as the client drives it: the client
    does not import admin.py (admin lists clients; the app composes both)."""

    def feed(self, data: bytes) -> None: ...
    def close(self) -> None: ...

log = logging.getLogger("pgtenant.client")

# Login failures by cause, for pgtenant_auth_failures_total{reason}.
_AUTH_REASONS: Final = {
    "AuthFailed": "invalid_token", "AuthRefused": "refused", "WrongUser": "wrong_user",
    "UnknownDatabase": "unknown_database", "LoginTimeout": "login_timeout",
    "UnsupportedProtocol": "bad_startup", "InvalidParameter": "bad_startup",
    "ClientProtocolError": "protocol_error", "MessageTooLarge": "protocol_error",
    "ContextError": "no_context", "ProxyError": "too_many_connections",
    "TooManyConnections": "tenant_client_limit", "TooManyLogins": "too_many_logins",
}


@dataclass(slots=True, kw_only=True)
class ClientServices:
    """What a client connection may use of the proxy (built and kept current by the app:
    ``config``, ``guard``, ``throttle`` and ``stopping`` are swapped on reload and stop)."""

    config: Config
    client_tls: ssl.SSLContext | None  # [tls]: SSLRequest is answered 'S'
    pools: Mapping[str, Pool]
    registry: Registry
    metrics: Metrics
    throttle: AuthThrottle
    guard: Guard  # every switch allowed: for is_protected (startup settings)
    guard_for: Callable[[TenantTypeConfig], Guard]  # the statement guard of a tenant type
    limits: ClientLimits[ClientConnection]
    cancels: CancelTable
    admin_console: Callable[[ClientConnection], Console]
    stopping: bool = False  # draining: no new transaction starts

    def max_pinned_servers(self) -> int:
        """The cap on a tenant's pinned servers, read when used (a reload applies)."""
        return self.config.tenant_limits.max_pinned_servers


class ClientState(Enum):
    STARTUP = "startup"  # the startup generator runs (startup packets, then the password)
    AUTHENTICATING = "authenticating"  # token lookup in flight
    READY = "ready"  # logged in: the session's transaction loop, or the admin console
    CLOSED = "closed"


class ClientConnection(asyncio.Protocol):
    """A client of the proxy; see the module docstring."""

    # One per client, idle or not: no __dict__ (issue 16; asyncio.Protocol has empty slots).
    __slots__ = ("_auth_task", "_buf", "_op", "_startup", "admin", "cancel_key",
                 "client_encoding", "connected_at", "context", "database", "last_request",
                 "max_servers", "peer_host", "pool", "services", "session", "settings",
                 "state", "stats", "tenant_key", "tenant_stats", "tenant_type", "tls",
                 "transport", "user", "writing_paused")

    def __init__(self, services: ClientServices):
        self.services = services
        self.state = ClientState.STARTUP
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.user = ""
        self.database = ""
        self.settings: tuple[tuple[str, str], ...] = ()
        self.client_encoding = "UTF8"  # canonical name; see Link.encoding
        self.context: TenantContext | None = None
        self.pool: Pool | None = None
        self.session: Session | None = None  # once logged in (not the admin console)
        self.connected_at = time.monotonic()
        self.cancel_key: tuple[int, int] | None = None
        self.tls = False  # True once the TLS handshake after SSLRequest succeeded
        # The startup generator (protocol/startup.py) and the op it is suspended at.
        self._startup: Startup | None = None
        self._op: Send | Recv | StartTls | Identify | None = None
        # Bytes the startup generator is not reading right now (TLS handshake, token lookup).
        self._buf = bytearray()
        self.writing_paused = False  # the client's socket buffer is full (pause_writing)
        self._auth_task: asyncio.Task[None] | None = None
        # Metrics (metrics.py): the label set's and the tenant's counters, once logged in.
        self.tenant_type = ""
        # The tenant (its slots in limits.py) and its server cap, handed to the session.
        self.tenant_key: object = None
        self.max_servers = 0
        self.stats: LabelStats | None = None
        self.tenant_stats: TenantStats | None = None
        self.last_request = self.connected_at
        self.admin: Console | None = None  # dbname=pgtenant: the admin console

    def __repr__(self) -> str:
        tenant = self.context.identity.slug if self.context else "-"
        return f"<Client {self.peer_host} user={self.user} tenant={tenant} db={self.database}>"

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses, but speak its interface.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        # Interned, like user and database: one string for the many clients of one host.
        self.peer_host = sys.intern(peer[0]) if isinstance(peer, tuple) else "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limits = self.services.limits
        refused = limits.client_connected(self)
        if refused is not None:
            # Logged at most once a second: a flood must not flood the log too.
            limits.log_refused_connection(self.peer_host, refused)
            self.fail(refused, sqlstate="53300", quiet=True)
            return
        self._startup = client_startup(self._startup_rules())
        self._advance(None)

    @property
    def awaiting_credentials(self) -> bool:
        """Whether this connection has not sent its credentials yet (startup or password)."""
        return self.state is ClientState.STARTUP

    def refuse(self, error: ProxyError) -> None:
        """End this connection before login with ``error`` (logged by the caller)."""
        self.fail(error, sqlstate=error.sqlstate, quiet=True)

    @property
    def metrics_state(self) -> str:
        """Returns: login, waiting, active (holds a server) or idle."""
        if self.state is not ClientState.READY:
            return "login"
        if self.waiting:
            return "waiting"
        return "active" if self.server is not None else "idle"

    # The session's, for the admin views and the metrics (None/False without one).
    @property
    def server(self) -> ServerConnection | None:
        return self.session.server if self.session is not None else None

    @property
    def waiting(self) -> bool:
        return self.session is not None and self.session.waiting

    @property
    def wait_started(self) -> float:
        return self.session.wait_started if self.session is not None else 0.0

    def data_received(self, data: bytes) -> None:
        if self.state is ClientState.READY:
            if self.session is not None:
                self.last_request = time.monotonic()
                self.session.client_data(data)
            elif self.admin is not None:
                self.admin.feed(data)
            return
        if self.state is ClientState.CLOSED:
            return
        if self.state is ClientState.STARTUP and isinstance(self._op, Recv):
            self._advance(data)
            return
        # Nobody reads these yet: the TLS handshake or the token lookup is under way.
        self._buf += data
        if len(self._buf) > MAX_STARTUP:
            if self.state is ClientState.STARTUP:
                # Only decrypted bytes reach us now, possibly before start_tls has handed
                # us the TLS transport: kept until _upgrade_to_tls resumes the startup, so
                # no reply goes out in cleartext; but not without bound.
                self.fail(ClientProtocolError("too much data during the TLS handshake"))
            else:
                self.fail(ClientProtocolError("unexpected data while authenticating"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnect("client closed the connection")
        # Whatever path closed the connection (it may have marked it CLOSED first), the
        # slots it held go back now: releasing is idempotent, a leak is forever.
        self._release_slots()

    def pause_writing(self) -> None:
        # The client reads slower than its server writes: stop reading from the server.
        self.writing_paused = True
        if self.session is not None:
            self.session.client_backpressure(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.session is not None:
            self.session.client_backpressure(False)

    # ------------------------------------------------------------------ startup and auth

    def _startup_rules(self) -> StartupRules:
        """Returns: what the startup generator may allow this connection."""
        services = self.services
        config = services.config
        loopback = self.peer_host == "unix" or is_loopback(self.peer_host)
        guard = services.guard
        return StartupRules(
            peer=self.peer_host,
            tls_available=services.client_tls is not None,
            cleartext_allowed=lambda encrypted: cleartext_token_allowed(
                encrypted=encrypted, loopback=loopback,
                allow_plaintext_remote=config.allow_plaintext_remote),
            databases=services.pools,
            is_protected=guard.is_protected,
            admin_token_set=config.admin.token_sha256 is not None,
            admin_users=config.admin.users,
        )

    def _advance(self, data: bytes | None) -> None:
        """The one driver of the startup generator: resume it with ``data`` (the client's
        next bytes, or None after a Send or a TLS upgrade) and carry out its ops until it
        waits for bytes nobody has yet, starts TLS, or decides."""
        gen = self._startup
        assert gen is not None
        try:
            while True:
                op = gen.send(data)
                data = None
                if isinstance(op, Send):
                    self._write(op.data)
                    continue
                if isinstance(op, Identify):  # logged with a refusal of the rest
                    self.user, self.database = op.user, op.database
                    continue
                self._op = op
                if isinstance(op, StartTls):
                    self._start_tls_upgrade()
                    return
                if not self._buf:  # Recv, and nothing kept for it
                    return
                data = bytes(self._buf)
                self._buf.clear()
        except StopIteration as done:
            decision: Authenticate | Cancel | Goodbye = done.value
        except ProxyError as exc:
            self._startup = self._op = None
            self.fail(exc)
            return
        self._startup = self._op = None
        if isinstance(decision, Authenticate):
            self._buf += decision.rest
            self.user, self.database = sys.intern(decision.user), sys.intern(decision.database)
            self.settings, self.client_encoding = decision.settings, decision.client_encoding
            if not decision.admin:  # else ADMIN_DATABASE
                self.pool = self.services.pools[decision.database]
            self.state = ClientState.AUTHENTICATING
            self._auth_task = asyncio.ensure_future(self._authenticate(decision))
        elif isinstance(decision, Cancel):
            if decision.key is not None:
                self.services.cancels.cancel(*decision.key)
            # Through _disconnect, like every other end: it gives back the slots
            # connection_made took (marking the client CLOSED here first leaked them, one
            # per CancelRequest).
            self._disconnect("cancel request")
        else:
            self._disconnect(decision.reason)

    def _start_tls_upgrade(self) -> None:
        """Run the server-side TLS handshake in a task (our 'S' went out just before)."""
        assert self.transport is not None
        # Until start_tls installs its TLS layer, the ClientHello must not reach
        # data_received as if it were a startup packet; start_tls resumes reading itself.
        self.transport.pause_reading()
        # Kept where _disconnect cancels the login's task, so a client that goes away or a
        # proxy shutdown ends the handshake too.
        self._auth_task = asyncio.ensure_future(self._upgrade_to_tls())

    async def _upgrade_to_tls(self) -> None:
        """Wrap the connection in TLS; this protocol object stays the same.

        A failed handshake cannot be answered with an ErrorResponse (the client expects TLS
        records), so the connection is just closed and the reason logged.
        """
        context = self.services.client_tls
        assert self.transport is not None and context is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.services.config.client_login_timeout,
            )
        except OSError as exc:  # ssl.SSLError, resets, the handshake timeout
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.info("disconnect: client=%s reason=TlsHandshakeFailed: %s", self.peer_host, why)
            self._disconnect("TLS handshake failed", logged=True)
            return
        if transport is None or self.state is ClientState.CLOSED:  # gone meanwhile
            if transport is not None:
                transport.close()
            self._disconnect("client closed the connection")
            return
        self.transport = transport
        self.tls = True
        # Resumed with None; a StartupMessage that arrived with the end of the handshake is
        # in self._buf and fed at the generator's next Recv.
        self._advance(None)

    async def _authenticate(self, login: Authenticate) -> None:
        """The token lookup's task: log in, or end the client with the reason."""
        services = self.services
        attempt = Attempt(self.peer_host, login.user, login.database, login.token)
        if login.admin:
            await self._authenticate_admin(attempt)
            return
        try:
            identity, tenant_type = await resolve_tenant(services.registry, services.throttle,
                                                         services.config, attempt)
            self.context = shared_context(identity, tenant_type)
            database = served_from(identity.database or tenant_type.database, self.database,
                                   identity.slug, services.pools)
            self.pool, self.database = services.pools[database], database
            self.max_servers, max_clients = tenant_caps(tenant_type,
                                                        services.config.tenant_limits)
            if not services.limits.tenant_login(identity.org_id, max_clients):
                raise TooManyConnections(
                    f"too many connections for tenant {identity.slug!r} "
                    f"(max_client_connections={max_clients})",
                    hint="close idle connections of this tenant, or raise the limit")
            self.tenant_key = identity.org_id  # counted in: counted out at disconnect
            params = await self.pool.startup_parameters()
        except ProxyError as exc:
            if self.state is not ClientState.CLOSED:
                self.fail(exc)
            return
        except Exception as exc:  # never let a task die silently with a client hanging
            log.exception("unexpected error authenticating %r", self)
            if self.state is not ClientState.CLOSED:
                self.fail(ProxyError(f"internal error during authentication: {exc}"))
            return
        if self.state is ClientState.CLOSED:
            return
        self._logged_in(login, tenant_type, params)

    def _logged_in(self, login: Authenticate, tenant_type: TenantTypeConfig,
                   params: Mapping[str, str]) -> None:
        """The token checked out: build the session and greet the client as Postgres
        would."""
        services = self.services
        pool, context = self.pool, self.context
        assert pool is not None and context is not None and self.transport is not None
        # This runs at the end of the login's task: a finished Task kept for the whole
        # session would cost every idle client about 700 bytes (issue 16).
        self._auth_task = None
        ident = context.identity
        self.tenant_type = ident.tenant_type
        self.stats = services.metrics.labels(self.database, ident.tenant_type)
        self.tenant_stats = services.metrics.tenant(self.database, ident.tenant_type, ident.slug)
        self.stats.logins += 1
        config, guard = services.config, services.guard_for(tenant_type)
        self.session = Session(
            self, services, self.transport, pool=pool, tenant_key=self.tenant_key,
            max_servers=self.max_servers, stats=self.stats, tenant_stats=self.tenant_stats,
            link=lambda may_pin: new_link(
                config, context, pool.signing_key, self.settings, self.client_encoding,
                guard=guard, tenant_type=tenant_type, may_pin=may_pin,
                max_pinned=services.max_pinned_servers,
                omit=self._omit()))
        # The startup settings as the Injection keeps them: one tuple for the clients that
        # share it (protocol/inject.py), not one per client.
        self.settings = self.session.link.injection.settings
        self.cancel_key = services.cancels.register(self)
        self.session.link.client_pid = self.cancel_key[0]
        self.session.set_notify_pid(self.cancel_key[0])
        self._write(greeting(login, params, self.cancel_key))
        self.state = ClientState.READY
        services.limits.client_logged_in(self)
        log.info("login: client=%s user=%s db=%s tenant=%s type=%s org=%s", self.peer_host,
                 self.user, self.database, ident.slug, ident.tenant_type, ident.org_id,
                 extra=self.log_fields(event="login", org=str(ident.org_id)))
        if self._buf:  # pipelined bytes after the password
            self.session.link.cbuf += self._buf
            self._buf.clear()
            self.session.pump()

    async def _authenticate_admin(self, attempt: Attempt) -> None:
        services = self.services
        if not await check_admin_token(services.throttle, services.config, attempt):
            if self.state is not ClientState.CLOSED:
                log.warning("admin: login refused: user=%s client=%s", self.user,
                            self.peer_host)
                self.fail(AuthFailed(f'password authentication failed for user "{self.user}"',
                                     hint="the admin console takes the admin token"))
            return
        if self.state is ClientState.CLOSED:
            return
        self.admin = services.admin_console(self)
        self.state = ClientState.READY
        services.limits.client_logged_in(self)
        log.info("admin: login: user=%s client=%s", self.user, self.peer_host)
        self._write(admin_greeting(__version__))
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self.admin.feed(data)

    # ------------------------------------------------------------------ admin views

    def write(self, data: bytes) -> None:
        """AdminPeer: send bytes to this client."""
        self._write(data)

    def close(self, reason: str) -> None:
        """AdminPeer: end this connection."""
        self._disconnect(reason)

    def addresses(self) -> tuple[str, int | None, str | None, int | None]:
        """Returns: (peer address, peer port, local address, local port), for SHOW CLIENTS."""
        if self.transport is None:
            return self.peer_host, None, None, None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        return (self.peer_host,
                peer[1] if isinstance(peer, tuple) else None,
                local[0] if isinstance(local, tuple) else None,
                local[1] if isinstance(local, tuple) else None)

    @property
    def application_name(self) -> str:
        return dict((k.lower(), v) for k, v in self.settings).get("application_name", "")

    @property
    def prepared_count(self) -> int:
        return len(self.session.link.client_statements) if self.session is not None else 0

    @property
    def has_running_transaction(self) -> bool:
        """Whether work of this client is under way on a server (graceful stop): an open
        transaction, or a request whose reply is still owed (an autocommit statement in
        flight is a transaction too, and is not cut). A pinned session idle between
        transactions is not running: it never reaches a release to be ended at."""
        return (self.state is ClientState.READY and self.session is not None
                and self.session.has_running_transaction)

    @property
    def token_id(self) -> UUID | None:
        """The id of the token this client logged in with (None before login)."""
        return self.context.identity.token_id if self.context is not None else None

    def revoked(self) -> None:
        """Registry: this client's token was revoked; end the session now, also when it is
        pinned to a server (session state), which never asks for a server again."""
        if self.state is ClientState.READY:
            self.fail(token_revoked())

    def cancel_request(self) -> ServerConnection | None:
        """CancelTable: a CancelRequest with this client's key arrived.

        Returns: the server to forward it to, only while a request of this client is pending
        on that server (so a cancel can never reach the next client's query); else None
        (Postgres ignores such requests too). A client still waiting for a server has its
        wait ended instead, as Postgres would end the statement.
        """
        return self.session.cancel_request() if self.session is not None else None

    def terminate(self, message: str) -> None:
        """End this client with an admin_shutdown FATAL (KILL, shutdown)."""
        self.fail(AdminShutdown(message))

    # ------------------------------------------------------------------ ending

    def fail(self, error: ProxyError, *, sqlstate: str | None = None,
             quiet: bool = False) -> None:
        """Send ``error`` as a FATAL ErrorResponse and end this client only (``quiet``: the
        caller logged it)."""
        if self.state is ClientState.CLOSED:
            return
        code = sqlstate or error.sqlstate
        if self.session is not None:
            self.session.abort()
        if self.stats is not None:
            self.stats.error(code)
        elif self.state is not ClientState.READY:
            self.services.metrics.auth_failure(_AUTH_REASONS.get(error.reason, "other"))
        # Logged before the error is sent, so the line is written by the time the client
        # can see the error (tests and operators correlate the two).
        log_fn = log.info if isinstance(error, AuthFailed) else log.warning
        tenant = self.context.identity.slug if self.context else "-"
        if not quiet:
            log_fn("disconnect: client=%s user=%s db=%s tenant=%s reason=%s sqlstate=%s: %s",
                   self.peer_host, self.user, self.database, tenant, error.reason, code,
                   error.message, extra=self.log_fields(event="disconnect",
                                                        reason=error.reason, sqlstate=code,
                                                        error=error.message))
        self._write(codec.error_response(
            code, error.message, severity="FATAL", detail=error.detail, hint=error.hint
        ))
        self._disconnect(error.reason, logged=True)

    def _disconnect(self, reason: str, *, logged: bool = False) -> None:
        if self.state is ClientState.CLOSED:
            return
        was_ready = self.state is ClientState.READY
        self.state = ClientState.CLOSED
        if self.session is not None:
            self.session.close()
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
        self._release_slots()
        if self.admin is not None:
            self.admin.close()
        if was_ready and not logged:
            tenant = self.context.identity.slug if self.context else "-"
            log.info("disconnect: client=%s user=%s db=%s tenant=%s reason=%s", self.peer_host,
                     self.user, self.database, tenant, reason,
                     extra=self.log_fields(event="disconnect", reason=reason))
        if self.transport is not None:
            self.transport.close()

    def _release_slots(self) -> None:
        """Give back the client, login and tenant slots this connection took; idempotent."""
        limits = self.services.limits
        limits.client_disconnected(self)
        self.services.cancels.forget(self.cancel_key)
        if self.tenant_key is not None:
            limits.tenant_logout(self.tenant_key)
            self.tenant_key = None

    def log_fields(self, **more: object) -> dict[str, dict[str, object]]:
        """Returns: ``extra=`` for a connection log line (JSON logs get these as keys)."""
        ident = self.context.identity if self.context is not None else None
        return fields(client=self.peer_host, user=self.user, database=self.database,
                      tenant=ident.slug if ident else None,
                      tenant_type=ident.tenant_type if ident else None, **more)

    def check_timeouts(self, now: float) -> None:
        """Janitor: PgBouncer's client-side timeouts, each ending with its own SQLSTATE."""
        config = self.services.config
        session = self.session
        if self.state in (ClientState.STARTUP, ClientState.AUTHENTICATING):
            error = login_timeout(config, now, self.connected_at)
        elif self.state is ClientState.READY and session is not None and not session.waiting:
            link = session.link
            error = session_timeout(
                config, now, query_started=link.pending[0].t0 if link.pending else None,
                quiet_since=max(self.last_request, session.last_server_data),
                in_transaction=link.in_transaction, open_extended=link.open_extended)
        else:
            return
        if error is not None:
            self.fail(error)

    # ------------------------------------------------------------------ I/O helpers

    def _omit(self) -> frozenset[str]:
        """Returns: the app.* names whose SET LOCAL to '' this session's transactions leave
        out: every server's session holds '' for them (its startup parameters, see
        protocol/inject.py SERVER_SESSION), as long as the guard refuses tenants' SET of them
        (protected_settings can be changed)."""
        guard = self.services.guard
        return frozenset(n for n in OMITTABLE if guard.is_protected(n))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self.stats is not None:
                self.stats.bytes_sent += len(data)
