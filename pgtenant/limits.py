"""Connection limits: the client table, login slots and per-tenant counts of clients and of
pinned servers (``max_client_conn``, ``max_login_clients``, ``tenant_limits``), and which
client-side timeout a connection has run into (PgBouncer's, decided from times passed in).

Owns the counters and the refusals they imply; it does not end connections itself beyond
asking the oldest unauthenticated one to go (``refuse``), nor know what a client does.
"""

from __future__ import annotations

import logging
import time
from typing import Generic, Protocol, TypeVar

from .config import Config
from .errors import (
    ClientIdleTimeout,
    IdleInTransactionTimeout,
    LoginTimeout,
    ProxyError,
    QueryTimeout,
    TooManyLogins,
)
from .logs import fields

__all__ = ["ClientLimits", "LimitedClient", "login_timeout", "session_timeout"]

log = logging.getLogger("pgtenant")


class LimitedClient(Protocol):
    """What the limits need of a client connection."""

    @property
    def peer_host(self) -> str: ...
    @property
    def awaiting_credentials(self) -> bool: ...
    def refuse(self, error: ProxyError) -> None: ...


C = TypeVar("C", bound=LimitedClient)


class ClientLimits(Generic[C]):
    """The slots clients hold; ``config`` is swapped on reload."""

    def __init__(self, config: Config):
        self.config = config
        self.clients: dict[C, None] = {}
        # Of self.clients, those not authenticated yet (max_login_clients). Both tables are
        # sets keyed by the client, so giving a slot back is idempotent: every path that
        # ends a connection may release, none can release twice or leak.
        self.logging_in: dict[C, None] = {}
        self.tenant_clients: dict[object, int] = {}  # logged-in clients per tenant
        self.tenant_pinned: dict[object, int] = {}  # servers pinned by a tenant's clients
        self._refused = 0  # connections refused at connect since the last log line about it
        self._refused_logged_at = float("-inf")

    def client_connected(self, client: C) -> ProxyError | None:
        """Take a client slot and a login slot for a new connection.

        Returns: None when taken, else why the client is refused (53300): all
        ``max_client_conn`` slots, or all ``max_login_clients`` login slots, are in use.
        """
        config = self.config
        if len(self.logging_in) >= min(config.max_login_clients, config.max_client_conn):
            # Make room by closing the oldest connection that has not sent its credentials
            # yet: an honest client logs in within milliseconds of connecting, so a flood of
            # sockets that never do only ever pushes out its own oldest ones (it would have
            # to open max_login_clients sockets within that client's login to crowd it out).
            oldest = next((c for c in self.logging_in if c.awaiting_credentials), None)
            if oldest is None:
                return TooManyLogins(
                    "too many connections are logging in at once (max_login_clients="
                    f"{config.max_login_clients}); try again shortly")
            error = TooManyLogins("too many connections are logging in at once "
                                  f"(max_login_clients={config.max_login_clients}); the "
                                  "oldest that had not authenticated was closed")
            self.log_refused_connection(oldest.peer_host, error)
            oldest.refuse(error)
        if len(self.clients) >= config.max_client_conn:
            return ProxyError("too many client connections (max_client_conn)")
        self.clients[client] = None
        self.logging_in[client] = None
        return None

    def log_refused_connection(self, peer: str, error: ProxyError) -> None:
        """Log a connection refused at connect (53300), at most one line a second: each
        line counts the refusals it stands for (all are counted in auth failure metrics)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at < 1.0:
            return
        log.warning("connection refused: client=%s sqlstate=53300: %s (%d refused since the "
                    "last such line)", peer, error.message, self._refused,
                    extra=fields(event="refused", client=peer, reason=error.reason,
                                 sqlstate="53300", error=error.message, count=self._refused))
        self._refused, self._refused_logged_at = 0, now

    def client_logged_in(self, client: C) -> None:
        """Give back ``client``'s login slot (it keeps its client slot)."""
        self.logging_in.pop(client, None)

    def client_disconnected(self, client: C) -> None:
        """Give back ``client``'s client and login slots; idempotent."""
        self.clients.pop(client, None)
        self.logging_in.pop(client, None)

    def tenant_login(self, key: object, limit: int) -> bool:
        """Count a tenant's client in. Returns: False (not counted) at ``limit`` (0: none)."""
        count = self.tenant_clients.get(key, 0)
        if limit > 0 and count >= limit:
            return False
        self.tenant_clients[key] = count + 1
        return True

    def tenant_logout(self, key: object) -> None:
        count = self.tenant_clients.get(key, 0) - 1
        if count > 0:
            self.tenant_clients[key] = count
        else:
            self.tenant_clients.pop(key, None)

    def pin(self, key: object, delta: int) -> None:
        """Count a tenant's pinned servers (``delta`` +1 or -1)."""
        count = self.tenant_pinned.get(key, 0) + delta
        if count > 0:
            self.tenant_pinned[key] = count
        else:
            self.tenant_pinned.pop(key, None)

    def may_pin(self, key: object) -> bool:
        """Returns: whether a client of tenant ``key`` may pin one more server."""
        limit = self.config.tenant_limits.max_pinned_servers
        return limit <= 0 or self.tenant_pinned.get(key, 0) < limit


def login_timeout(config: Config, now: float, connected_at: float) -> ProxyError | None:
    """Returns: LoginTimeout when a client connected at ``connected_at`` is still not logged
    in at ``now`` (client_login_timeout), else None."""
    if now - connected_at > config.client_login_timeout:
        return LoginTimeout("client did not complete login in time (client_login_timeout)")
    return None


def session_timeout(config: Config, now: float, *, query_started: float | None,
                    quiet_since: float, in_transaction: bool,
                    open_extended: bool) -> ProxyError | None:
    """Returns: the timeout a logged-in client (not waiting for a server) ran into, each with
    its own SQLSTATE, else None.

    ``query_started``: when its oldest request still owed a reply started (None: nothing
    pending); ``quiet_since``: its last request or its server's last reply.
    """
    if query_started is not None:
        limit = config.query_timeout
        if limit > 0 and now - query_started > limit:
            return QueryTimeout(
                f"query_timeout: the query ran longer than {limit:g}s; it was cancelled "
                "and this connection closed", hint="raise query_timeout, or make the "
                "query faster (a server-side statement_timeout slightly below "
                "query_timeout ends it with a plain error instead)")
        return None
    quiet = now - quiet_since
    if in_transaction:
        limit = config.idle_transaction_timeout
        if limit > 0 and quiet > limit and not open_extended:
            return IdleInTransactionTimeout(
                f"idle_transaction_timeout: idle in a transaction for more than "
                f"{limit:g}s; the transaction was rolled back and this connection closed")
    elif config.client_idle_timeout > 0 and quiet > config.client_idle_timeout:
        return ClientIdleTimeout(
            f"client_idle_timeout: no request for {config.client_idle_timeout:g}s; "
            "connection closed")
    return None
