"""Checking the password a client's startup carried: a tenant token (registry lookup, user
match, tenant type, routing, the tenant's caps) or the admin token, with failures throttled;
and the statement policies the tenant's session then gets.

Owns the login decisions and their refusals (with the SQLSTATEs clients see). It does not own
the connection: ``client.py`` calls these, keeps the slots they imply and greets the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from .config import Config, TenantLimitsConfig, TenantTypeConfig
from .errors import AuthFailed, AuthRefused, UnknownDatabase, WrongUser
from .guard import Guard, PinCapped
from .identity.context import TenantContext, TenantIdentity
from .identity.registry import Registry
from .identity.throttle import AuthThrottle
from .protocol.inject import injection
from .protocol.refusal import StatementPolicy
from .protocol.tracker import Link

__all__ = [
    "Attempt",
    "attempt_fingerprint",
    "check_admin_token",
    "check_user",
    "new_link",
    "outside_transaction_check",
    "pin_capped",
    "resolve_tenant",
    "served_from",
    "tenant_caps",
    "token_revoked",
]


def attempt_fingerprint(user: str, database: str, token: str) -> str:
    """Returns: the fingerprint of a login attempt for the throttle (user, database, token
    hash), the same on libpq's sslmode=prefer retry of it; no token is kept."""
    return hashlib.sha256("\0".join((user, database, token)).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt: who asked, from where, with which password."""

    peer: str
    user: str
    database: str
    token: str

    @property
    def fingerprint(self) -> str:
        return attempt_fingerprint(self.user, self.database, self.token)


async def _throttled_failure(throttle: AuthThrottle, attempt: Attempt, started: float,
                             delay: float) -> None:
    """Count a failed attempt, then wait out its delay (only failures wait: the delay was
    decided when the attempt started, so the attempt that reaches the limit is still
    answered at once; see identity/throttle.py for why)."""
    throttle.record_failure(attempt.peer, started, attempt.fingerprint)
    if delay > 0:
        await asyncio.sleep(delay)


async def check_admin_token(throttle: AuthThrottle, config: Config, attempt: Attempt) -> bool:
    """Returns: whether ``attempt`` carries the admin token (a failure is throttled)."""
    started = time.monotonic()
    delay = throttle.delay_for(attempt.peer, started, attempt.fingerprint)
    expected = config.admin.token_sha256 or ""
    given = hashlib.sha256(attempt.token.encode()).hexdigest()
    if hmac.compare_digest(given, expected):
        return True
    await _throttled_failure(throttle, attempt, started, delay)
    return False


async def resolve_tenant(registry: Registry, throttle: AuthThrottle, config: Config,
                         attempt: Attempt) -> tuple[TenantIdentity, TenantTypeConfig]:
    """Look the token up and check it may log in as the user it came with.

    Returns: the tenant's identity and tenant type.
    Raises: AuthFailed (28P01, after the throttle's delay) for an unknown token; WrongUser
    or AuthRefused (28000); whatever the registry raises (ServerUnavailable...).
    """
    started = time.monotonic()
    delay = throttle.delay_for(attempt.peer, started, attempt.fingerprint)
    identity = await registry.resolve(attempt.token)
    if identity is None:
        await _throttled_failure(throttle, attempt, started, delay)
        raise AuthFailed(
            f'password authentication failed for user "{attempt.user}"',
            hint="pgtenant expects a valid, unexpired, unrevoked token as the password",
        )
    check_user(attempt.user, identity.slug, config.any_user)
    tenant_type = config.tenant_types.get(identity.tenant_type)
    if tenant_type is None:
        raise AuthRefused(
            f"tenant {identity.slug!r} has tenant type {identity.tenant_type!r}, "
            "which this proxy has no [tenant_types] entry for"
        )
    return identity, tenant_type


def check_user(user: str, slug: str, any_user: Collection[str]) -> None:
    """Fail closed on a user name that does not match the token: a client that asked
    for user "bob" must not silently run as whichever tenant its password names.
    Naming the token's tenant only tells what the holder of the token can learn anyway.

    Raises: WrongUser (28000) unless the user is ``slug`` or listed in ``any_user``.
    """
    if user == slug or user in any_user or "*" in any_user:
        return
    raise WrongUser(
        f'the token belongs to user "{slug}", not "{user}"',
        hint=f'connect with user={slug}, or list the user name in any_user')


def served_from(database: str | None, asked: str, slug: str,
                databases: Mapping[str, object]) -> str:
    """Database per tenant: serve the tenant from its own [databases.<name>] (its
    organization row's, else its tenant type's), whatever dbname it asked for.

    Returns: the database to serve the tenant from (``asked`` when it has none of its own).
    Raises: UnknownDatabase when that database is not configured here.
    """
    if database is None or database == asked:
        return asked
    if database not in databases:
        raise UnknownDatabase(
            f"tenant {slug!r} is served from database {database!r}, which is not "
            "configured in this pgtenant", hint=f"add [databases.{database}]")
    return database


def tenant_caps(tenant_type: TenantTypeConfig, limits: TenantLimitsConfig) -> tuple[int, int]:
    """Returns: (max server connections, max client connections) of a tenant of
    ``tenant_type``: its own, else the proxy's [tenant_limits]."""
    max_servers = (tenant_type.max_server_connections
                   if tenant_type.max_server_connections is not None
                   else limits.max_server_connections)
    max_clients = (tenant_type.max_client_connections
                   if tenant_type.max_client_connections is not None
                   else limits.max_client_connections)
    return max_servers, max_clients


def outside_transaction_check(guard: Guard, tenant_type: TenantTypeConfig
                              ) -> Callable[[bytes], bool] | None:
    """Returns: the test for statements ``tenant_type`` may run outside a transaction
    (None: no such statement)."""
    allowed = frozenset(tenant_type.allow_outside_transaction)
    if not allowed:
        return None
    kind_of = guard.outside_transaction_kind
    return lambda sql: kind_of(sql) in allowed


def pin_capped(check: StatementPolicy, may_pin: Callable[[], bool],
               limit: Callable[[], int]) -> StatementPolicy:
    """Returns: the statement guard's ``check``, plus the tenant's cap on pinned servers
    (a statement that would pin one more server than max_pinned_servers, ``limit()``, is
    refused before it runs, so one tenant cannot starve the pool by pinning; ``may_pin()``
    says whether the session may pin: it already does, or its tenant is under the cap; see
    ClientLimits.may_pin)."""
    return PinCapped(check, may_pin, limit)


def new_link(config: Config, context: TenantContext, signing_key: bytes | None,
             settings: tuple[tuple[str, str], ...], client_encoding: str, *, guard: Guard,
             tenant_type: TenantTypeConfig, may_pin: Callable[[], bool],
             max_pinned: Callable[[], int], omit: frozenset[str] = frozenset()) -> Link:
    """Returns: the Link (protocol/tracker.py) of a tenant's session: its context injection
    and the statement policies of its tenant type (``guard``), with the cap on pinned
    servers (``max_pinned()``: read when a statement is refused, so a reload applies);
    ``omit``: the app.* names every server's session holds as '' (protocol/inject.py)."""
    return Link(injection(context, signing_key, settings,
                          set_local=config.context_statements == "set_local", omit=omit),
                config.max_message_size,
                guard=pin_capped(guard.check, may_pin, max_pinned),
                outside_txn=outside_transaction_check(guard, tenant_type),
                max_prepared=config.max_prepared_statements,
                client_encoding=client_encoding)


def token_revoked() -> AuthFailed:
    """Returns: the error that ends a session whose token was revoked."""
    return AuthFailed("token revoked: this session's token was revoked",
                      hint="reconnect with a valid token")
