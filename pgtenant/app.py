"""Composition root: config -> pools, registry, listener and janitor; signals; shutdown.

Builds the process-wide tables (client limits in ``limits.py``, cancel keys in
``cancel.py``) and the ``ClientServices`` clients get instead of the App, and keeps them
current on reload. It holds no protocol logic; clients and pools do the work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from pathlib import Path
from uuid import UUID

import asyncpg
import uvloop
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from . import __version__, build_kind
from .admin import AdminConsole
from .cancel import CancelTable
from .client import ClientConnection, ClientServices
from .config import Config, Dsn, TenantTypeConfig
from .configfile import load_config, parse_listen
from .control.hardening import check_lockdown, fetch_signing_key
from .control.init import static_role
from .errors import (
    ConfigError,
    ContextError,
    ServerUnavailable,
    connect_failure,
)
from .guard import SWITCHES, Guard
from .holds import TenantHolds
from .http import HttpEndpoint
from .identity.jwt import build_verifier
from .identity.registry import Registry
from .identity.throttle import AuthThrottle
from .limits import ClientLimits
from .metrics import Collector
from .pool import Pool
from .stats import Metrics
from .tls import backend_tls, client_context
from .workers import ControlServer, WorkerInfo

__all__ = ["App", "serve"]

log = logging.getLogger("pgtenant")
_JANITOR_INTERVAL = 0.25
_STATS_PERIOD = 60.0  # PgBouncer's stats_period: SHOW STATS averages cover this long


class App:
    """The running proxy."""

    def __init__(self, config: Config, config_path: str | Path | None = None,
                 worker: WorkerInfo | None = None):
        self.config = config
        self.worker = worker  # one of `serve --workers N`: see workers.py
        self._control: ControlServer | None = None
        self.config_path = config_path  # re-read by RELOAD and SIGHUP
        # Built once: a bad cert/key/CA path is a ConfigError at start, not at first client.
        self.client_tls = client_context(config.tls)
        self.server_tls = backend_tls(config.tls)
        self.pools = {name: Pool(db, config, server_tls=self.server_tls)
                      for name, db in config.databases.items()}
        self.guard = self._new_guards(config, {})
        self.registry = Registry(config.control_dsn, config.token_cache_ttl,
                                 jwt=build_verifier(config.jwt))
        self.registry.on_revoked = self.end_revoked
        # Tenant holds during migrations (holds.py): read by the registry's listener.
        self.holds = TenantHolds(lambda: self.pools.values(), self.registry.ack_hold)
        self.registry.on_holds = self.holds.update
        # One table for the whole proxy: failures are counted per client address.
        self.auth_throttle = AuthThrottle(config.auth_failure_limit, config.auth_failure_window,
                                          config.auth_failure_delay)
        self.limits: ClientLimits[ClientConnection] = ClientLimits(config)
        self.cancels = CancelTable(worker)
        self.metrics = Metrics(config.metrics.top_tenants)
        # What client connections may use of the proxy (no App: see client.py).
        self.services = ClientServices(
            config=config, client_tls=self.client_tls, pools=self.pools,
            registry=self.registry, metrics=self.metrics, throttle=self.auth_throttle,
            guard=self.guard, guard_for=self.guard_for, limits=self.limits,
            cancels=self.cancels, admin_console=lambda peer: AdminConsole(self, peer))
        # Our own registry (not prometheus-client's global one): one per App, so several
        # Apps in one process (tests) never clash; process_* series come with it.
        self.registry_prom = CollectorRegistry()
        self.registry_prom.register(Collector(self))
        ProcessCollector(registry=self.registry_prom)
        self.http: HttpEndpoint | None = None
        self.started_at = time.monotonic()
        self._server: asyncio.Server | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        # SHOW STATS averages: totals per database at the start of the stats period.
        self._stats_prev: dict[str, tuple[float, list[float]]] = {}
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------------ statement guard

    def _new_guards(self, config: Config, counts: dict[str, int]) -> Guard:
        """Returns: the guard allowing every switch (is_protected, the refusal counters);
        the per-policy guards are made anew from it on demand (``guard_for``)."""
        guard = Guard(config.protected_settings, allow=SWITCHES,
                      max_parse=config.max_parsed_query_size)
        guard.refusals_by_rule = counts  # one counter across reloads (monotonic)
        self._guards: dict[frozenset[str], Guard] = {guard.allow: guard}
        return guard

    def guard_for(self, tenant_type: TenantTypeConfig) -> Guard:
        """Returns: the statement guard of ``tenant_type``'s policy (LOCK TABLE, large
        objects, EXPLAIN ANALYZE: see TenantTypeConfig.allows); one per distinct policy."""
        allow = frozenset(name for name in SWITCHES if tenant_type.allows(name))
        guard = self._guards.get(allow)
        if guard is None:
            guard = Guard(self.config.protected_settings, allow=allow,
                          max_parse=self.config.max_parsed_query_size)
            guard.refusals_by_rule = self.guard.refusals_by_rule
            self._guards[allow] = guard
        return guard

    # ------------------------------------------------------------------ shared with clients

    @property
    def clients(self) -> dict[ClientConnection, None]:
        """Every client connection (the limits' table)."""
        return self.limits.clients

    @property
    def stopping(self) -> bool:
        return self.services.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.services.stopping = value

    def _share(self) -> None:
        """Hand what reload swaps to the clients' services and the limits."""
        self.services.config = self.limits.config = self.config
        self.services.guard = self.guard
        self.services.throttle = self.auth_throttle

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        host, port = self.config.listen
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: ClientConnection(self.services), host, port, backlog=1024,
                reuse_address=True, reuse_port=self.worker is not None,
            )
        except OSError as exc:
            raise ConfigError(f"listen: cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._janitor = asyncio.ensure_future(self._janitor_loop())
        self._warn_login_role_is_control()
        for pool in self.pools.values():
            pool.verifier = self._verify_database
            try:
                await pool.ensure_verified()
            except ServerUnavailable as exc:  # verified at the first login instead
                log.warning("%s; clients of it are refused until it can be verified", exc.message)
        # Before "listening on": revocations must be heard from the first login on.
        await self.registry.start()
        if self.worker is not None:  # the supervisor serves HTTP, asking every worker
            self._control = ControlServer(
                self.worker.socket(self.worker.index),
                metrics=lambda: generate_latest(self.registry_prom),
                readiness=self.not_ready_reasons, cancel=self.cancels.cancel)
            await self._control.start()
        elif self.config.metrics.listen is not None:
            mhost, mport = parse_listen(self.config.metrics.listen, "metrics.listen")

            async def metrics() -> bytes:
                return generate_latest(self.registry_prom)

            async def readiness() -> list[str]:
                return self.not_ready_reasons()

            self.http = HttpEndpoint(metrics, readiness)
            try:
                await self.http.start(mhost, mport)
            except OSError as exc:
                raise ConfigError(f"metrics.listen: cannot listen on {mhost}:{mport}: "
                                  f"{exc.strerror}") from exc
            log.info("pgtenant: metrics on http://%s:%d/metrics", mhost, self.http.port)
        log.info("pgtenant: listening on %s:%d (databases: %s)", host, port,
                 ", ".join(self.pools))

    def _warn_login_role_is_control(self) -> None:
        """Say loudly when the control plane still runs as the data-path login role."""
        logins = {db.dsn.user for db in self.config.databases.values()}
        if self.config.control.dsn is None or self.config.control.dsn.user in logins:
            log.warning(
                "CONTROL ROLE WARNING: no [control] dsn of its own: the signing key and the "
                "token registry are read as the login role %r, so a statement that reaches "
                "Postgres without pgtenant's context could read them too. Run `pgtenant init` "
                "(it creates the control role pgtenant_control and takes them from the login "
                "role) and set [control] dsn to the control role.",
                self.config.control_dsn.user)

    async def _connect(self, dsn: Dsn, name: str) -> asyncpg.Connection:
        """Returns: a connection to verify database ``name`` on.
        Raises: ServerUnavailable when it cannot be made."""
        try:
            return await asyncpg.connect(dsn.to_url(), timeout=self.config.server_connect_timeout,
                                         statement_cache_size=0)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise ServerUnavailable(
                f"cannot connect to backend {dsn.host}:{dsn.port} as {dsn.user!r} to verify "
                f"database {name!r}: {connect_failure(exc)}"
            ) from exc

    async def _verify_database(self, pool: Pool) -> None:
        """Check one database's lockdown (on the data path, as the login role) and fetch its
        context-signing key (on a control-role connection) (§5 layers 1, 3, 4).

        Raises: ServerUnavailable when it cannot be reached; ContextError when it is not
        locked down (lockdown_check = "refuse"), has no signing key (context_signing = "on")
        or its key cannot be read.
        """
        dsn = pool.db.dsn
        conn = await self._connect(dsn, pool.db.name)
        try:
            if self.config.lockdown_check != "off":
                roles = sorted({r for t in self.config.tenant_types.values()
                                if (r := static_role(t)) is not None})
                problems = await check_lockdown(conn, dsn.user, roles,
                                                self.config.protected_settings)
                if problems:
                    text = f"database {pool.db.name!r} is not locked down: " + "; ".join(problems)
                    if self.config.lockdown_check == "refuse":
                        raise ContextError(text, hint="run `pgtenant init --config ...` on it "
                                           "(and set [control] dsn to the control role it "
                                           "creates), or set lockdown_check = \"warn\"")
                    log.warning("LOCKDOWN WARNING: %s", text)
            if await conn.fetchval("SHOW standard_conforming_strings") != "on":
                # The statement guard lexes like Postgres only with this on (see guard.py).
                raise ContextError(f"database {pool.db.name!r} has standard_conforming_strings "
                                   "off for the proxy's role; pgtenant requires it on")
            if self.config.context_signing != "off":
                pool.signing_key = await self._fetch_key(pool, conn)
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

    async def _fetch_key(self, pool: Pool, login_conn: asyncpg.Connection) -> bytes | None:
        """Read ``pool``'s signing key as the control role (on ``login_conn`` only when no
        control role is configured: an install from before it; warned about at start).

        Returns: the key, or None when the database has none.
        Raises: ServerUnavailable, or ContextError when the role may not read the key.
        """
        key_dsn = self.config.key_dsn(pool.db)
        conn = login_conn if key_dsn is None else await self._connect(key_dsn, pool.db.name)
        user = pool.db.dsn.user if key_dsn is None else key_dsn.user
        try:
            return await fetch_signing_key(conn)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise ContextError(
                f"database {pool.db.name!r}: role {user!r} may not read the context-signing "
                f"key ({exc})",
                hint="since `pgtenant init` made the control role, only it may: set [control] "
                     "dsn (or databases.<name>.control_dsn) to the control role and the "
                     "password init printed",
            ) from exc
        finally:
            if conn is not login_conn:
                await conn.close()

    def not_ready_reasons(self) -> list[str]:
        """Returns: why clients cannot be served right now (empty: ready)."""
        reasons = []
        if self._server is None or self.stopping:
            reasons.append("not accepting clients")
        for name, pool in self.pools.items():
            if not pool.verified:
                reasons.append(f"database {name!r} not verified yet (backend unreachable?)")
            if pool.paused:
                reasons.append(f"database {name!r} is paused (admin PAUSE)")
        return reasons

    # ------------------------------------------------------------------ admin actions

    def end_revoked(self, token_id: UUID) -> None:
        """End every session logged in with ``token_id`` now, idle or pinned to a server;
        sessions that are between transactions would also be refused at their next one."""
        for client in [c for c in self.clients if c.token_id == token_id]:
            client.revoked()

    def kill_tenant(self, slug: str) -> int | None:
        """End every client connection of tenant ``slug`` (admin KILL).

        Returns: how many were ended, or None when the tenant is unknown to this proxy.
        """
        victims = [c for c in self.clients
                   if c.context is not None and c.context.identity.slug == slug]
        for client in victims:
            client.terminate(f"terminated by the administrator (KILL {slug})")
        if victims or any(key[2] == slug for key in self.metrics.tenants):
            log.warning("admin: KILL %s: %d client connection(s) ended", slug, len(victims))
            return len(victims)
        return None

    def request_shutdown(self, why: str) -> None:
        """Stop the proxy soon (admin SHUTDOWN); the caller's reply goes out first."""
        if self._shutdown is None:
            log.warning("pgtenant: %s: shutting down", why)
            self._shutdown = asyncio.get_running_loop().create_task(self.stop())

    def reload(self) -> list[str]:
        """Re-read the config file and apply what can change while running (RELOAD, SIGHUP).

        Returns: one line per notable outcome (what changed, what needs a restart).
        Raises: ConfigError (the running config stays as it was).
        """
        if self.config_path is None:
            return ["no config file to reload: the proxy was started from a Config object"]
        old, new = self.config, load_config(self.config_path)
        notes: list[str] = []
        keep: dict[str, object] = {}
        for f in dataclasses.fields(Config):
            if getattr(new, f.name) == getattr(old, f.name) or f.name == "databases":
                continue
            if not f.metadata.get("reload", True) or f.name in ("tls", "control", "jwt"):
                notes.append(f"{f.name} changed: takes effect after a restart")
                keep[f.name] = getattr(old, f.name)
            elif f.name == "metrics" and new.metrics.listen != old.metrics.listen:
                notes.append("metrics.listen changed: takes effect after a restart")
                keep[f.name] = dataclasses.replace(new.metrics, listen=old.metrics.listen)
            else:
                notes.append(f"{f.name} changed")
        databases = dict(new.databases)
        for name, db in old.databases.items():
            if name not in databases:
                notes.append(f"database {name!r} removed: still served until a restart")
                databases[name] = db
            elif databases[name].dsn != db.dsn or databases[name].control_dsn != db.control_dsn:
                key = "dsn" if databases[name].dsn != db.dsn else "control_dsn"
                notes.append(f"databases.{name}.{key} changed: takes effect after a restart")
                databases[name] = dataclasses.replace(databases[name], dsn=db.dsn,
                                                      control_dsn=db.control_dsn)
            elif databases[name] != db:
                notes.append(f"databases.{name} changed")
        for name in databases.keys() - old.databases.keys():
            notes.append(f"database {name!r} added")
        config = dataclasses.replace(new, databases=databases, **keep)  # type: ignore[arg-type]
        self.config = config
        for name, db in databases.items():
            pool = self.pools.get(name)
            if pool is None:
                pool = self.pools[name] = Pool(db, config, server_tls=self.server_tls)
                pool.verifier = self._verify_database
                self.holds.apply_to(pool)
            pool.db, pool.config = db, config
            pool.dispatch()  # a bigger pool_size may serve waiters now
        if (config.protected_settings != old.protected_settings
                or config.max_parsed_query_size != old.max_parsed_query_size):
            # New sessions get the new guards; open ones keep theirs.
            self.guard = self._new_guards(config, self.guard.refusals_by_rule)
        self.registry.ttl = config.token_cache_ttl
        self.auth_throttle = AuthThrottle(config.auth_failure_limit, config.auth_failure_window,
                                          config.auth_failure_delay)
        self.metrics.top_tenants = config.metrics.top_tenants
        self._share()
        logging.getLogger().setLevel(config.log_level.upper())
        if not notes:
            notes.append("no changes")
        for note in notes:
            log.info("reload %s: %s", self.config_path, note)
        return notes

    def database_stats(self, name: str) -> tuple[list[int], list[int]]:
        """Returns: PgBouncer's SHOW STATS totals and per-second averages for ``name`` (times
        in microseconds), averages over the current stats period (up to 60 s)."""
        totals = self._totals(name)
        now = time.monotonic()
        start, prev = self._stats_prev.get(name, (self.started_at, [0.0] * len(totals)))
        span = max(now - start, 1e-9)
        d = [t - p for t, p in zip(totals, prev, strict=True)]
        xacts, queries = d[1], d[2]
        avg = [d[0] / span, xacts / span, queries / span, d[3] / span, d[4] / span,
               d[5] / xacts if xacts else 0, d[6] / queries if queries else 0,
               d[7] / xacts if xacts else 0, 0, 0, 0, d[11] / span]
        return [int(v) for v in totals], [int(v) for v in avg]

    def _totals(self, name: str) -> list[float]:
        out = [0.0] * 12
        for (db, _), s in self.metrics.by_label.items():
            if db != name:
                continue
            for i, v in ((0, s.transactions), (1, s.transactions), (2, s.queries),
                         (3, s.bytes_received), (4, s.bytes_sent),
                         (5, s.transaction_seconds.total * 1e6),
                         (6, s.query_seconds.total * 1e6), (7, s.wait_seconds.total * 1e6),
                         (11, s.logins)):
                out[i] += v
        return out

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _janitor_loop(self) -> None:
        """One sweep for every timeout; no timer per connection."""
        while True:
            await asyncio.sleep(_JANITOR_INTERVAL)
            now = time.monotonic()
            self.holds.check()  # before the pools: an expired hold serves its waiters
            for pool in list(self.pools.values()):
                pool.tick(now)
            for name in self.pools:
                start, _ = self._stats_prev.get(name, (self.started_at, []))
                if now - start >= _STATS_PERIOD:
                    self._stats_prev[name] = (now, self._totals(name))
            for client in list(self.clients):
                client.check_timeouts(now)

    async def drain(self, timeout: float) -> None:
        """Graceful stop (SIGTERM): accept no one; end each client at its next transaction
        boundary (idle ones by this loop, within 50 ms of their server's release; one that
        asks for its next transaction first gets 57P01 before it starts: see
        session.Session._request_server); return
        as soon as no client is left, or after ``timeout`` seconds end everything (``stop``).
        """
        self.stopping = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        log.info("pgtenant: draining: %d client(s); running transactions may finish within "
                 "%gs (shutdown_timeout)", len(self.clients), timeout)
        while True:
            for client in list(self.clients):
                if not client.has_running_transaction:
                    client.terminate("pgtenant is shutting down")
            if not self.clients or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if self.clients:
            log.warning("pgtenant: shutdown_timeout reached with %d transaction(s) still "
                        "running; closing them", len(self.clients))
        await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.http is not None:
            await self.http.close()
        if self._control is not None:
            await self._control.close()
        if self._janitor is not None:
            self._janitor.cancel()
        for client in list(self.clients):
            client._disconnect("proxy shutting down")
        for pool in self.pools.values():
            await pool.close()
        await self.registry.close()
        self.stopped.set()


def serve(config: Config, config_path: str | Path | None = None,
          worker: WorkerInfo | None = None) -> None:
    """Run the proxy on uvloop until SIGINT/SIGTERM or SHUTDOWN; SIGHUP reloads
    ``config_path``."""
    log.info("pgtenant %s: protocol core %s", __version__, build_kind())

    async def main() -> None:
        app = App(config, config_path, worker)
        await app.start()
        loop = asyncio.get_running_loop()
        shutdowns: set[asyncio.Task[None]] = set()

        def on_signal(sig: int) -> None:
            # SIGTERM drains, SIGINT stops at once; SIGINT during a drain cuts it short.
            if sig == signal.SIGINT:
                for task in shutdowns:
                    task.cancel()
                shutdowns.clear()
                shutdowns.add(asyncio.ensure_future(_shutdown(app, sig)))
            elif not shutdowns:
                shutdowns.add(asyncio.ensure_future(_shutdown(app, sig)))

        def on_hup() -> None:
            try:
                app.reload()
            except ConfigError as exc:
                log.error("reload on SIGHUP failed, the running config stays: %s", exc.message)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await app.stopped.wait()

    async def _shutdown(app: App, sig: int) -> None:
        log.info("pgtenant: %s received, shutting down", signal.Signals(sig).name)
        if sig == signal.SIGTERM:
            await app.drain(app.config.shutdown_timeout)
        else:
            await app.stop()

    uvloop.run(main())
