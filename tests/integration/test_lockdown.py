"""The proxy refuses to serve a database that `pgtenant init` did not lock down."""

from __future__ import annotations

from pathlib import Path

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv

from .conftest import free_port
from .helpers import serve_until as _serve


def _config(env: DemoEnv, dbname: str, port: int, extra: str = "") -> str:
    dsn = env.proxy_dsn.rsplit("/", 1)[0] + f"/{dbname}"
    return (f'listen = "127.0.0.1:{port}"\n{extra}\n[databases.{dbname}]\ndsn = "{dsn}"\n'
            '[tenant_types.sme]\nrole = "tenant_sme"\n')


def test_a_database_without_lockdown_is_refused_at_start_or_warned_about(
    pg_cluster: PostgresCluster, demo_env: DemoEnv, tmp_path: Path,
) -> None:
    pg_cluster.create_database("bare")  # the login role exists, but init never ran here
    strict = tmp_path / "strict.toml"
    strict.write_text(_config(demo_env, "bare", free_port()))
    code, log = _serve(strict, "listening on")
    assert code == 1, log
    assert "database 'bare' is not locked down" in log
    assert "PUBLIC may execute set_config(text,text,boolean)" in log
    assert "pgtenant.refuse(text, text[]) is missing" in log
    assert "HINT: run `pgtenant init" in log

    lenient = tmp_path / "lenient.toml"
    lenient.write_text(_config(demo_env, "bare", free_port(), 'lockdown_check = "warn"'))
    code, log = _serve(lenient, "listening on")
    assert code is None, log  # it started; we stopped it
    assert "LOCKDOWN WARNING: database 'bare' is not locked down" in log
