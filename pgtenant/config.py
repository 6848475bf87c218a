"""pgtenant's configuration as data: the frozen dataclasses every section becomes, each key's
documentation and default (``_doc``), and the backend DSN parser.

Reading and validating a TOML file into these is ``configfile.py``'s; reloading is
``app.py``'s. Key names follow PgBouncer where PgBouncer has one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError

__all__ = [
    "OUTSIDE_TXN",
    "PLACEHOLDER_PASSWORDS",
    "TEMPLATE_FIELDS",
    "AdminConfig",
    "AuditConfig",
    "Config",
    "ControlConfig",
    "DatabaseConfig",
    "Dsn",
    "JwtConfig",
    "MetricsConfig",
    "MigrationsConfig",
    "TenantLimitsConfig",
    "TenantTypeConfig",
    "TlsConfig",
    "is_loopback",
    "parse_dsn",
    "placeholder_passwords",
    "redact_dsn",
]

_LOG_LEVELS = ("debug", "info", "warning", "error")
# Statements that cannot run inside a transaction block and that a tenant type may allow
# (never CREATE/DROP DATABASE). Names as the statement guard reports them.
OUTSIDE_TXN = ("VACUUM", "CREATE INDEX CONCURRENTLY", "DROP INDEX CONCURRENTLY",
               "REINDEX CONCURRENTLY", "CLUSTER")
# Placeholders a tenant-type template may use; anything else is refused at load time.
TEMPLATE_FIELDS = frozenset({"slug", "org_id", "schema"})


def _doc(doc: str, *, unit: str = "", reload: bool = True,
         choices: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"doc": doc, "unit": unit, "reload": reload, "choices": choices}


@dataclass(frozen=True, slots=True, kw_only=True)
class Dsn:
    """A parsed ``postgresql://user:password@host:port/dbname?key=value`` URL."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    dbname: str = "postgres"
    # Extra startup parameters sent to the backend (e.g. application_name).
    params: tuple[tuple[str, str], ...] = ()

    @property
    def unix_socket(self) -> str | None:
        """Path of the Unix socket when ``host`` is a directory, as libpq does."""
        if self.host.startswith("/"):
            return f"{self.host.rstrip('/')}/.s.PGSQL.{self.port}"
        return None

    def to_url(self) -> str:
        """Returns: the DSN as a URL asyncpg and psycopg accept."""
        from urllib.parse import quote

        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        if self.unix_socket:
            return f"postgresql://{auth}@/{quote(self.dbname)}?host={quote(self.host)}&port={self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{quote(self.dbname)}"


def redact_dsn(url: str) -> str:
    """Returns: ``url`` with its password (userinfo or ``password=`` parameter) as ``***``.

    Error messages quote DSNs; a password must never reach a terminal or a log that way.
    """
    url = re.sub(r"(?<=://)([^/@?#:]*):[^/@?#]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)


def parse_dsn(url: str, *, key: str = "dsn") -> Dsn:
    """Parse a libpq-style URL.

    Returns: the ``Dsn``.
    Raises: ConfigError naming ``key`` when the URL is not ``postgres(ql)://``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{key}: expected a postgresql:// URL, got {redact_dsn(url)!r}")
    query = dict(parse_qsl(parts.query))
    host = query.pop("host", None) or parts.hostname or "127.0.0.1"
    try:
        port = int(query.pop("port", None) or parts.port or 5432)
    except ValueError:  # no chaining: the cause would quote the URL
        raise ConfigError(f"{key}: bad port in {redact_dsn(url)!r}") from None
    # Pop user/password/dbname from the query whatever the URL says, so they never end up
    # twice in the backend StartupMessage; the URL's own parts win, as in libpq.
    q_user, q_password, q_dbname = (query.pop(k, None) for k in ("user", "password", "dbname"))
    user = unquote(parts.username) if parts.username else q_user or "postgres"
    password = unquote(parts.password) if parts.password is not None else q_password
    dbname = unquote(parts.path.lstrip("/")) or q_dbname or user
    # libpq options that only matter to a client library are not startup parameters.
    for libpq_only in ("sslmode", "connect_timeout", "sslrootcert", "target_session_attrs"):
        query.pop(libpq_only, None)
    return Dsn(
        host=host, port=port, user=user, password=password, dbname=dbname,
        params=tuple(sorted(query.items())),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    """``[databases.<name>]``: clients connect with ``dbname=<name>``."""

    name: str
    dsn: Dsn = field(metadata=_doc("backend URL; its user is the proxy's login role", reload=True))
    pool_size: int = field(
        default=20,
        metadata=_doc("server connections for all tenants together (pgbouncer default_pool_size)"),
    )
    min_pool_size: int = field(
        default=0, metadata=_doc("server connections kept open even when idle (pgbouncer)")
    )
    reserve_pool: int = field(
        default=0,
        metadata=_doc("extra server connections allowed once a transaction has waited "
                      "reserve_pool_timeout (pgbouncer)"),
    )
    control_dsn: Dsn | None = field(
        default=None,
        metadata=_doc("URL of this database as the control role, for reading its "
                      "context-signing key; unset: [control] dsn's user and password with "
                      "this dsn's host, port and dbname", reload=False),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantTypeConfig:
    """``[tenant_types.<type>]``: how a tenant of this type is confined."""

    name: str
    role: str = field(metadata=_doc("non-login role template for SET LOCAL ROLE"))
    search_path: tuple[str, ...] = field(
        default=("public",), metadata=_doc("schema templates, in order")
    )
    allow_outside_transaction: tuple[str, ...] = field(
        default=(),
        metadata=_doc("statements of this type's tenants that may run outside a transaction "
                      "block, on a server that is then retired: " + ", ".join(OUTSIDE_TXN)),
    )
    max_server_connections: int | None = field(
        default=None,
        metadata=_doc("server connections one tenant of this type may hold at once "
                      "(0: no limit; unset: [tenant_limits])"),
    )
    max_client_connections: int | None = field(
        default=None,
        metadata=_doc("client connections one tenant of this type may open "
                      "(0: no limit; unset: [tenant_limits])"),
    )
    database: str | None = field(
        default=None,
        metadata=_doc("[databases.<name>] this type's tenants are served from, whatever "
                      "dbname they connect with (database per tenant type)"),
    )
    # Tenants of a type whose role is one static role (no "{" in the template) all act as
    # that one role: what Postgres protects per role (large objects, locks on shared
    # tables) or reveals around RLS (EXPLAIN ANALYZE's removed-row counts) is shared by
    # all of them. Unset: refused for such types, allowed for a role per tenant.
    allow_lock_table: bool | None = field(
        default=None,
        metadata=_doc("LOCK TABLE: one tenant's ACCESS EXCLUSIVE lock on a shared table "
                      "blocks every tenant (unset: refused when the role is shared by the "
                      "type's tenants, allowed with a role per tenant)"),
    )
    allow_large_objects: bool | None = field(
        default=None,
        metadata=_doc("large-object functions (lo_open, loread, lo_unlink...): large "
                      "objects are protected per role, so tenants sharing a role share them "
                      "(unset: refused when the role is shared, allowed with a role per "
                      "tenant)"),
    )
    allow_explain_analyze: bool | None = field(
        default=None,
        metadata=_doc("EXPLAIN ANALYZE: its \"Rows Removed by Filter\" counts rows row-level "
                      "security hides, a side channel on other tenants' data (unset: refused "
                      "when the role is shared, allowed with a role per tenant)"),
    )
    temp_tables: bool = field(
        default=True,
        metadata=_doc("temporary tables: init and provisioning grant this type's roles TEMP on "
                      "the database (false: revoke it, and CREATE TEMP fails with permission "
                      "denied). ON COMMIT DROP tables end with their transaction; other temp "
                      "objects pin the server to the client; the audit expects TEMP exactly "
                      "for the types that allow it (and [audit] allow_temp)"),
    )

    @property
    def shared_role(self) -> bool:
        """Whether every tenant of this type runs as the same role (a static template)."""
        return "{" not in self.role

    def allows(self, what: str) -> bool:
        """Returns: whether this type's tenants may use ``what`` ("lock_table",
        "large_objects" or "explain_analyze"); unset means: only with a role per tenant."""
        value: bool | None = getattr(self, f"allow_{what}")
        return not self.shared_role if value is None else value


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantLimitsConfig:
    """``[tenant_limits]``: per-tenant limits for tenant types that set none."""

    max_server_connections: int = field(
        default=0, metadata=_doc("server connections one tenant may hold at once (0: no limit)")
    )
    max_client_connections: int = field(
        default=0, metadata=_doc("client connections one tenant may open (0: no limit)")
    )
    max_pinned_servers: int = field(
        default=2,
        metadata=_doc("server connections one tenant's clients may keep for their session "
                      "(session state: SQL PREPARE, WITH HOLD cursors, session advisory "
                      "locks); statements that would pin one more are refused (0: no limit)"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    """``[control]``: where tokens and organizations live."""

    dsn: Dsn | None = field(
        default=None,
        metadata=_doc("control-schema URL, as the control role `pgtenant init` creates "
                      "(signing keys, token registry, revocations); unset: the (single) "
                      "database's dsn, i.e. the login role (older installs only)",
                      reload=False),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationsConfig:
    """``[migrations]``: the tenant migration runner (`pgtenant migrate`)."""

    dir: str = field(
        default="migrations",
        metadata=_doc("folder of NNNN_name.sql files, relative to the config file"),
    )
    lock_timeout_ms: int = field(
        default=2000,
        metadata=_doc("lock_timeout per tenant transaction; a timeout is retried with "
                      "backoff (--lock-timeout overrides)", unit="ms"),
    )
    statement_timeout_ms: int = field(
        default=300000,
        metadata=_doc("statement_timeout per tenant transaction (--statement-timeout "
                      "overrides)", unit="ms"),
    )
    hold: bool = field(
        default=True,
        metadata=_doc("while a tenant's DDL runs, every proxy on this control database "
                      "holds the tenant's new transactions (they wait up to "
                      "query_wait_timeout) instead of queueing them behind the DDL's locks"),
    )
    hold_ttl: float = field(
        default=15.0,
        metadata=_doc("a hold not refreshed by its runner (killed) expires after this",
                      unit="s"),
    )
    hold_drain_timeout: float = field(
        default=5.0,
        metadata=_doc("how long the runner waits for the proxies to finish the tenant's "
                      "running transactions before its DDL starts anyway", unit="s"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    """``[audit]``: what `pgtenant audit` (and the audit of provision and migrate) judges by."""

    tenant_columns: tuple[str, ...] = field(
        default=("org_id", "tenant_id", "organization_id"),
        metadata=_doc("columns that mark a table as holding tenant data"),
    )
    allow_temp: tuple[str, ...] = field(
        default=(),
        metadata=_doc("tenant types whose roles may hold TEMP on the database besides "
                      "those with temp_tables = true (an error for any other type)"),
    )
    baseline: str | None = field(
        default=None,
        metadata=_doc("baseline file of accepted findings, relative to the config file, "
                      "used by `migrate apply` and `tenant provision` (--baseline overrides "
                      "it for `pgtenant audit`)"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """``[admin]``: the admin console (``dbname=pgtenant``), a credential of its own."""

    users: tuple[str, ...] = field(
        default=("admin",), metadata=_doc("user names allowed on the admin console")
    )
    token_sha256: str | None = field(
        default=None,
        metadata=_doc("hex SHA-256 of the admin token (`pgtenant admin-token` makes one); "
                      "unset: no admin console"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (``/metrics``, ``/healthz``, ``/readyz``)."""

    listen: str | None = field(
        default=None,
        metadata=_doc("host:port of the HTTP endpoint; unset: no endpoint", reload=False),
    )
    top_tenants: int = field(
        default=20,
        metadata=_doc("tenants with their own per-tenant series (the busiest); the rest are "
                      "summed as tenant=\"other\""),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """``[tls]``: TLS towards clients (cert + key) and towards the backend."""

    cert_file: str | None = field(
        default=None, metadata=_doc("PEM certificate offered to clients (with key_file)")
    )
    key_file: str | None = field(default=None, metadata=_doc("PEM private key of cert_file"))
    server_tls: str = field(
        default="disable",
        metadata=_doc("TLS to the backend", choices=("disable", "prefer", "require",
                                                     "verify-ca", "verify-full")),
    )
    server_ca_file: str | None = field(
        default=None, metadata=_doc("CA bundle for verify-ca / verify-full to the backend")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    """``[jwt]``: JSON Web Tokens accepted as passwords besides opaque ``pgt_`` tokens."""

    algorithms: tuple[str, ...] = field(
        default=("HS256", "RS256", "ES256"), metadata=_doc("accepted signing algorithms")
    )
    secret: str | None = field(default=None, metadata=_doc("HS256 shared secret"))
    public_key_file: str | None = field(
        default=None, metadata=_doc("PEM public key for RS256/ES256")
    )
    jwks_file: str | None = field(default=None, metadata=_doc("JWKS file (keys by kid)"))
    issuer: str | None = field(default=None, metadata=_doc("required iss claim"))
    audience: str | None = field(default=None, metadata=_doc("required aud claim"))
    org_claim: str = field(default="org_id", metadata=_doc("claim holding the org id"))
    type_claim: str = field(
        default="tenant_type", metadata=_doc("claim holding the tenant type (checked)")
    )
    entity_claim: str = field(default="entity_id", metadata=_doc("claim holding the entity id"))
    leeway: float = field(default=0.0, metadata=_doc("clock skew allowed on exp/nbf", unit="s"))

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key_file or self.jwks_file)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. Pass it explicitly; never keep it in a global."""

    listen: tuple[str, int] = field(
        default=("127.0.0.1", 6432), metadata=_doc("host:port to accept clients on", reload=False)
    )
    allow_plaintext_remote: bool = field(
        default=False,
        metadata=_doc("accept cleartext tokens over plain TCP from non-loopback peers"),
    )
    max_client_conn: int = field(
        default=10000, metadata=_doc("client connections accepted at once (pgbouncer name)")
    )
    max_login_clients: int = field(
        default=1000,
        metadata=_doc("of max_client_conn, connections not yet authenticated at once; more "
                      "are refused at once with 53300, so sockets that never log in cannot "
                      "crowd out tenants (no pgbouncer equivalent)"),
    )
    max_parsed_query_size: int = field(
        default=64 * 1024,
        metadata=_doc("largest Query/Parse text the statement guard parses (texts with a word "
                      "it must check); a bigger one is refused unparsed (ERROR 54000), since "
                      "parsing blocks the proxy for every client (2-5 s per MB)",
                      unit="bytes"),
    )
    max_prepared_statements: int = field(
        default=200,
        metadata=_doc("prepared statements kept per server connection, least recently used "
                      "closed first (pgbouncer name and default)"),
    )
    max_message_size: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc("largest protocol message accepted from a client", unit="bytes"),
    )
    query_wait_timeout: float = field(
        default=120.0,
        metadata=_doc("how long a transaction waits for a server (pgbouncer default)", unit="s"),
    )
    reserve_pool_timeout: float = field(
        default=5.0,
        metadata=_doc("wait after which a database's reserve_pool may be used", unit="s"),
    )
    query_timeout: float = field(
        default=0.0,
        metadata=_doc("a query running longer is cancelled and its client disconnected "
                      "(0: off)", unit="s"),
    )
    idle_transaction_timeout: float = field(
        default=60.0,
        metadata=_doc("a client idle inside a transaction longer is disconnected (0: off); "
                      "on by default: an open transaction holds a pooled server (and its "
                      "locks) that other tenants wait for", unit="s"),
    )
    client_idle_timeout: float = field(
        default=0.0,
        metadata=_doc("a client idle outside transactions longer is disconnected (0: off)",
                      unit="s"),
    )
    server_idle_timeout: float = field(
        default=600.0,
        metadata=_doc("an idle server connection unused this long is closed (0: never)",
                      unit="s"),
    )
    server_lifetime: float = field(
        default=3600.0,
        metadata=_doc("a server connection this old is closed when next idle (0: never)",
                      unit="s"),
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata=_doc("on SIGTERM, how long running transactions may take to finish (the "
                      "proxy exits as soon as they are done)", unit="s"),
    )
    context_statements: str = field(
        default="set_local",
        metadata=_doc("how a simple Query's tenant context is sent: SET LOCAL statements "
                      "(cheapest for Postgres) or one set_config SELECT (one "
                      "pg_stat_statements entry on Postgres 15 and older, which key SET "
                      "statements by their text)", choices=("set_local", "set_config")),
    )
    log_format: str = field(
        default="text", metadata=_doc("log lines as text or JSON objects",
                                      choices=("text", "json")),
    )
    client_login_timeout: float = field(
        default=15.0,
        metadata=_doc("time allowed for startup and auth (pgbouncer: 60): each unauthenticated "
                      "socket holds one of max_login_clients this long", unit="s"),
    )
    server_connect_timeout: float = field(
        default=15.0, metadata=_doc("time allowed for a backend connect and login", unit="s")
    )
    token_cache_ttl: float = field(
        default=5.0, metadata=_doc("how long a token lookup is reused", unit="s")
    )
    log_level: str = field(
        default="info",
        metadata=_doc("debug, info, warning or error", choices=_LOG_LEVELS),
    )
    protected_settings: tuple[str, ...] = field(
        default=("app.",),
        metadata=_doc("settings (a trailing '.' means a prefix) tenants may not SET, RESET "
                      "or set_config; role, session_authorization and search_path always"),
    )
    lockdown_check: str = field(
        default="refuse",
        metadata=_doc("at start, check the database lockdown: refuse to start, warn, or off",
                      choices=("refuse", "warn", "off")),
    )
    context_signing: str = field(
        default="auto",
        metadata=_doc("also set app.tenant_sig (HMAC): on when pgtenant init installed it",
                      choices=("auto", "on", "off")),
    )
    any_user: tuple[str, ...] = field(
        default=(),
        metadata=_doc("user names accepted with any tenant's token, for clients that cannot "
                      "choose the user (\"*\": every name); otherwise the user must be the "
                      "token's tenant slug"),
    )
    auth_failure_limit: int = field(
        default=5, metadata=_doc("failed logins per client address before slowing it down")
    )
    auth_failure_window: float = field(
        default=60.0, metadata=_doc("window in which failures are counted", unit="s")
    )
    auth_failure_delay: float = field(
        default=2.0, metadata=_doc("delay before answering an address over the limit", unit="s")
    )
    control: ControlConfig = field(default_factory=ControlConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tenant_limits: TenantLimitsConfig = field(default_factory=TenantLimitsConfig)
    migrations: MigrationsConfig = field(default_factory=MigrationsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    jwt: JwtConfig = field(default_factory=JwtConfig)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    tenant_types: Mapping[str, TenantTypeConfig] = field(default_factory=dict)

    @property
    def control_dsn(self) -> Dsn:
        """Returns: the DSN used for token lookups."""
        if self.control.dsn is not None:
            return self.control.dsn
        return next(iter(self.databases.values())).dsn

    def key_dsn(self, db: DatabaseConfig) -> Dsn | None:
        """Where ``db``'s context-signing key is read, as the control role.

        Returns: ``db.control_dsn``; else ``[control] dsn``'s user and password at ``db``'s
        host, port and dbname; None when neither is configured (the caller falls back to
        the login role, which only an install from before the control role allows).
        """
        if db.control_dsn is not None:
            return db.control_dsn
        if self.control.dsn is None:
            return None
        return dataclasses.replace(db.dsn, user=self.control.dsn.user,
                                   password=self.control.dsn.password)


# Passwords that only ever stand for "put the real one here": config/pgtenant.example.toml's
# placeholder, and the word its dsns used before. A config still holding one is refused at
# start and by `pgtenant init --config`, which would otherwise make it the role's password.
PLACEHOLDER_PASSWORDS = frozenset({"CHANGE_ME", "secret"})


def placeholder_passwords(config: Config) -> list[str]:
    """Returns: one message per dsn of ``config`` whose password is a placeholder."""
    dsns: list[tuple[str, Dsn | None]] = [("control.dsn", config.control.dsn)]
    for name, db in config.databases.items():
        dsns += [(f"databases.{name}.dsn", db.dsn),
                 (f"databases.{name}.control_dsn", db.control_dsn)]
    return [
        f"{key}: the password of role {dsn.user!r} is the placeholder {dsn.password!r}; put "
        f"the role's real password there (`pgtenant init` prints it; `pgtenant init "
        f"--write-config PATH` writes a config with it)"
        for key, dsn in dsns if dsn is not None and dsn.password in PLACEHOLDER_PASSWORDS
    ]


def is_loopback(host: str) -> bool:
    """Returns: whether a peer address is on the loopback range."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
