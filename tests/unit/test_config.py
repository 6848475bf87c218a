"""Config validation on plain dicts, the DSN parser, file loading and the example file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from pgtenant.config import (
    TEMPLATE_FIELDS,
    AdminConfig,
    Config,
    ControlConfig,
    DatabaseConfig,
    Dsn,
    JwtConfig,
    MetricsConfig,
    MigrationsConfig,
    TenantLimitsConfig,
    TenantTypeConfig,
    TlsConfig,
    is_loopback,
    parse_dsn,
)
from pgtenant.configfile import load_config, parse_config
from pgtenant.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pgtenant.example.toml"
APP_DSN = "postgresql://proxy:secret@127.0.0.1:5432/app"


def minimal(**top: Any) -> dict[str, Any]:
    """Returns: the smallest valid config document, with ``top`` merged over it."""
    data: dict[str, Any] = {
        "databases": {"app": {"dsn": APP_DSN}},
        "tenant_types": {"sme": {"role": "tenant_sme"}},
    }
    data.update(top)
    return data


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# ---------------------------------------------------------------------- defaults


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.listen == ("127.0.0.1", 6432)
    assert cfg.allow_plaintext_remote is False
    assert cfg.max_client_conn == 10000
    assert cfg.max_message_size == 64 * 1024 * 1024
    assert cfg.query_wait_timeout == 120.0
    assert cfg.client_login_timeout == 15.0
    assert cfg.idle_transaction_timeout == 60.0
    assert cfg.max_login_clients == 1000
    assert cfg.max_parsed_query_size == 64 * 1024
    assert cfg.server_connect_timeout == 15.0
    assert cfg.token_cache_ttl == 5.0
    assert cfg.log_level == "info"
    assert cfg.control == ControlConfig(dsn=None)
    assert cfg.databases["app"].pool_size == 20
    assert cfg.databases["app"].name == "app"
    assert cfg.tenant_types["sme"] == TenantTypeConfig(
        name="sme", role="tenant_sme", search_path=("public",)
    )


def test_control_dsn_defaults_to_the_single_database_dsn() -> None:
    cfg = parse_config(minimal())
    assert cfg.control_dsn == cfg.databases["app"].dsn == parse_dsn(APP_DSN)


def test_explicit_control_dsn_wins() -> None:
    cfg = parse_config(minimal(control={"dsn": "postgresql://ctl@10.0.0.9/control"}))
    assert cfg.control_dsn.host == "10.0.0.9"
    assert cfg.control_dsn.dbname == "control"


def test_signing_key_is_read_as_the_control_role_at_each_databases_address() -> None:
    dbs = {"app": {"dsn": APP_DSN},
           "other": {"dsn": "postgresql://proxy:secret@10.0.0.7:5433/other?application_name=x"},
           "own": {"dsn": "postgresql://proxy:secret@10.0.0.8/own",
                   "control_dsn": "postgresql://ctl_own:pw2@10.0.0.8/own"}}
    cfg = parse_config(minimal(databases=dbs,
                               control={"dsn": "postgresql://ctl:pw@10.0.0.9/app"}))
    other = cfg.key_dsn(cfg.databases["other"])
    assert other is not None
    assert (other.user, other.password, other.host, other.port, other.dbname) == (
        "ctl", "pw", "10.0.0.7", 5433, "other")
    assert cfg.key_dsn(cfg.databases["own"]) == parse_dsn("postgresql://ctl_own:pw2@10.0.0.8/own")


def test_without_control_dsn_no_key_dsn_is_made_up() -> None:
    # The caller falls back to the login role (and warns): an install from before init
    # made the control role.
    cfg = parse_config(minimal())
    assert cfg.key_dsn(cfg.databases["app"]) is None


def test_database_control_dsn_must_not_be_the_login_role() -> None:
    dbs = {"app": {"dsn": APP_DSN, "control_dsn": APP_DSN}}
    assert config_error(minimal(databases=dbs)).startswith(
        "databases.app.control_dsn: its user must be the control role")
    dbs = {"app": {"dsn": APP_DSN, "control_dsn": "mysql://x"}}
    assert config_error(minimal(databases=dbs)).startswith("databases.app.control_dsn:")


def test_integer_is_accepted_for_a_seconds_key_and_becomes_float() -> None:
    cfg = parse_config(minimal(query_wait_timeout=5))
    assert cfg.query_wait_timeout == 5.0
    assert isinstance(cfg.query_wait_timeout, float)


def test_config_is_frozen() -> None:
    cfg = parse_config(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log_level = "debug"  # type: ignore[misc]


# ---------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listen", 6432),
        ("allow_plaintext_remote", "yes"),
        ("allow_plaintext_remote", 1),
        ("max_client_conn", "10"),
        ("max_client_conn", True),
        ("max_client_conn", 1.5),
        ("max_message_size", "64MB"),
        ("query_wait_timeout", "120s"),
        ("query_wait_timeout", True),
        ("client_login_timeout", [60]),
        ("server_connect_timeout", "15"),
        ("token_cache_ttl", None),
        ("log_level", 1),
        ("control", "postgresql://x@h/db"),
        ("databases", ["app"]),
        ("tenant_types", "sme"),
    ],
)
def test_wrong_type_for_a_top_level_key_names_the_key(key: str, value: Any) -> None:
    message = config_error(minimal(**{key: value}))
    assert message.startswith(f"{key}:"), message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(databases={"app": "postgresql://x@h/db"}), "databases.app"),
        (minimal(databases={"app": {"dsn": 5}}), "databases.app.dsn"),
        (minimal(databases={"app": {"dsn": APP_DSN, "pool_size": "5"}}), "databases.app.pool_size"),
        (minimal(databases={"app": {"dsn": APP_DSN, "pool_size": 2.0}}), "databases.app.pool_size"),
        (minimal(tenant_types={"sme": "tenant_sme"}), "tenant_types.sme"),
        (minimal(tenant_types={"sme": {"role": 1}}), "tenant_types.sme.role"),
        (
            minimal(tenant_types={"sme": {"role": "r", "search_path": "public"}}),
            "tenant_types.sme.search_path",
        ),
        (
            minimal(tenant_types={"sme": {"role": "r", "search_path": ["public", 3]}}),
            "tenant_types.sme.search_path[1]",
        ),
        (minimal(control={"dsn": 5}), "control.dsn"),
    ],
)
def test_wrong_type_for_a_nested_key_names_its_full_path(data: dict[str, Any], key: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{key}:"), message


# ---------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("data", "where", "hint"),
    [
        (minimal(listn="0.0.0.0:1"), "listn", "listen"),
        (minimal(query_wait_timout=1), "query_wait_timout", "query_wait_timeout"),
        (
            minimal(databases={"app": {"dsn": APP_DSN, "pool_sise": 5}}),
            "databases.app.pool_sise",
            "pool_size",
        ),
        (minimal(tenant_types={"sme": {"role": "r", "serch_path": []}}), None, "search_path"),
        (minimal(control={"dns": APP_DSN}), "control.dns", "dsn"),
    ],
)
def test_unknown_key_is_refused_with_did_you_mean(
    data: dict[str, Any], where: str | None, hint: str
) -> None:
    message = config_error(data)
    assert message.startswith("unknown config key")
    if where is not None:
        assert repr(where) in message
    assert f"(did you mean {hint!r}?)" in message


def test_unknown_key_without_a_close_match_has_no_hint() -> None:
    message = config_error(minimal(zzzzzz=1))
    assert message == "unknown config key 'zzzzzz'"


# ---------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:5000", ("0.0.0.0", 5000)),
        ("127.0.0.1:6432", ("127.0.0.1", 6432)),
        ("[::1]:6432", ("::1", 6432)),
        ("localhost:1", ("localhost", 1)),
        (":6432", ("127.0.0.1", 6432)),
        ("example.org:65535", ("example.org", 65535)),
    ],
)
def test_listen_is_parsed_into_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_config(minimal(listen=text)).listen == expected


@pytest.mark.parametrize("text", ["localhost", "host:", "host:0", "host:65536", "host:abc", ""])
def test_bad_listen_is_refused_naming_the_key(text: str) -> None:
    assert config_error(minimal(listen=text)).startswith("listen: expected 'host:port'")


# ---------------------------------------------------------------------- value checks


def test_database_dsn_is_required() -> None:
    message = config_error(minimal(databases={"app": {"pool_size": 5}}))
    assert message == "databases.app.dsn: required"


def test_database_dsn_must_be_a_postgresql_url() -> None:
    message = config_error(minimal(databases={"app": {"dsn": "mysql://u@h/db"}}))
    assert message.startswith("databases.app.dsn: expected a postgresql:// URL")


@pytest.mark.parametrize("size", [0, -1])
def test_pool_size_must_be_positive(size: int) -> None:
    message = config_error(minimal(databases={"app": {"dsn": APP_DSN, "pool_size": size}}))
    assert message.startswith("databases.app.pool_size: must be greater than 0")


def test_pool_size_is_kept() -> None:
    cfg = parse_config(minimal(databases={"app": {"dsn": APP_DSN, "pool_size": 3}}))
    assert cfg.databases["app"] == DatabaseConfig(name="app", dsn=parse_dsn(APP_DSN), pool_size=3)


@pytest.mark.parametrize(
    "key",
    [
        "max_client_conn",
        "query_wait_timeout",
        "client_login_timeout",
        "server_connect_timeout",
        "token_cache_ttl",
    ],
)
@pytest.mark.parametrize("value", [0, -5])
def test_limits_and_timeouts_must_be_positive(key: str, value: int) -> None:
    assert config_error(minimal(**{key: value})).startswith(f"{key}: must be greater than 0")


def test_max_message_size_has_a_floor() -> None:
    assert config_error(minimal(max_message_size=100)).startswith("max_message_size:")
    assert parse_config(minimal(max_message_size=8192)).max_message_size == 8192


def test_unknown_log_level_is_refused() -> None:
    assert config_error(minimal(log_level="verbose")).startswith("log_level:")


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_known_log_levels_are_accepted(level: str) -> None:
    assert parse_config(minimal(log_level=level)).log_level == level


def test_at_least_one_database_is_required() -> None:
    assert config_error(minimal(databases={})).startswith("databases:")


def test_at_least_one_tenant_type_is_required() -> None:
    assert config_error(minimal(tenant_types={})).startswith("tenant_types:")


def test_tenant_type_role_is_required() -> None:
    message = config_error(minimal(tenant_types={"sme": {"search_path": ["public"]}}))
    assert message.startswith("tenant_types.sme.role: required")


def test_tenant_type_name_must_be_an_identifier() -> None:
    message = config_error(minimal(tenant_types={"bad-name": {"role": "r"}}))
    assert message.startswith("tenant_types.bad-name:")


def test_empty_search_path_is_refused() -> None:
    message = config_error(minimal(tenant_types={"sme": {"role": "r", "search_path": []}}))
    assert message.startswith("tenant_types.sme.search_path: must name at least one schema")


def test_control_dsn_is_required_with_two_databases() -> None:
    dbs = {"app": {"dsn": APP_DSN}, "other": {"dsn": "postgresql://u@h/other"}}
    assert config_error(minimal(databases=dbs)).startswith("control.dsn: required")
    cfg = parse_config(minimal(databases=dbs, control={"dsn": APP_DSN}))
    assert set(cfg.databases) == {"app", "other"}


def test_database_name_pgtenant_is_reserved() -> None:
    message = config_error(minimal(databases={"pgtenant": {"dsn": APP_DSN}}))
    assert message.startswith("databases.pgtenant:")
    assert "reserved" in message


# ---------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "role", ["{slug}", "t_{org_id}", "{schema}", "tenant_{slug}_{schema}", "plain"]
)
def test_allowed_placeholders_are_accepted(role: str) -> None:
    cfg = parse_config(minimal(tenant_types={"sme": {"role": role, "search_path": [role]}}))
    assert cfg.tenant_types["sme"].role == role
    assert cfg.tenant_types["sme"].search_path == (role,)


def test_template_fields_are_exactly_slug_org_id_and_schema() -> None:
    assert frozenset({"slug", "org_id", "schema"}) == TEMPLATE_FIELDS


@pytest.mark.parametrize(
    ("template", "placeholder"),
    [
        ("{tenant}", "{tenant}"),
        ("t_{slug}_{user}", "{user}"),
        ("{slug.__class__}", "{slug.__class__}"),
        ("{org_id[0]}", "{org_id[0]}"),
        ("{0}", "{0}"),
        ("{}", "{}"),
    ],
)
def test_unknown_role_placeholder_is_refused_naming_the_key(
    template: str, placeholder: str
) -> None:
    message = config_error(minimal(tenant_types={"sme": {"role": template}}))
    assert message.startswith(f"tenant_types.sme.role: unknown placeholder {placeholder}")
    assert "allowed: {org_id}, {schema}, {slug}" in message


def test_unknown_search_path_placeholder_is_refused_naming_the_key() -> None:
    data = minimal(tenant_types={"sme": {"role": "r", "search_path": ["public", "{db}"]}})
    message = config_error(data)
    assert message.startswith("tenant_types.sme.search_path: unknown placeholder {db}")


@pytest.mark.parametrize(
    "template",
    [
        "{slug",
        "slug}",
        "{slug!}",
        "{slug!z}",
        "{slug:d}",
        "{slug:{x}}",
    ],
)
def test_malformed_template_is_refused_naming_the_key(template: str) -> None:
    message = config_error(minimal(tenant_types={"sme": {"role": template}}))
    assert message.startswith("tenant_types.sme.role:")


# ---------------------------------------------------------------------- parse_dsn


def test_parse_dsn_with_password_host_port_and_dbname() -> None:
    assert parse_dsn("postgresql://alice:s3cret@db.example.com:5433/app") == Dsn(
        host="db.example.com", port=5433, user="alice", password="s3cret", dbname="app"
    )


def test_parse_dsn_decodes_percent_encoding() -> None:
    dsn = parse_dsn("postgresql://al%40ice:p%40ss%3Aw%2Fd@host/my%20db")
    assert (dsn.user, dsn.password, dsn.dbname) == ("al@ice", "p@ss:w/d", "my db")


def test_parse_dsn_defaults() -> None:
    dsn = parse_dsn("postgres://bob@h")
    assert dsn == Dsn(host="h", port=5432, user="bob", password=None, dbname="bob")
    assert parse_dsn("postgresql://") == Dsn()
    assert Dsn().unix_socket is None


def test_parse_dsn_host_query_parameter_is_a_unix_socket_directory() -> None:
    dsn = parse_dsn("postgresql://u@/app?host=/var/run/postgresql")
    assert (dsn.host, dsn.port, dsn.dbname) == ("/var/run/postgresql", 5432, "app")
    assert dsn.unix_socket == "/var/run/postgresql/.s.PGSQL.5432"
    assert dsn.params == ()


def test_parse_dsn_socket_directory_uses_port_query_parameter() -> None:
    dsn = parse_dsn("postgresql://u@/app?host=%2Ftmp%2Fpg%2F&port=5433")
    assert dsn.unix_socket == "/tmp/pg/.s.PGSQL.5433"


def test_parse_dsn_password_and_user_from_query() -> None:
    dsn = parse_dsn("postgresql://h/db?user=carol&password=p%26w")
    assert (dsn.user, dsn.password) == ("carol", "p&w")
    assert dsn.params == ()


def test_parse_dsn_keeps_extra_startup_parameters_and_drops_libpq_only_ones() -> None:
    dsn = parse_dsn(
        "postgresql://u@h/db?sslmode=require&application_name=pgt&connect_timeout=3"
        "&options=-c%20x%3D1&target_session_attrs=any&sslrootcert=/x"
    )
    assert dsn.params == (("application_name", "pgt"), ("options", "-c x=1"))


def test_parse_dsn_ipv6_host() -> None:
    dsn = parse_dsn("postgresql://u@[::1]:5433/db")
    assert (dsn.host, dsn.port) == ("::1", 5433)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "http://h", "u@h/db", ""])
def test_parse_dsn_refuses_other_schemes_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^control\.dsn: expected a postgresql:// URL"):
        parse_dsn(url, key="control.dsn")


@pytest.mark.parametrize("url", ["postgresql://h:abc/db", "postgresql://h/db?port=x"])
def test_parse_dsn_bad_port_names_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^dsn: bad port"):
        parse_dsn(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:p%40ss@db:5433/app",
        "postgresql://u@/app?host=/var/run/postgresql&port=5433",
        "postgresql://u:w%2F@[::1]:5432/my%20db",
    ],
)
def test_dsn_to_url_round_trips(url: str) -> None:
    dsn = parse_dsn(url)
    assert parse_dsn(dsn.to_url()) == dsn


def test_parse_dsn_never_leaves_user_or_dbname_among_startup_params() -> None:
    dsn = parse_dsn("postgresql://alice@h/app?user=mallory&dbname=other")
    assert not {"user", "dbname", "database"} & {k for k, _ in dsn.params}


# ---------------------------------------------------------------------- is_loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


# ---------------------------------------------------------------------- load_config


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_bad_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("listen = \n[databases.app\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_load_config_validates_what_it_reads(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(f'[databases.app]\ndsn = "{APP_DSN}"\npool_sise = 5\n')
    with pytest.raises(ConfigError, match="did you mean 'pool_size'"):
        load_config(path)


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert set(cfg.databases) == {"app"}
    assert set(cfg.tenant_types) == {"sme", "agency", "enterprise"}
    assert cfg.tenant_types["enterprise"].search_path == ("{schema}", "public")


def test_example_config_shows_the_defaults() -> None:
    example = load_config(EXAMPLE)
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in ("control", "databases", "tenant_types"):
            continue
        assert getattr(example, f.name) == getattr(defaults, f.name), f.name
    pool_size = next(f for f in dataclasses.fields(DatabaseConfig) if f.name == "pool_size")
    assert example.databases["app"].pool_size == pool_size.default


def _documented_keys(text: str) -> set[str]:
    """Keys assigned (possibly commented out) or opened as tables in a TOML file."""
    keys = set(re.findall(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", text, re.MULTILINE))
    for header in re.findall(r"^\s*\[([^\]]+)\]", text, re.MULTILINE):
        keys.update(header.split("."))
    return keys


@pytest.mark.parametrize(
    "cls", [Config, ControlConfig, DatabaseConfig, TenantTypeConfig, TlsConfig, JwtConfig,
            MetricsConfig, AdminConfig, TenantLimitsConfig, MigrationsConfig],
    ids=lambda c: c.__name__,
)
def test_every_config_key_is_documented_in_the_example(cls: type) -> None:
    documented = _documented_keys(EXAMPLE.read_text())
    # ``name`` is the table's own key ([databases.<name>]), not a key inside it.
    missing = {f.name for f in dataclasses.fields(cls) if f.name != "name"} - documented
    assert not missing, f"add {sorted(missing)} to {EXAMPLE.name}"


# ---------------------------------------------------------------------- security sections


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"lockdown_check": "maybe"}, "lockdown_check: expected one of refuse, warn, off"),
        ({"context_signing": True}, "context_signing: expected str"),
        ({"protected_settings": "app."}, "protected_settings: expected list"),
        ({"protected_settings": ["app.", 3]}, "protected_settings[1]: expected str"),
        ({"auth_failure_delay": -1}, "auth_failure_delay: must not be negative"),
        ({"tls": {"cert_file": "a.crt"}}, "tls.cert_file and tls.key_file: give both"),
        ({"tls": {"server_tls": "always"}}, "tls.server_tls: expected one of disable"),
        ({"tls": {"certfile": "x"}},
         "unknown config key 'tls.certfile' (did you mean 'cert_file'?)"),
        ({"jwt": {"algorithms": ["none"]}}, "jwt.algorithms: unsupported ['none']"),
        ({"jwt": {"leeway": "1"}}, "jwt.leeway: expected float"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen: expected 'host:port'"),
        ({"metrics": {"top_tenants": -1}}, "metrics.top_tenants: must not be negative"),
        ({"metrics": {"port": 9}}, "unknown config key 'metrics.port'"),
    ],
)
def test_security_keys_are_validated_naming_the_key(data: dict[str, Any], key: str) -> None:
    assert config_error(minimal(**data)).startswith(key)


def test_security_sections_parse_with_defaults_and_values() -> None:
    cfg = parse_config(minimal(
        protected_settings=["app.", "myapp.tenant"],
        tls={"cert_file": "c.pem", "key_file": "k.pem", "server_tls": "require"},
        jwt={"secret": "s3", "algorithms": ["HS256"], "leeway": 2},
    ))
    assert cfg.protected_settings == ("app.", "myapp.tenant")
    assert (cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.server_tls) == ("c.pem", "k.pem",
                                                                          "require")
    assert cfg.jwt.enabled and cfg.jwt.algorithms == ("HS256",) and cfg.jwt.leeway == 2.0
    assert (cfg.lockdown_check, cfg.context_signing) == ("refuse", "auto")
    assert not parse_config(minimal()).jwt.enabled


# ---------------------------------------------------------------------- shared-role switches


def test_shared_role_switches_default_by_role_and_can_be_set_either_way() -> None:
    cfg = parse_config(minimal(tenant_types={
        "sme": {"role": "tenant_sme"},
        "ent": {"role": "{schema}"},
        "open": {"role": "tenant_open", "allow_lock_table": True, "allow_large_objects": True,
                 "allow_explain_analyze": True},
        "strict": {"role": "t_{slug}", "allow_explain_analyze": False},
    }))
    types = cfg.tenant_types
    what = ("lock_table", "large_objects", "explain_analyze")
    assert types["sme"].shared_role and not any(types["sme"].allows(w) for w in what)
    assert not types["ent"].shared_role and all(types["ent"].allows(w) for w in what)
    assert all(types["open"].allows(w) for w in what)
    assert types["strict"].allows("lock_table") and not types["strict"].allows(
        "explain_analyze")


def test_shared_role_switches_must_be_booleans() -> None:
    message = config_error(minimal(tenant_types={"sme": {"role": "r", "allow_lock_table": 1}}))
    assert message.startswith("tenant_types.sme.allow_lock_table: expected bool")


def test_login_cap_and_parse_limit_must_be_positive() -> None:
    assert config_error(minimal(max_login_clients=0)).startswith("max_login_clients")
    assert config_error(minimal(max_parsed_query_size=0)).startswith("max_parsed_query_size")


# ---------------------------------------------------------------------- every error at once


def test_every_mistake_of_a_file_is_reported_in_one_run() -> None:
    data = minimal(max_client_conns=5, log_level="loud", listen="nowhere")
    data["databases"]["app"]["pool_size"] = 0
    data["databases"]["app"]["pool_sise"] = 3
    data["tenant_types"]["sme"] = {"search_path": ["public"], "rol": "x"}
    data["metrics"] = {"top_tenants": -1}
    message = config_error(data)
    assert message.startswith("8 problems:"), message
    for part in ("'max_client_conns' (did you mean 'max_client_conn'?)", "log_level:",
                 "listen:", "databases.app.pool_size:", "'databases.app.pool_sise'",
                 "tenant_types.sme.role: required", "'tenant_types.sme.rol'",
                 "metrics.top_tenants:"):
        assert part in message, (part, message)


def test_a_single_mistake_is_reported_alone() -> None:
    assert config_error(minimal(log_level="loud")).startswith("log_level: expected one of")


@pytest.mark.parametrize("url", [
    "postgresql://proxy:hunter2@db:notaport/app",
    "mysql://proxy:hunter2@db/app",
    "postgresql://db:notaport/app?user=proxy&password=hunter2",
])
def test_a_dsn_error_never_shows_its_password(url: str) -> None:
    message = config_error(minimal(databases={"app": {"dsn": url}}))
    assert "databases.app.dsn" in message
    assert "hunter2" not in message
    assert "***" in message
