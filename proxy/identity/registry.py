"""The tenant registry: token -> TenantIdentity, through asyncpg with a short cache.

Owns the control-plane connection pool and the cache (positive and negative answers live
``token_cache_ttl`` seconds; concurrent lookups of one token share one query). It does not
own the schema (``control/``) nor what a failed lookup looks like on the wire (``client.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from ..config import Dsn
from ..errors import ServerUnavailable
from .context import TenantIdentity
from .tokens import hash_token, looks_like_token

__all__ = ["Registry"]

log = logging.getLogger("pgtenant.registry")

_RESOLVE_SQL = (
    "SELECT token_id, org_id, slug, tenant_type, schema_name, entity_id "
    "FROM pgtenant.resolve_token($1)"
)
# Bound the cache so a flood of random tokens cannot grow memory without limit.
_MAX_CACHE = 100_000


class Registry:
    """Resolves tokens via ``pgtenant.resolve_token`` on the control database."""

    def __init__(self, dsn: Dsn, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.dsn = dsn
        self.ttl = ttl
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._cache: dict[bytes, tuple[float, TenantIdentity | None]] = {}
        self._inflight: dict[bytes, asyncio.Task[TenantIdentity | None]] = {}
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self.dsn.to_url(), min_size=0, max_size=4, timeout=10,
                        statement_cache_size=16,
                        server_settings={"application_name": "pgtenant-registry"},
                    )
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    raise ServerUnavailable(
                        f"cannot reach the control database to verify tokens: {exc}"
                    ) from exc
            return self._pool

    async def resolve(self, token: str) -> TenantIdentity | None:
        """Look a token up.

        Returns: the identity, or None for a wrong, expired or revoked token (callers must
        not tell these apart to the client).
        Raises: ServerUnavailable when the control database cannot answer (fail closed).
        """
        if not looks_like_token(token):
            return None
        key = hash_token(token)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self.hits += 1
            return cached[1]
        self.misses += 1
        task = self._inflight.get(key)
        if task is None:
            # One lookup per token however many clients ask at once. It runs in its own task,
            # so a client that gives up (disconnects, times out) cannot cancel it for others.
            task = asyncio.ensure_future(self._lookup(key))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _lookup(self, key: bytes) -> TenantIdentity | None:
        try:
            identity = await self._query(key)
        finally:
            self._inflight.pop(key, None)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[key] = (self.clock() + self.ttl, identity)
        return identity

    async def _query(self, key: bytes) -> TenantIdentity | None:
        pool = await self._get_pool()
        try:
            row = await pool.fetchrow(_RESOLVE_SQL, key)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.error("token lookup failed: %s", exc)
            raise ServerUnavailable(f"token lookup failed on the control database: {exc}") from exc
        if row is None:
            return None
        return TenantIdentity(
            org_id=row["org_id"], slug=row["slug"], tenant_type=row["tenant_type"],
            token_id=row["token_id"], entity_id=row["entity_id"], schema=row["schema_name"],
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
