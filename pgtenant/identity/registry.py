"""The tenant registry: token -> TenantIdentity, through asyncpg with a short cache.

Owns the control-plane connection pool (as the control role of ``[control] dsn``, the only
role that may call the lookup functions; never the data path's login role), the cache
(positive and negative answers live ``token_cache_ttl`` seconds; concurrent lookups of one
key share one query), the choice
between opaque ``pgt_`` tokens (``pgtenant.resolve_token``) and JWTs (``jwt.py`` verifies,
``pgtenant.resolve_org`` names the organization), and the revocation listener: one dedicated
connection LISTENs on ``pgtenant_tokens``, where a trigger installed by ``pgtenant init``
sends the id of every token revoked or deleted. A tenant whose organization is not 'ready'
(``tenant provision``/``tenant drop`` in progress) is refused with ``TenantNotReady``. A
notified id is dropped from the cache and remembered, so new logins with it fail at once and
``session.py`` ends its open sessions at their next transaction (``is_revoked``). It does not
own the schema (``control/``) nor what a failed lookup looks like on the wire (``client.py``).

While the listener is disconnected, revocations are only as fast as the cache TTL; on every
reconnect the cache is cleared, because notifications sent meanwhile are lost. Sessions
opened before a missed revocation are not ended (the control role cannot list revocations).

The same connection LISTENs on ``pgtenant_holds`` for the migration runner's tenant holds
(``control/migrations/holds.py``). A notification only means "re-read": the holds in force
come from ``pgtenant.active_holds()`` (any role may NOTIFY, so a tenant must not be able to
hold another by forging one), read again on every (re)connect so a missed NOTIFY is caught
up, and handed to ``on_holds``. ``ack_hold`` answers the runner on this connection (the
runner knows the proxies by their listener's pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from uuid import UUID

import asyncpg

from ..config import Dsn
from ..errors import ProxyError, ServerUnavailable
from .context import TenantIdentity
from .jwt import JwtVerifier, looks_like_jwt
from .tokens import hash_token, looks_like_token

__all__ = ["HOLD_ACK_CHANNEL", "HOLD_CHANNEL", "REVOCATION_CHANNEL", "Registry", "TenantNotReady"]

log = logging.getLogger("pgtenant.registry")

# Must match the channel of the trigger in control/schema.py.
REVOCATION_CHANNEL = "pgtenant_tokens"
# Must match control/schema.py's HOLD_CHANNEL and HOLD_ACK_CHANNEL (identity/ does not
# import control/).
HOLD_CHANNEL = "pgtenant_holds"
HOLD_ACK_CHANNEL = "pgtenant_hold_acks"
_HOLDS_SQL = "SELECT org_id, run_id, seconds_left FROM pgtenant.active_holds()"

# SELECT *: a control schema from before database_name still resolves (re-run init).
_RESOLVE_SQL = "SELECT * FROM pgtenant.resolve_token($1)"
_RESOLVE_ORG_SQL = "SELECT * FROM pgtenant.resolve_org($1)"
# Organization lookups share the cache with token hashes (32 bytes); the prefix keeps the
# two key spaces apart.
_ORG_KEY_PREFIX = b"org:"
# Stand-in token id of a cached organization; replaced by the JWT's own id before use.
_NO_TOKEN = UUID(int=0)
# Bound the cache so a flood of random tokens cannot grow memory without limit.
_MAX_CACHE = 100_000
# Revoked ids are remembered for open sessions; past this many, the oldest are forgotten
# (their tokens are refused by the database anyway; only very old open sessions could stay).
_MAX_REVOKED = 100_000
_BACKOFF_MIN = 0.25
_BACKOFF_MAX = 30.0
# A LISTEN connection only reads; a query this often detects a peer that vanished silently.
_KEEPALIVE = 10.0
# How long start() waits for the first LISTEN before letting the proxy start anyway.
_START_WAIT = 5.0
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class TenantNotReady(ProxyError):
    """A valid token of a tenant that is being provisioned or dropped (``status`` of its
    organization is not 'ready'). 57P03 cannot_connect_now, as Postgres answers while it
    starts up: drivers and poolers treat it as "retry later", not as a wrong password.
    Raised, not cached, so the tenant can log in the moment it becomes ready."""

    sqlstate = "57P03"


def _check_ready(row: asyncpg.Record) -> None:
    # A control schema from before the status column has no such field: every tenant there
    # is ready (re-run init to get the column).
    status = row.get("status") or "ready"
    if status != "ready":
        what = ("being provisioned" if status == "provisioning" else
                "being dropped" if status == "dropping" else status)
        raise TenantNotReady(
            f'tenant "{row["slug"]}" is not ready: it is {what}',
            hint="retry once `pgtenant tenant provision` has finished" if status ==
            "provisioning" else "the tenant is being removed (`pgtenant tenant drop`)",
        )


class Registry:
    """Resolves tokens on the control database; see the module docstring."""

    def __init__(self, dsn: Dsn, ttl: float, *, jwt: JwtVerifier | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.dsn = dsn
        self.ttl = ttl
        self.jwt = jwt
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.listening = False
        self._cache: dict[bytes, tuple[float, TenantIdentity | None]] = {}
        self._inflight: dict[bytes, asyncio.Task[TenantIdentity | None]] = {}
        self._revoked: dict[UUID, None] = {}  # insertion-ordered set
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listen_tried = asyncio.Event()
        # Called with each newly revoked token id: the proxy ends the token's open sessions
        # (a pinned session never asks for a server again, so is_revoked alone misses it).
        self.on_revoked: Callable[[UUID], None] | None = None
        # Called with every tenant hold in force (org id -> (run id, seconds left)) each time
        # they are read; see the module docstring.
        self.on_holds: Callable[[dict[UUID, tuple[int, float]]], None] | None = None
        self._holds_dirty = asyncio.Event()
        self._conn_lock = asyncio.Lock()  # one query at a time on the listener connection
        self._holds_unavailable = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the revocation listener and wait (briefly) for its first attempt.

        Returns: None, also when the control database is unreachable (the listener keeps
        retrying in the background; lookups fail closed meanwhile).
        """
        if self._listener is None:
            self._listener = asyncio.ensure_future(self._listen_forever())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listen_tried.wait(), _START_WAIT)

    async def close(self) -> None:
        """Stop the listener and close the control connections.

        Returns: None.
        """
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except _DB_ERRORS:
                conn.terminate()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------ revocation

    def is_revoked(self, token_id: UUID) -> bool:
        """Returns: whether a revocation of ``token_id`` was notified since start."""
        return token_id in self._revoked

    def revoked(self, token_id: UUID) -> None:
        """Remember ``token_id`` as revoked and drop every cached answer for it.

        Returns: None.
        """
        if token_id in self._revoked:
            return
        if len(self._revoked) >= _MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]
        self._revoked[token_id] = None
        # A scan, not an index: revocations are rare, lookups are the hot path.
        stale = [k for k, (_, ident) in self._cache.items()
                 if ident is not None and ident.token_id == token_id]
        for key in stale:
            del self._cache[key]
        log.info("token %s revoked: refused from now on (%d cached login(s) dropped)",
                 token_id, len(stale))
        if self.on_revoked is not None:
            self.on_revoked(token_id)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            token_id = uuid.UUID(str(payload))
        except ValueError:
            log.warning("ignoring malformed %s notification %r", channel, payload)
            return
        self.revoked(token_id)

    def _on_hold_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._holds_dirty.set()  # a hint only: the holds are re-read (see the docstring)

    async def _read_holds(self, conn: asyncpg.Connection) -> None:
        if self.on_holds is None or self._holds_unavailable:
            return
        try:
            async with self._conn_lock:
                rows = await conn.fetch(_HOLDS_SQL, timeout=_KEEPALIVE)
        except (asyncpg.UndefinedFunctionError, asyncpg.InsufficientPrivilegeError) as exc:
            # an install from before holds: migrations still work, without the proxy's help
            self._holds_unavailable = True
            log.warning("tenant holds unavailable (%s): re-run `pgtenant init` so proxies "
                        "hold tenants during their migrations", exc)
            return
        self.on_holds({r["org_id"]: (r["run_id"], r["seconds_left"]) for r in rows})

    async def _holds_loop(self, conn: asyncpg.Connection) -> None:
        while True:
            await self._holds_dirty.wait()
            self._holds_dirty.clear()  # notifications meanwhile: one more read after this
            try:
                await self._read_holds(conn)
            except _DB_ERRORS as exc:
                log.warning("tenant holds: cannot read them: %s", exc)
                await asyncio.sleep(_BACKOFF_MIN)
                self._holds_dirty.set()
                if conn.is_closed():
                    return

    async def ack_hold(self, org_id: UUID, run_id: int) -> None:
        """Tell the migration runner this proxy runs no transaction of ``org_id`` any more.

        Returns: None; without a listener connection nothing is sent (the runner then waits
        its drain timeout, then relies on the DDL's lock_timeout).
        """
        conn = self._listen_conn
        if conn is None or conn.is_closed():
            return
        try:
            async with self._conn_lock:
                await conn.execute("SELECT pg_notify($1, $2)", HOLD_ACK_CHANNEL,
                                   f"{org_id} {run_id}", timeout=_KEEPALIVE)
        except _DB_ERRORS as exc:
            log.warning("tenant holds: cannot answer the runner: %s", exc)

    async def _listen_forever(self) -> None:
        backoff = _BACKOFF_MIN
        connected_before = False
        while True:
            try:
                conn = await asyncpg.connect(
                    self.dsn.to_url(), timeout=10,
                    server_settings={"application_name": "pgtenant-revocations"},
                )
            except _DB_ERRORS as exc:
                # Where and as whom, so the operator can tell a stopped Postgres from a
                # wrong [control] dsn; never the password.
                log.warning("revocation listener: cannot connect to the control database at "
                            "%s:%s as %r (%s); is PostgreSQL running, is [control] dsn "
                            "right? retrying in %.2fs",
                            self.dsn.unix_socket or self.dsn.host, self.dsn.port,
                            self.dsn.user, getattr(exc, "strerror", None) or exc, backoff)
                self._listen_tried.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            self._listen_conn = conn
            try:
                await self._listen_on(conn, reconnected=connected_before)
                reason = "connection lost"
            except _DB_ERRORS as exc:
                reason = str(exc) or type(exc).__name__
            if self.listening:  # LISTEN had worked: a drop, so retry quickly
                self.listening = False
                connected_before = True
                backoff = _BACKOFF_MIN
            self._listen_conn = None
            conn.terminate()
            log.warning("revocation listener: %s; reconnecting in %.2fs", reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _listen_on(self, conn: asyncpg.Connection, *, reconnected: bool) -> None:
        """LISTEN on ``conn`` until it is lost; sets ``listening`` once LISTEN worked.

        Returns: None when the connection ends.
        Raises: asyncpg/OS errors from LISTEN or the keepalive query.
        """
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(REVOCATION_CHANNEL, self._on_notify)
        await conn.add_listener(HOLD_CHANNEL, self._on_hold_notify)
        self._holds_unavailable = False  # `pgtenant init` may have been re-run meanwhile
        await self._read_holds(conn)  # holds announced while we were away
        if reconnected:
            # Notifications sent while we were away are lost: trust no cached answer.
            self._cache.clear()
            log.info("revocation listener: reconnected; token cache cleared")
        else:
            log.info("revocation listener: listening on %s", REVOCATION_CHANNEL)
        self.listening = True
        self._listen_tried.set()
        holds = asyncio.ensure_future(self._holds_loop(conn))
        try:
            while not conn.is_closed() and not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), _KEEPALIVE)
                except TimeoutError:
                    async with self._conn_lock:
                        await conn.execute("SELECT 1", timeout=_KEEPALIVE)
        finally:
            holds.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_DB_ERRORS):
                await holds

    # ------------------------------------------------------------------ lookups

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self.dsn.to_url(), min_size=0, max_size=4, timeout=10,
                        statement_cache_size=16,
                        server_settings={"application_name": "pgtenant-registry"},
                    )
                except _DB_ERRORS as exc:
                    raise ServerUnavailable(
                        f"cannot reach the control database to verify tokens: {exc}"
                    ) from exc
            return self._pool

    async def resolve(self, token: str) -> TenantIdentity | None:
        """Look a token up: an opaque ``pgt_`` token, or a JWT when ``[jwt]`` is configured.

        Returns: the identity, or None for a wrong, expired or revoked token, and for a JWT
        that does not verify, names an unknown organization or another tenant type (callers
        must not tell these apart to the client).
        Raises: ServerUnavailable when the control database cannot answer (fail closed).
        """
        if looks_like_token(token):
            key = hash_token(token)
            identity = await self._cached(key, lambda: self._query_token(key))
            # A lookup that raced a revocation may have cached the token again.
            if identity is None or identity.token_id in self._revoked:
                return None
            return identity
        if self.jwt is not None and looks_like_jwt(token):
            return await self._resolve_jwt(self.jwt, token)
        return None

    async def _resolve_jwt(self, verifier: JwtVerifier, token: str) -> TenantIdentity | None:
        # Signatures are checked on every login (cheap, and exp must be honoured to the
        # second); only the organization lookup is cached.
        claims = verifier.verify(token)
        if claims is None:
            return None
        org_id = claims.org_id
        org = await self._cached(_ORG_KEY_PREFIX + org_id.bytes, lambda: self._query_org(org_id))
        if org is None:
            return None
        if claims.tenant_type is not None and claims.tenant_type != org.tenant_type:
            return None
        if claims.token_id in self._revoked:
            return None
        return dataclasses.replace(org, token_id=claims.token_id, entity_id=claims.entity_id)

    async def _cached(
        self, key: bytes, load: Callable[[], Awaitable[TenantIdentity | None]]
    ) -> TenantIdentity | None:
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self.hits += 1
            return cached[1]
        self.misses += 1
        task = self._inflight.get(key)
        if task is None:
            # One lookup per key however many clients ask at once. It runs in its own task,
            # so a client that gives up (disconnects, times out) cannot cancel it for others.
            task = asyncio.ensure_future(self._lookup(key, load))
            # Mark a failure retrieved even when every asking client has gone meanwhile.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _lookup(
        self, key: bytes, load: Callable[[], Awaitable[TenantIdentity | None]]
    ) -> TenantIdentity | None:
        try:
            identity = await load()
        finally:
            self._inflight.pop(key, None)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[key] = (self.clock() + self.ttl, identity)
        return identity

    async def _fetchrow(self, sql: str, arg: object) -> asyncpg.Record | None:
        pool = await self._get_pool()
        try:
            return await pool.fetchrow(sql, arg)
        except _DB_ERRORS as exc:
            log.error("token lookup failed: %s", exc)
            raise ServerUnavailable(f"token lookup failed on the control database: {exc}") from exc

    async def _query_token(self, key: bytes) -> TenantIdentity | None:
        row = await self._fetchrow(_RESOLVE_SQL, key)
        if row is None:
            return None
        _check_ready(row)
        return TenantIdentity(
            org_id=row["org_id"], slug=row["slug"], tenant_type=row["tenant_type"],
            token_id=row["token_id"], entity_id=row["entity_id"], schema=row["schema_name"],
            database=row.get("database_name"),
        )

    async def _query_org(self, org_id: UUID) -> TenantIdentity | None:
        row = await self._fetchrow(_RESOLVE_ORG_SQL, org_id)
        if row is None:
            return None
        _check_ready(row)
        return TenantIdentity(
            org_id=row["org_id"], slug=row["slug"], tenant_type=row["tenant_type"],
            token_id=_NO_TOKEN, schema=row["schema_name"], database=row.get("database_name"),
        )
