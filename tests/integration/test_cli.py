"""The ``pgtenant`` command line as an operator runs it: real subprocesses, real Postgres.

Everything happens in database ``cli_db`` of the session cluster, with its own proxy login
role (``pgtenant_cli``) and tenant roles, so the demo database ``app`` and its proxy role
(``pgtenant_proxy``, whose password the demo fixture owns) are left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import asyncpg
import psycopg
import pytest

from pgtenant.control.cluster import PostgresCluster

from .conftest import ROOT, free_port

DB = "cli_db"
PROXY_ROLE = "pgtenant_cli"
CONTROL_ROLE = "pgtenant_cli_control"
SME_ROLE = "tenant_cli_sme"
AGENCY_ROLE = "tenant_cli_agency"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgtenant", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_operator_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    """A refused command: non-zero exit, a message naming ``words``, no traceback."""
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@dataclasses.dataclass
class CliEnv:
    admin_dsn: str
    proxy_dsn: str
    config: Path
    port: int
    workdir: Path
    control_dsn: str = ""


def _config_toml(proxy_dsn: str, port: int, control_dsn: str = "") -> str:
    control = f'[control]\ndsn = "{control_dsn}"\n' if control_dsn else ""
    return f"""\
listen = "127.0.0.1:{port}"
token_cache_ttl = 0.2

{control}
[databases.{DB}]
dsn = "{proxy_dsn}"
pool_size = 2

[tenant_types.sme]
role = "{SME_ROLE}"
search_path = ["public"]

[tenant_types.agency]
role = "{AGENCY_ROLE}"
search_path = ["public"]
"""


@pytest.fixture(scope="module")
def cli_env(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> CliEnv:
    """A fresh ``cli_db`` and a config for it; nothing installed yet."""
    pg_cluster.create_database(DB)
    workdir = tmp_path_factory.mktemp("cli")
    password = secrets.token_urlsafe(18)
    proxy_dsn = f"postgresql://{PROXY_ROLE}:{password}@{pg_cluster.host}:{pg_cluster.port}/{DB}"
    control_dsn = (f"postgresql://{CONTROL_ROLE}:{secrets.token_urlsafe(18)}@"
                   f"{pg_cluster.host}:{pg_cluster.port}/{DB}")
    port = free_port()
    config = workdir / "pgtenant-cli.toml"
    config.write_text(_config_toml(proxy_dsn, port, control_dsn))
    return CliEnv(admin_dsn=pg_cluster.admin_dsn(DB), proxy_dsn=proxy_dsn,
                  control_dsn=control_dsn, config=config,
                  port=port, workdir=workdir)


@pytest.fixture(scope="module")
def initialised(cli_env: CliEnv) -> CliEnv:
    out = run_cli("init", "--dsn", cli_env.admin_dsn, "--config", str(cli_env.config))
    assert out.returncode == 0, out.stderr
    return cli_env


@pytest.fixture(scope="module")
def sme_tenant(initialised: CliEnv) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``tenant create --slug cli_sme``: (printed org id, the completed process)."""
    out = run_cli("tenant", "create", "--dsn", initialised.admin_dsn, "--slug", "cli_sme",
                  "--type", "sme", "--config", str(initialised.config))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out


def issue(env: CliEnv, slug: str = "cli_sme") -> tuple[str, str]:
    """Returns: (token id, token) printed by ``token issue``."""
    out = run_cli("token", "issue", "--dsn", env.admin_dsn, "--tenant", slug)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    match = _UUID.search(lines[0])
    assert match, out.stdout
    return match.group(0), lines[-1]


# ------------------------------------------------------------------------------ init

async def test_init_twice_succeeds_and_keeps_the_proxy_role_usable(initialised: CliEnv) -> None:
    again = run_cli("init", "--dsn", initialised.admin_dsn, "--config", str(initialised.config))
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert f"proxy role {PROXY_ROLE!r}" in again.stdout
    assert "tenant roles: none new" in again.stdout
    # The password in the config (given, not generated) is neither printed nor changed.
    assert initialised.proxy_dsn.split(":")[2].split("@")[0] not in again.stdout
    conn = await asyncpg.connect(initialised.proxy_dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == PROXY_ROLE
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
        granted = await conn.fetch(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "JOIN pg_roles p ON p.oid = m.member WHERE p.rolname = $1 ORDER BY 1", PROXY_ROLE,
        )
        assert [r["rolname"] for r in granted] == sorted([AGENCY_ROLE, SME_ROLE])
    finally:
        await conn.close()


async def test_init_gives_the_key_and_registry_to_the_configured_control_role(
    initialised: CliEnv,
) -> None:
    # [control] dsn of the config names the control role and its password, as
    # [databases.*] dsn names the login role.
    control = await asyncpg.connect(initialised.control_dsn)
    login = await asyncpg.connect(initialised.proxy_dsn)
    try:
        assert await control.fetchval("SELECT current_user") == CONTROL_ROLE
        assert len(await control.fetchval("SELECT pgtenant.signing_key()")) == 32
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await login.fetchval("SELECT pgtenant.signing_key()")
    finally:
        await control.close()
        await login.close()


def test_init_without_config_prints_both_new_passwords(pg_cluster: PostgresCluster) -> None:
    pg_cluster.create_database("cli_roles_db")
    try:
        out = run_cli("init", "--dsn", pg_cluster.admin_dsn("cli_roles_db"),
                      "--proxy-role", "cli_roles_proxy", "--control-role", "cli_roles_control")
        assert out.returncode == 0, out.stderr
        assert "proxy role 'cli_roles_proxy', control role 'cli_roles_control'" in out.stdout
        assert "tenant roles: none new" in out.stdout
        lines = out.stdout.splitlines()
        proxy_at = next(i for i, line in enumerate(lines) if "proxy role password" in line)
        control_at = next(i for i, line in enumerate(lines) if "control role password" in line)
        assert "[control] dsn" in lines[control_at]
        assert lines[proxy_at + 1] != lines[control_at + 1]
        assert len(lines[proxy_at + 1]) >= 24 and len(lines[control_at + 1]) >= 24
    finally:
        pg_cluster.psql("DROP DATABASE cli_roles_db")
        pg_cluster.psql("DROP ROLE IF EXISTS cli_roles_proxy")
        pg_cluster.psql("DROP ROLE IF EXISTS cli_roles_control")


def test_init_refuses_one_role_for_both_login_and_control(initialised: CliEnv) -> None:
    out = run_cli("init", "--dsn", initialised.admin_dsn, "--config", str(initialised.config),
                  "--control-role", PROXY_ROLE)
    assert_operator_error(out, "control role must not be the proxy's login role")


# ------------------------------------------------------------------------------ write-config

def test_init_write_config_writes_a_private_valid_config_with_real_passwords(
    pg_cluster: PostgresCluster, tmp_path: Path,
) -> None:
    db = "cli_starter_db"
    pg_cluster.create_database(db)
    target = tmp_path / "etc" / "pgtenant.toml"
    admin = pg_cluster.admin_dsn(db)
    try:
        out = run_cli("init", "--dsn", admin, "--write-config", str(target),
                      "--proxy-role", "cli_starter_proxy",
                      "--control-role", "cli_starter_control")
        assert out.returncode == 0, out.stderr
        assert target.stat().st_mode & 0o077 == 0
        text = target.read_text()
        assert "CHANGE_ME" not in text and "cli_starter_proxy:" in text
        check = run_cli("check-config", "--config", str(target))
        assert check.returncode == 0, check.stderr
        out = run_cli("tenant", "create", "--dsn", admin, "--config", str(target),
                      "--slug", "starter_a", "--type", "isolated")
        assert out.returncode == 0, out.stderr
        listed = run_cli("tenant", "list", "--dsn", admin)
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"starter_a\s+isolated\s+t_starter_a\s+-\s+\d{4}-", listed.stdout), \
            listed.stdout
        again = run_cli("init", "--dsn", admin, "--write-config", str(target))
        assert_operator_error(again, "exists")
    finally:
        pg_cluster.psql(f"DROP DATABASE {db}")
        for role in ("t_starter_a", "tenant_shared", "cli_starter_proxy",
                     "cli_starter_control"):
            pg_cluster.psql(f"DROP ROLE IF EXISTS {role}")


# ------------------------------------------------------------------------------ tenants

def test_token_list_shows_ids_labels_and_state_never_the_token(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    token_id, token = issue(initialised)
    labelled = run_cli("token", "issue", "--dsn", initialised.admin_dsn, "--tenant", "cli_sme",
                       "--label", "ci-runner", "--expires-in", "3600")
    assert labelled.returncode == 0, labelled.stderr
    assert run_cli("token", "revoke", "--dsn", initialised.admin_dsn,
                   "--token-id", token_id).returncode == 0
    out = run_cli("token", "list", "--dsn", initialised.admin_dsn, "--tenant", "cli_sme")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:6] == ["id", "label", "entity", "created", "expires", "revoked"]
    row = next(line for line in out.stdout.splitlines() if line.startswith(token_id))
    assert row.split()[-2:] != ["-", "-"] and not row.endswith(" -")  # revoked: a time
    ci = next(line for line in out.stdout.splitlines() if "ci-runner" in line)
    assert ci.endswith(" -")  # not revoked
    assert token not in out.stdout and "pgt_" not in out.stdout
    missing = run_cli("token", "list", "--dsn", initialised.admin_dsn, "--tenant", "nobody")
    assert_operator_error(missing, "nobody")


async def test_tenant_create_prints_the_new_org_id(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    printed, out = sme_tenant
    org_id = UUID(printed)
    assert out.stdout.strip().splitlines() == [str(org_id)]
    conn = await asyncpg.connect(initialised.admin_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT id, tenant_type FROM pgtenant.organizations WHERE slug = 'cli_sme'"
        )
    finally:
        await conn.close()
    assert row["id"] == org_id and row["tenant_type"] == "sme"


def test_tenant_create_with_unknown_type_names_the_type(initialised: CliEnv) -> None:
    out = run_cli("tenant", "create", "--dsn", initialised.admin_dsn, "--slug", "cli_other",
                  "--type", "platinum", "--config", str(initialised.config))
    assert out.returncode == 2
    assert_operator_error(out, "platinum", "sme")


def test_tenant_create_with_a_duplicate_slug_fails_cleanly(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    out = run_cli("tenant", "create", "--dsn", initialised.admin_dsn, "--slug", "cli_sme",
                  "--type", "sme", "--config", str(initialised.config))
    assert_operator_error(out, "cli_sme", "already exists")


async def test_tenant_create_with_a_duplicate_slug_changes_nothing(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    out = run_cli("tenant", "create", "--dsn", initialised.admin_dsn, "--slug", "cli_sme",
                  "--type", "agency", "--config", str(initialised.config))
    assert out.returncode != 0
    assert "already exists" in out.stderr
    assert out.stdout == ""
    conn = await asyncpg.connect(initialised.admin_dsn)
    try:
        rows = await conn.fetch("SELECT id, tenant_type FROM pgtenant.organizations "
                                "WHERE slug = 'cli_sme'")
    finally:
        await conn.close()
    assert [(str(r["id"]), r["tenant_type"]) for r in rows] == [(sme_tenant[0], "sme")]


# ------------------------------------------------------------------------------ tokens

def test_token_issue_prints_the_token_last(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    out = run_cli("token", "issue", "--dsn", initialised.admin_dsn, "--tenant", "cli_sme")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("pgt_"), out.stdout
    assert _UUID.search(lines[0]), out.stdout
    assert lines[-1] not in lines[0]


def test_token_revoke_once_then_reports_nothing_to_revoke(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    token_id, _ = issue(initialised)
    first = run_cli("token", "revoke", "--dsn", initialised.admin_dsn, "--token-id", token_id)
    assert first.returncode == 0, first.stderr
    assert token_id in first.stdout
    second = run_cli("token", "revoke", "--dsn", initialised.admin_dsn, "--token-id", token_id)
    assert second.returncode == 1
    assert token_id in second.stderr and "Traceback" not in second.stderr


def test_token_issue_for_an_unknown_tenant_fails_cleanly(initialised: CliEnv) -> None:
    out = run_cli("token", "issue", "--dsn", initialised.admin_dsn, "--tenant", "no_such_tenant")
    assert_operator_error(out, "no_such_tenant")


def test_init_against_an_unreachable_database_fails_cleanly() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}"
    out = run_cli("init", "--dsn", dsn, "--proxy-role", PROXY_ROLE, timeout=30)
    assert_operator_error(out, "127.0.0.1")


def test_token_revoke_with_a_malformed_id_fails_cleanly(initialised: CliEnv) -> None:
    out = run_cli("token", "revoke", "--dsn", initialised.admin_dsn, "--token-id", "not-a-uuid")
    assert_operator_error(out, "not-a-uuid")


# ------------------------------------------------------------------------------ check-config

def test_check_config_accepts_the_example_config_once_its_passwords_are_real(
    tmp_path: Path,
) -> None:
    # As shipped, the example's CHANGE_ME placeholder is refused, naming the key: it must
    # never become a role's password (init --config) nor reach Postgres (serve).
    out = run_cli("check-config", "--config", "config/pgtenant.example.toml")
    assert out.returncode == 2
    assert_operator_error(out, "databases.app.dsn", "placeholder", "--write-config")
    text = (ROOT / "config" / "pgtenant.example.toml").read_text()
    real = tmp_path / "real.toml"
    real.write_text(text.replace("CHANGE_ME", secrets.token_urlsafe(12)))
    out = run_cli("check-config", "--config", str(real))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_init_refuses_a_config_with_a_placeholder_password(cli_env: CliEnv,
                                                           tmp_path: Path) -> None:
    placeholder = tmp_path / "placeholder.toml"
    placeholder.write_text(_config_toml(
        f"postgresql://{PROXY_ROLE}:CHANGE_ME@127.0.0.1:5432/{DB}", cli_env.port))
    out = run_cli("init", "--dsn", cli_env.admin_dsn, "--config", str(placeholder))
    assert out.returncode == 2
    assert_operator_error(out, "placeholder", "CHANGE_ME")


def test_check_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    text = (ROOT / "config" / "pgtenant.example.toml").read_text().replace("CHANGE_ME", "x1")
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("log_level = ", "max_client_conns = 5\nlog_level = ", 1)
                       .replace("pool_size = 20", "pool_size = 0", 1)
                       .replace('search_path = ["tenant_b", "public"]', "search_path = []"))
    out = run_cli("check-config", "--config", str(bad))
    assert out.returncode == 2
    assert_operator_error(out, "3 problems", "max_client_conns", "databases.app.pool_size",
                          "tenant_types.agency.search_path")


def test_a_dsn_password_is_never_printed_in_an_error(tmp_path: Path) -> None:
    text = (ROOT / "config" / "pgtenant.example.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("pgtenant_proxy:CHANGE_ME@127.0.0.1:5432",
                                "pgtenant_proxy:hunter2secret@127.0.0.1:port"))
    out = run_cli("check-config", "--config", str(bad))
    assert_operator_error(out, "databases.app.dsn", "***")
    assert "hunter2secret" not in out.stderr + out.stdout


def test_check_config_refuses_an_unknown_key_by_name(tmp_path: Path) -> None:
    text = (ROOT / "config" / "pgtenant.example.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("log_level = ", "max_client_conns = 5\nlog_level = ", 1))
    out = run_cli("check-config", "--config", str(bad))
    assert out.returncode == 2
    assert_operator_error(out, "max_client_conns")


def test_check_config_of_a_missing_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    out = run_cli("check-config", "--config", str(missing))
    assert out.returncode == 2
    assert_operator_error(out, "nope.toml", "not found")


def test_serve_without_a_config_says_how_to_get_one(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pgtenant", "serve"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "PGTENANT_CONFIG"},
             "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2
    assert_operator_error(out, "config/pgtenant.toml", "not found", "--config",
                          "PGTENANT_CONFIG", "--write-config", "pgtenant example-config")


# ------------------------------------------------------------------------------ help

def test_help_describes_the_command_and_every_option() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    assert "tenant-aware, transaction-mode PostgreSQL connection proxy" in out.stdout
    assert "Returns:" not in out.stdout and "Owns argument parsing" not in out.stdout
    from pgtenant.cli import build_parser

    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    for parser in parsers(build_parser()):
        bare = [a.option_strings for a in parser._actions
                if a.option_strings and not a.help]
        assert not bare, (parser.prog, bare)
    serve = run_cli("serve", "--help").stdout
    assert "PGTENANT_CONFIG" in serve and "config/pgtenant.toml" in serve


def test_version_is_printed() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert re.fullmatch(r"pgtenant \d+\.\d+\.\d+.*\n", out.stdout), out.stdout


def test_a_refused_connection_is_a_sentence_with_a_hint() -> None:
    port = free_port()
    out = run_cli("tenant", "list", "--dsn", f"postgresql://postgres:pw@127.0.0.1:{port}/x")
    assert_operator_error(out, f"127.0.0.1:{port}", "connection refused",
                          "is PostgreSQL running", "--dsn")
    assert "Errno" not in out.stderr


# ------------------------------------------------------------------------------ serve

class Served:
    """``python -m pgtenant serve`` started by the test, stopped with SIGTERM."""

    def __init__(self, config: Path, log: Path):
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgtenant", "serve", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log()}"
            if "listening on" in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"serve did not start within {timeout}s:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def served(initialised: CliEnv) -> Iterator[Served]:
    proc = Served(initialised.config, initialised.workdir / "serve.log")
    try:
        yield proc
    finally:
        proc.close()


def test_serve_logs_in_an_issued_token_and_stops_on_sigterm(
    initialised: CliEnv, sme_tenant: tuple[str, subprocess.CompletedProcess[str]],
    served: Served,
) -> None:
    org_id, _ = sme_tenant
    _, token = issue(initialised)
    served.wait_listening()
    with psycopg.connect(host="127.0.0.1", port=initialised.port, dbname=DB, user="cli_sme",
                         password=token, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT current_setting('app.tenant_id'), current_setting('app.tenant_type'), "
            "current_user"
        ).fetchone()
        assert row == (org_id, "sme", SME_ROLE)

    # A token revoked with the CLI stops working once the proxy's cache entry (0.2 s) expires.
    token_id, doomed = issue(initialised)
    conninfo = {"host": "127.0.0.1", "port": initialised.port, "dbname": DB, "user": "cli_sme",
                "connect_timeout": 10}
    psycopg.connect(**conninfo, password=doomed).close()
    revoked = run_cli("token", "revoke", "--dsn", initialised.admin_dsn, "--token-id", token_id)
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(0.5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**conninfo, password=doomed)
    with psycopg.connect(**conninfo, password=token) as conn:  # the other token still works
        assert conn.execute("SELECT current_setting('app.tenant_id')").fetchone() == (org_id,)

    served.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = served.proc.wait(10)
    assert time.monotonic() - started < 10
    assert code == 0, served.log()
    log = served.log()
    assert "SIGTERM received" in log
    assert "Traceback" not in log and "internal error" not in log, log


def test_serve_on_a_busy_port_fails_cleanly(initialised: CliEnv, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(_config_toml(initialised.proxy_dsn, port, initialised.control_dsn))
        out = run_cli("serve", "--config", str(config), timeout=30)
    assert_operator_error(out, str(port))


@pytest.mark.parametrize("dsn", ["postgresql://u:hunter2secret@127.0.0.1:xx/db",
                                 "mysql://u:hunter2secret@127.0.0.1/db"])
def test_a_bad_dsn_option_is_refused_without_showing_its_password(dsn: str) -> None:
    out = run_cli("tenant", "list", "--dsn", dsn)
    assert out.returncode == 2
    assert_operator_error(out, "--dsn", "***")
    assert "hunter2secret" not in out.stderr + out.stdout
