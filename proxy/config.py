"""pgtenant's configuration: TOML in, frozen dataclasses out, strictly validated.

Owns parsing, validation (unknown keys are refused with a did-you-mean hint, every error
names its key) and the backend DSN parser. It does not own reloading (``app.py``) or any I/O
beyond reading the file it is given. Key names follow PgBouncer where PgBouncer has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError

__all__ = [
    "OUTSIDE_TXN",
    "PLACEHOLDER_PASSWORDS",
    "TEMPLATE_FIELDS",
    "AdminConfig",
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
    "load_config",
    "parse_config",
    "parse_dsn",
    "parse_listen",
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
        metadata=_doc("tenant types whose roles may hold TEMP on the database (an error "
                      "for any other type)"),
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


# --------------------------------------------------------------------------- validation

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_SWITCHES = ("allow_lock_table", "allow_large_objects", "allow_explain_analyze")


class _Errors:
    """Collects the ConfigErrors of independent parts of a config, so an operator sees every
    mistake of a file in one run instead of one per start.

    ``with errors:`` around a part records its ConfigError and carries on with the next part;
    a part that failed contributes nothing, and ``raise_if_any`` reports them all.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> bool:
        if isinstance(exc, ConfigError):
            self.messages.extend(exc.message.split("\n"))
            return True
        return False

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise ConfigError(f"{len(self.messages)} problems:\n"
                              + "\n".join(f"  - {m}" for m in self.messages))


def _reject_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    problems = []
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            loc = f"{where}.{key}" if where else key
            problems.append(f"unknown config key {loc!r}{suffix}")
    if problems:
        raise ConfigError("\n".join(problems))


def _typed(value: Any, kind: type, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")


def parse_listen(value: Any, key: str = "listen") -> tuple[str, int]:
    """Returns: (host, port) of a ``host:port`` text. Raises: ConfigError naming ``key``."""
    text = _typed(value, str, key)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected 'host:port', got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _check_template(text: str, key: str) -> None:
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{key}: bad template {text!r}: {exc}") from exc
    names = {f for _, f, _, _ in parts if f is not None}
    for _, name, spec, conversion in parts:
        if name is not None and (spec or conversion):
            raise ConfigError(
                f"{key}: placeholders take no conversion or format spec in {text!r}; "
                "write plain {slug}, {org_id} or {schema}"
            )
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ConfigError(
            f"{key}: unknown placeholder {{{sorted(unknown)[0]}}} in {text!r}; "
            f"allowed: {', '.join('{' + n + '}' for n in sorted(TEMPLATE_FIELDS))}"
        )


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a ``Config`` from a parsed TOML document.

    Every section (top-level keys, each database, each tenant type, each other table) is
    checked even after another failed, so one run reports every mistake of the file.

    Returns: the frozen ``Config``.
    Raises: ConfigError naming the offending key(s), one line per problem.
    """
    errors = _Errors()
    top_fields = {f.name for f in dataclasses.fields(Config)}
    with errors:
        _reject_unknown(data, top_fields, "")
    simple = {k: v for k, v in data.items()
              if k not in ("listen", "control", "databases", "tenant_types", "tls", "jwt",
                           "metrics", "admin", "tenant_limits", "migrations", "audit")}
    kwargs: dict[str, Any] = {}
    with errors:
        kwargs = _parse_simple(simple, Config, "")
    if "listen" in data:
        with errors:
            kwargs["listen"] = parse_listen(data["listen"])
    for key in ("max_client_conn", "max_login_clients", "max_parsed_query_size",
                "max_message_size", "max_prepared_statements",
                "query_wait_timeout", "reserve_pool_timeout", "shutdown_timeout",
                "client_login_timeout", "server_connect_timeout", "token_cache_ttl",
                "auth_failure_window"):
        if key in kwargs:
            with errors:
                _positive(kwargs[key], key)
    for key in ("auth_failure_limit", "auth_failure_delay", "query_timeout",
                "idle_transaction_timeout", "client_idle_timeout", "server_idle_timeout",
                "server_lifetime"):
        if kwargs.get(key, 0) < 0:
            errors.messages.append(f"{key}: must not be negative")
    if 0 < kwargs.get("max_message_size", 1 << 20) < 8192:
        errors.messages.append("max_message_size: must be at least 8192 bytes")

    databases: dict[str, DatabaseConfig] = {}
    raw_dbs: dict[str, Any] | None = None
    with errors:
        raw_dbs = _typed(data.get("databases", {}), dict, "databases")
    for db_name, table in (raw_dbs or {}).items():
        with errors:
            databases[db_name] = _parse_database(db_name, table)
    if raw_dbs == {}:
        errors.messages.append(
            "databases: at least one [databases.<name>] section is required")
    raw_dbs = raw_dbs or {}
    if "pgtenant" in raw_dbs:
        errors.messages.append("databases.pgtenant: the name is reserved for the admin console")

    tenant_types: dict[str, TenantTypeConfig] = {}
    raw_types: dict[str, Any] | None = None
    with errors:
        raw_types = _typed(data.get("tenant_types", {}), dict, "tenant_types")
    for type_name, table in (raw_types or {}).items():
        with errors:
            # Checked against every [databases.*] named, even one with errors of its own,
            # so a mistake there is not reported twice.
            tenant_types[type_name] = _parse_tenant_type(type_name, table, set(raw_dbs))
    if raw_types == {}:
        errors.messages.append(
            "tenant_types: at least one [tenant_types.<type>] section is required")

    control = ControlConfig()
    with errors:
        raw_control = _typed(data.get("control", {}), dict, "control")
        _reject_unknown(raw_control, {"dsn"}, "control")
        control = ControlConfig(
            dsn=parse_dsn(_typed(raw_control["dsn"], str, "control.dsn"), key="control.dsn")
            if "dsn" in raw_control else None
        )
        if control.dsn is None and len(raw_dbs) > 1:
            raise ConfigError("control.dsn: required when more than one database is "
                              "configured")
    tls = TlsConfig()
    with errors:
        tls = TlsConfig(**_parse_simple(_typed(data.get("tls", {}), dict, "tls"), TlsConfig,
                                        "tls"))
        if bool(tls.cert_file) != bool(tls.key_file):
            raise ConfigError("tls.cert_file and tls.key_file: give both or neither")
    jwt = JwtConfig()
    with errors:
        jwt = JwtConfig(**_parse_simple(_typed(data.get("jwt", {}), dict, "jwt"), JwtConfig,
                                        "jwt"))
        unknown_algs = set(jwt.algorithms) - {"HS256", "RS256", "ES256"}
        if unknown_algs:
            raise ConfigError(f"jwt.algorithms: unsupported {sorted(unknown_algs)}; "
                              "use HS256, RS256 or ES256")
    metrics = MetricsConfig()
    with errors:
        metrics = MetricsConfig(**_parse_simple(
            _typed(data.get("metrics", {}), dict, "metrics"), MetricsConfig, "metrics"))
        if metrics.listen is not None:
            parse_listen(metrics.listen, "metrics.listen")
        if metrics.top_tenants < 0:
            raise ConfigError("metrics.top_tenants: must not be negative")
    admin = AdminConfig()
    with errors:
        admin = AdminConfig(**_parse_simple(_typed(data.get("admin", {}), dict, "admin"),
                                            AdminConfig, "admin"))
        if admin.token_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}",
                                                                admin.token_sha256):
            raise ConfigError("admin.token_sha256: expected 64 lower-case hex digits (the "
                              "SHA-256 of the admin token; `pgtenant admin-token` prints one)")
    tenant_limits = TenantLimitsConfig()
    with errors:
        tenant_limits = TenantLimitsConfig(**_parse_simple(
            _typed(data.get("tenant_limits", {}), dict, "tenant_limits"), TenantLimitsConfig,
            "tenant_limits"))
        for key in ("max_server_connections", "max_client_connections", "max_pinned_servers"):
            if getattr(tenant_limits, key) < 0:
                errors.messages.append(f"tenant_limits.{key}: must not be negative")
    migrations = MigrationsConfig()
    with errors:
        migrations = MigrationsConfig(**_parse_simple(
            _typed(data.get("migrations", {}), dict, "migrations"), MigrationsConfig,
            "migrations"))
        for key in ("lock_timeout_ms", "statement_timeout_ms", "hold_ttl"):
            _positive(getattr(migrations, key), f"migrations.{key}")
        if migrations.hold_drain_timeout < 0:
            errors.messages.append("migrations.hold_drain_timeout: must not be negative")
    audit = AuditConfig()
    with errors:
        audit = AuditConfig(**_parse_simple(_typed(data.get("audit", {}), dict, "audit"),
                                            AuditConfig, "audit"))
        for name in audit.allow_temp:
            if name not in (raw_types or {}):
                errors.messages.append(f"audit.allow_temp: unknown tenant type {name!r}")
        if not audit.tenant_columns:
            errors.messages.append("audit.tenant_columns: name at least one column")
    errors.raise_if_any()
    return Config(**kwargs, control=control, databases=databases, tenant_types=tenant_types,
                  tls=tls, jwt=jwt, metrics=metrics, admin=admin, tenant_limits=tenant_limits,
                  migrations=migrations, audit=audit)


def _parse_database(db_name: str, table: Any) -> DatabaseConfig:
    """Returns: one ``[databases.<name>]``. Raises: ConfigError, one line per problem."""
    where = f"databases.{db_name}"
    table = _typed(table, dict, where)
    errors = _Errors()
    with errors:
        _reject_unknown(table, {"dsn", "pool_size", "min_pool_size", "reserve_pool",
                                "control_dsn"}, where)
    dsn = None
    with errors:
        if "dsn" not in table:
            raise ConfigError(f"{where}.dsn: required")
        dsn = parse_dsn(_typed(table["dsn"], str, f"{where}.dsn"), key=f"{where}.dsn")
    control_dsn = None
    if "control_dsn" in table:
        with errors:
            control_dsn = parse_dsn(_typed(table["control_dsn"], str, f"{where}.control_dsn"),
                                    key=f"{where}.control_dsn")
            if dsn is not None and control_dsn.user == dsn.user:
                raise ConfigError(f"{where}.control_dsn: its user must be the control role, "
                                  f"not the login role {dsn.user!r} of dsn")
    pool_size, min_pool, reserve = 20, 0, 0
    pool_ok = False
    with errors:
        pool_size = _typed(table.get("pool_size", 20), int, f"{where}.pool_size")
        _positive(pool_size, f"{where}.pool_size")
        pool_ok = True
    with errors:
        min_pool = _typed(table.get("min_pool_size", 0), int, f"{where}.min_pool_size")
        # Against a bad pool_size this would only repeat that error.
        if pool_ok and not 0 <= min_pool <= pool_size:
            raise ConfigError(f"{where}.min_pool_size: must be between 0 and pool_size")
    with errors:
        reserve = _typed(table.get("reserve_pool", 0), int, f"{where}.reserve_pool")
        if reserve < 0:
            raise ConfigError(f"{where}.reserve_pool: must not be negative")
    if errors.messages or dsn is None:
        raise ConfigError("\n".join(errors.messages))
    return DatabaseConfig(name=db_name, dsn=dsn, pool_size=pool_size, min_pool_size=min_pool,
                          reserve_pool=reserve, control_dsn=control_dsn)


def _parse_tenant_type(type_name: str, table: Any, database_names: set[str]
                       ) -> TenantTypeConfig:
    """Returns: one ``[tenant_types.<type>]``. Raises: ConfigError, one line per problem."""
    where = f"tenant_types.{type_name}"
    if not _IDENT.match(type_name):
        raise ConfigError(f"{where}: tenant type names must be identifiers")
    table = _typed(table, dict, where)
    errors = _Errors()
    with errors:
        _reject_unknown(table, {"role", "search_path", "allow_outside_transaction",
                                "max_server_connections", "max_client_connections",
                                "database", *_TYPE_SWITCHES}, where)
    role = ""
    with errors:
        if "role" not in table:
            raise ConfigError(f"{where}.role: required (the non-login role tenants run as)")
        role = _typed(table["role"], str, f"{where}.role")
        _check_template(role, f"{where}.role")
    path: list[Any] = []
    with errors:
        path = _typed(table.get("search_path", ["public"]), list, f"{where}.search_path")
        for i, item in enumerate(path):
            _check_template(_typed(item, str, f"{where}.search_path[{i}]"),
                            f"{where}.search_path")
        if not path:
            raise ConfigError(f"{where}.search_path: must name at least one schema")
    allowed: list[Any] = []
    with errors:
        allowed = _typed(table.get("allow_outside_transaction", []), list,
                         f"{where}.allow_outside_transaction")
        for item in allowed:
            if item not in OUTSIDE_TXN:
                raise ConfigError(f"{where}.allow_outside_transaction: unknown statement "
                                  f"{item!r}; allowed: {', '.join(OUTSIDE_TXN)}")
    limits = {}
    for key in ("max_server_connections", "max_client_connections"):
        if key in table:
            with errors:
                limits[key] = _typed(table[key], int, f"{where}.{key}")
                if limits[key] < 0:
                    raise ConfigError(f"{where}.{key}: must not be negative")
    database = table.get("database")
    if database is not None:
        with errors:
            _typed(database, str, f"{where}.database")
            if database not in database_names:
                raise ConfigError(f"{where}.database: no [databases.{database}] section")
    switches = {}
    for key in _TYPE_SWITCHES:
        if key in table:
            with errors:
                switches[key] = _typed(table[key], bool, f"{where}.{key}")
    if errors.messages:
        raise ConfigError("\n".join(errors.messages))
    return TenantTypeConfig(
        name=type_name, role=role, search_path=tuple(path),
        allow_outside_transaction=tuple(allowed), database=database, **limits, **switches,
    )


_SIMPLE_TYPES: dict[str, tuple[type, bool]] = {
    # annotation text -> (type, may be None)
    "bool": (bool, False), "int": (int, False), "float": (float, False), "str": (str, False),
    "str | None": (str, True), "tuple[str, ...]": (tuple, False),
}


def _parse_simple(table: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Parse the scalar and list-of-string keys of one section by their annotations.

    Returns: keyword arguments for ``cls``.
    Raises: ConfigError naming the key (unknown key, wrong type, value not in choices).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)
              if str(f.type) in _SIMPLE_TYPES}
    errors = _Errors()
    if where:  # top-level unknown keys were already checked against all of Config's fields
        with errors:
            _reject_unknown(table, set(fields), where)
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name not in fields:
            continue
        key = f"{where}.{name}" if where else name
        kind, _ = _SIMPLE_TYPES[str(fields[name].type)]
        with errors:
            if kind is tuple:
                items = _typed(value, list, key)
                for i, item in enumerate(items):
                    _typed(item, str, f"{key}[{i}]")
                out[name] = tuple(items)
                continue
            parsed = _typed(value, kind, key)
            choices = fields[name].metadata.get("choices", ())
            if choices and parsed not in choices:
                raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
            out[name] = parsed
    if errors.messages:  # one ConfigError carrying every line; the caller's _Errors splits it
        raise ConfigError("\n".join(errors.messages))
    return out


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file.

    Returns: the ``Config``.
    Raises: ConfigError (file missing, TOML syntax, or validation).
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(data)


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
