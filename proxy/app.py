"""Composition root: config -> pools, registry, listener and janitor; signals; shutdown.

Owns process-wide tables (clients, cancel keys) and their lifecycle. It holds no protocol
logic; clients and pools do the work.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time

import asyncpg
from prometheus_client import CollectorRegistry, ProcessCollector

from .client import ClientConnection
from .config import Config, parse_listen
from .control.hardening import check_lockdown, fetch_signing_key
from .control.init import static_role
from .errors import ConfigError, ContextError, QueryCanceled, ServerUnavailable
from .guard import Guard
from .http import HttpEndpoint
from .identity.jwt import build_verifier
from .identity.registry import Registry
from .identity.throttle import AuthThrottle
from .metrics import Collector, Metrics
from .pool import Pool
from .server import send_cancel
from .tls import backend_tls, client_context

__all__ = ["App", "serve"]

log = logging.getLogger("pgtenant")
_JANITOR_INTERVAL = 0.25


class App:
    """The running proxy."""

    def __init__(self, config: Config):
        self.config = config
        # Built once: a bad cert/key/CA path is a ConfigError at start, not at first client.
        self.client_tls = client_context(config.tls)
        self.server_tls = backend_tls(config.tls)
        self.pools = {name: Pool(db, config, server_tls=self.server_tls)
                      for name, db in config.databases.items()}
        self.guard = Guard(config.protected_settings)
        self.registry = Registry(config.control_dsn, config.token_cache_ttl,
                                 jwt=build_verifier(config.jwt))
        # One table for the whole proxy: failures are counted per client address.
        self.auth_throttle = AuthThrottle(config.auth_failure_limit, config.auth_failure_window,
                                          config.auth_failure_delay)
        self.clients: dict[ClientConnection, None] = {}
        self.cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self.auth_failures = 0
        self.metrics = Metrics(config.metrics.top_tenants)
        # Our own registry (not prometheus-client's global one): one per App, so several
        # Apps in one process (tests) never clash; process_* series come with it.
        self.registry_prom = CollectorRegistry()
        self.registry_prom.register(Collector(self))
        ProcessCollector(registry=self.registry_prom)
        self.http: HttpEndpoint | None = None
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------------ client table

    def client_connected(self, client: ClientConnection) -> bool:
        """Returns: False when ``max_client_conn`` is reached (the client is refused)."""
        if len(self.clients) >= self.config.max_client_conn:
            return False
        self.clients[client] = None
        return True

    def client_disconnected(self, client: ClientConnection) -> None:
        self.clients.pop(client, None)
        if client.cancel_key is not None:
            self.cancel_keys.pop(client.cancel_key, None)

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """Returns: a fresh (pid, secret) pair the client will present to cancel."""
        while True:
            key = (secrets.randbits(31), secrets.randbits(31) - (1 << 30))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def cancel(self, pid: int, secret: int) -> None:
        """Forward a CancelRequest to the backend the client is using right now, if any."""
        client = self.cancel_keys.get((pid, secret))
        if client is not None and client.waiting and client.pool is not None:
            # Not on a server yet: end the wait, as Postgres would end the statement.
            client.pool.cancel_wait(client)
            client.pool_failed(QueryCanceled("canceling statement due to user request"))
            return
        server = client.server if client is not None else None
        if server is None or server.login is None:
            return  # unknown key or idle client: Postgres also ignores such requests
        login = server.login
        task = asyncio.ensure_future(
            send_cancel(server.dsn, login.backend_pid, login.backend_secret)
        )
        task.add_done_callback(lambda t: t.exception())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        host, port = self.config.listen
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: ClientConnection(self), host, port, backlog=1024, reuse_address=True
            )
        except OSError as exc:
            raise ConfigError(f"listen: cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._janitor = asyncio.ensure_future(self._janitor_loop())
        for pool in self.pools.values():
            pool.verifier = self._verify_database
            try:
                await pool.ensure_verified()
            except ServerUnavailable as exc:  # verified at the first login instead
                log.warning("%s; clients of it are refused until it can be verified", exc.message)
        # Before "listening on": revocations must be heard from the first login on.
        await self.registry.start()
        if self.config.metrics.listen is not None:
            mhost, mport = parse_listen(self.config.metrics.listen, "metrics.listen")
            self.http = HttpEndpoint(self.registry_prom, self.not_ready_reasons)
            try:
                await self.http.start(mhost, mport)
            except OSError as exc:
                raise ConfigError(f"metrics.listen: cannot listen on {mhost}:{mport}: "
                                  f"{exc.strerror}") from exc
            log.info("pgtenant: metrics on http://%s:%d/metrics", mhost, self.http.port)
        log.info("pgtenant: listening on %s:%d (databases: %s)", host, port,
                 ", ".join(self.pools))

    async def _verify_database(self, pool: Pool) -> None:
        """Check one database's lockdown and fetch its context-signing key (§5 layers 3, 4).

        Raises: ServerUnavailable when it cannot be reached; ContextError when it is not
        locked down (lockdown_check = "refuse") or has no signing key (context_signing = "on").
        """
        dsn = pool.db.dsn
        try:
            conn = await asyncpg.connect(dsn.to_url(), timeout=self.config.server_connect_timeout,
                                         statement_cache_size=0)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ServerUnavailable(
                f"cannot connect to backend {dsn.host}:{dsn.port} to verify database "
                f"{pool.db.name!r}: {exc}"
            ) from exc
        try:
            if self.config.lockdown_check != "off":
                roles = sorted({r for t in self.config.tenant_types.values()
                                if (r := static_role(t)) is not None})
                problems = await check_lockdown(conn, dsn.user, roles)
                if problems:
                    text = f"database {pool.db.name!r} is not locked down: " + "; ".join(problems)
                    if self.config.lockdown_check == "refuse":
                        raise ContextError(text, hint="run `pgtenant init --config ...` on it, "
                                           "or set lockdown_check = \"warn\"")
                    log.warning("LOCKDOWN WARNING: %s", text)
            if await conn.fetchval("SHOW standard_conforming_strings") != "on":
                # The statement guard lexes like Postgres only with this on (see guard.py).
                raise ContextError(f"database {pool.db.name!r} has standard_conforming_strings "
                                   "off for the proxy's role; pgtenant requires it on")
            if self.config.context_signing != "off":
                pool.signing_key = await fetch_signing_key(conn)
                if pool.signing_key is None:
                    if self.config.context_signing == "on":
                        raise ContextError(
                            f"database {pool.db.name!r} has no context-signing key "
                            "(context_signing = \"on\"); run `pgtenant init` on it"
                        )
                    log.warning("database %r has no signing key: app.tenant_sig is not set",
                                pool.db.name)
        finally:
            await conn.close()

    def not_ready_reasons(self) -> list[str]:
        """Returns: why clients cannot be served right now (empty: ready)."""
        reasons = []
        if self._server is None or self.stopping:
            reasons.append("not accepting clients")
        for name, pool in self.pools.items():
            if not pool.verified:
                reasons.append(f"database {name!r} not verified yet (backend unreachable?)")
        return reasons

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _janitor_loop(self) -> None:
        """One sweep for every timeout; no timer per connection."""
        while True:
            await asyncio.sleep(_JANITOR_INTERVAL)
            now = time.monotonic()
            for pool in self.pools.values():
                pool.tick(now)
            for client in list(self.clients):
                client.check_login_timeout(now)

    async def stop(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.http is not None:
            await self.http.close()
        if self._janitor is not None:
            self._janitor.cancel()
        for client in list(self.clients):
            client._disconnect("proxy shutting down")
        for pool in self.pools.values():
            await pool.close()
        await self.registry.close()
        self.stopped.set()


def serve(config: Config) -> None:
    """Run the proxy until SIGINT/SIGTERM (uvloop when available)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    else:
        runner = uvloop.run

    async def main() -> None:
        app = App(config)
        await app.start()
        loop = asyncio.get_running_loop()
        shutdowns: set[asyncio.Task[None]] = set()

        def on_signal(sig: int) -> None:
            if not shutdowns:  # a second signal while stopping changes nothing
                shutdowns.add(asyncio.ensure_future(_shutdown(app, sig)))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await app.stopped.wait()

    async def _shutdown(app: App, sig: int) -> None:
        log.info("pgtenant: %s received, shutting down", signal.Signals(sig).name)
        await app.stop()

    runner(main())
