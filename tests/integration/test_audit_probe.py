"""``pgtenant audit --probe`` against the demo database through a real pgtenant.

The demo as built must come out clean; then holes are planted (each undone in ``finally``:
the demo database is shared by the whole session) and the probe must find each one, as the
tenant it signs in as. Every name made here starts with ``audit_probe_``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable

import asyncpg
import pytest

from pgtenant.config import parse_dsn
from pgtenant.configfile import load_config, parse_config
from pgtenant.control.audit.findings import Finding, Severity
from pgtenant.control.audit.probe import TOKEN_LABEL, ProbeError, run_probe
from pgtenant.control.demo import DemoEnv

from .conftest import ProxyProcess, free_port

__all__: list[str] = []


async def _probe(env: DemoEnv, proxy: ProxyProcess) -> list[Finding]:
    return await run_probe(env.admin_dsn, load_config(proxy.config_path), host="127.0.0.1",
                           port=proxy.port)


async def _live_probe_tokens(env: DemoEnv) -> int:
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pgtenant.tokens WHERE label = $1 AND revoked_at IS NULL",
            TOKEN_LABEL))
    finally:
        await conn.close()


def _by_check(findings: list[Finding], check: str, obj: str) -> list[Finding]:
    return [f for f in findings if f.check == check and f.object == obj]


async def test_demo_database_is_clean(demo_env: DemoEnv,
                                      start_proxy: Callable[..., ProxyProcess]) -> None:
    findings = await _probe(demo_env, start_proxy())
    # Every probe is refused by a privilege or a policy: no hole, nothing inconclusive.
    assert [f for f in findings if f.severity > Severity.INFO] == [], findings
    assert all(f.check == "probe_failed" for f in findings), findings
    assert await _live_probe_tokens(demo_env) == 0


async def test_planted_holes_are_found(demo_env: DemoEnv,
                                       start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    acme, initech = demo_env.tenants["acme"], demo_env.tenants["initech"]
    admin = await asyncpg.connect(demo_env.admin_dsn)
    # The enterprise tenant the probe signs in as is the first ready one by slug.
    enterprise = await admin.fetch(
        "SELECT slug, schema FROM pgtenant.organizations WHERE tenant_type = 'enterprise' "
        "AND status = 'ready' AND database IS NULL ORDER BY slug LIMIT 2")
    (prober, prober_schema), (victim, victim_schema) = enterprise
    try:
        # (1) a tenant table with no RLS, granted to the SME role: reads and writes leak.
        await admin.execute(
            "CREATE TABLE public.audit_probe_leaky (org_id uuid);"
            "GRANT ALL ON public.audit_probe_leaky TO tenant_sme")
        await admin.execute("INSERT INTO public.audit_probe_leaky VALUES ($1), ($2)",
                            acme.org_id, initech.org_id)
        # (2) an agency table (tenant_b) an SME may insert into; RLS keeps the row its own.
        await admin.execute(
            "CREATE TABLE tenant_b.audit_probe_xt (organization_id uuid NOT NULL);"
            "ALTER TABLE tenant_b.audit_probe_xt ENABLE ROW LEVEL SECURITY;"
            "CREATE POLICY p ON tenant_b.audit_probe_xt"
            " USING (organization_id = (SELECT pgtenant.current_tenant()))"
            " WITH CHECK (organization_id = (SELECT pgtenant.current_tenant()));"
            "GRANT INSERT ON tenant_b.audit_probe_xt TO tenant_sme")
        # (3) one enterprise tenant's role may read another's projects.
        await admin.execute(f'GRANT USAGE ON SCHEMA "{victim_schema}" TO "{prober_schema}";'
                            f'GRANT SELECT ON "{victim_schema}".projects TO "{prober_schema}"')

        findings = await _probe(demo_env, proxy)

        sme = "acme (type sme)"
        assert [f.subject for f in _by_check(findings, "probe_read",
                                             "public.audit_probe_leaky")] == [sme]
        read = _by_check(findings, "probe_read", "public.audit_probe_leaky")[0]
        assert read.severity is Severity.ERROR and read.kind == "table"
        assert "read 1 row of other tenants in public.audit_probe_leaky" in read.message
        (write,) = _by_check(findings, "probe_write", "public.audit_probe_leaky")
        assert write.subject == sme
        for what in ("updated 1 row", "deleted 1 row", "got a row with another"):
            assert what in write.message
        assert "tenant_sme" in write.fix

        (cross,) = _by_check(findings, "probe_cross_type_write", "tenant_b.audit_probe_xt")
        assert cross.subject == sme and "tenant type agency" in cross.message
        assert 'REVOKE INSERT ON "tenant_b"."audit_probe_xt" FROM "tenant_sme"' in cross.fix
        # Its policy refuses another tenant's id: the plain write probe finds nothing.
        assert not _by_check(findings, "probe_write", "tenant_b.audit_probe_xt")

        (opened,) = _by_check(findings, "probe_read", f"{victim_schema}.projects")
        assert opened.subject == f"{prober} (type enterprise)"
        assert (f"opened {victim_schema}.projects (a table of tenant {victim})"
                in opened.message)
        assert f'REVOKE USAGE ON SCHEMA "{victim_schema}"' in opened.fix
        # SELECT alone: no write is possible.
        assert not _by_check(findings, "probe_write", f"{victim_schema}.projects")

        planted = {"public.audit_probe_leaky", "tenant_b.audit_probe_xt",
                   f"{victim_schema}.projects"}
        assert {f.object for f in findings if f.severity is Severity.ERROR} == planted
        # Everything was rolled back and every token revoked.
        assert await admin.fetchval("SELECT count(*) FROM public.audit_probe_leaky") == 2
        assert await admin.fetchval("SELECT count(*) FROM tenant_b.audit_probe_xt") == 0
        assert await _live_probe_tokens(demo_env) == 0
    finally:
        await admin.execute(
            "DROP TABLE IF EXISTS public.audit_probe_leaky;"
            "DROP TABLE IF EXISTS tenant_b.audit_probe_xt;"
            f'REVOKE SELECT ON "{victim_schema}".projects FROM "{prober_schema}";'
            f'REVOKE USAGE ON SCHEMA "{victim_schema}" FROM "{prober_schema}"')
        await admin.close()


async def test_wrong_port_raises_probe_error(demo_env: DemoEnv) -> None:
    port = free_port()  # nothing listens there
    config = parse_config(tomllib.loads(demo_env.config_toml(port)))
    with pytest.raises(ProbeError, match=f"cannot connect to pgtenant at 127.0.0.1:{port}"):
        await run_probe(demo_env.admin_dsn, config, host="127.0.0.1", port=port)
    assert await _live_probe_tokens(demo_env) == 0


async def test_plain_postgres_is_not_taken_for_pgtenant(demo_env: DemoEnv) -> None:
    # The cluster itself answers there, but knows no tenant: one clear error, not a finding
    # per tenant type.
    backend = parse_dsn(demo_env.admin_dsn)
    config = parse_config(tomllib.loads(demo_env.config_toml(free_port())))
    with pytest.raises(ProbeError, match=f"pgtenant at {backend.host}:{backend.port} refused"):
        await run_probe(demo_env.admin_dsn, config, host=backend.host, port=backend.port)
    assert await _live_probe_tokens(demo_env) == 0


def test_cli_audit_with_probe_on_the_demo_exits_0(demo_env: DemoEnv,
                                                   start_proxy: Callable[..., ProxyProcess]
                                                   ) -> None:
    """The whole command: catalog audit, then the probe through the proxy the config's
    listen names; the demo is clean, so exit status 0 and no error in the JSON."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    proxy = start_proxy()
    done = subprocess.run(
        [sys.executable, "-m", "pgtenant", "audit", "--dsn", demo_env.admin_dsn, "--config",
         str(proxy.config_path), "--probe", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    findings = json.loads(done.stdout)
    assert not [f for f in findings if f["severity"] == "error"], findings
