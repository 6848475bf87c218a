"""Reading a TOML config file into ``config.Config``: strict validation, every mistake at once.

Owns parsing and validation: unknown keys are refused with a did-you-mean hint, every error
names its key, and one run reports every mistake of the file (``_Errors``). The dataclasses
and the DSN parser are ``config.py``'s; this module does no I/O beyond reading the file it is
given.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import (
    OUTSIDE_TXN,
    TEMPLATE_FIELDS,
    AdminConfig,
    AuditConfig,
    Config,
    ControlConfig,
    DatabaseConfig,
    JwtConfig,
    MetricsConfig,
    MigrationsConfig,
    TenantLimitsConfig,
    TenantTypeConfig,
    TlsConfig,
    parse_dsn,
)
from .errors import ConfigError

__all__ = ["load_config", "parse_config", "parse_listen"]


# --------------------------------------------------------------------------- validation

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_SWITCHES = ("allow_lock_table", "allow_large_objects", "allow_explain_analyze",
                  "temp_tables")


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
