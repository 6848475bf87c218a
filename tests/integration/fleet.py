"""A fleet for migration tests: a database with ``pgtenant init``, N schema-per-tenant
tenants made by ``create_tenant`` (the code ``tenant create`` runs), a config and a migrations
folder; and ``pgtenant migrate`` driven as an operator does (a subprocess, JSON lines).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from pgtenant.config import TenantTypeConfig
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import init_database
from pgtenant.control.tenants import create_tenant

from .conftest import ROOT

ENTERPRISE = TenantTypeConfig(name="enterprise", role="{schema}",
                              search_path=("{schema}", "public"))
PROXY_ROLE = "pgtenant_mig"
_names = itertools.count()


@dataclass
class Fleet:
    """A database with pgtenant installed, ``slugs`` tenants, a config and a migrations dir."""

    dbname: str
    admin_dsn: str
    slugs: list[str]
    config: Path
    migrations: Path

    def write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            (self.migrations / name).write_text(text)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def argv(self, command: str, *args: str) -> list[str]:
        extra = ["--dsn", self.admin_dsn] if command != "new" else []
        return [sys.executable, "-m", "pgtenant", "migrate", command, "--config",
                str(self.config), *extra, *args]

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


def spawn(argv: list[str]) -> subprocess.Popen[str]:
    """A runner in the background, its JSON lines readable as they come."""
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def make_fleet(cluster: PostgresCluster, tmp: Path, n: int) -> Fleet:
    index = next(_names)
    dbname = f"mig_{index}"
    prefix = "abcdefghijklmnopqrstuvwxyz"[index]
    cluster.create_database(dbname)
    admin = cluster.admin_dsn(dbname)
    await init_database(admin, proxy_role=PROXY_ROLE, proxy_password="x" * 20,
                        control_role="pgtenant_mig_control", control_password="y" * 20,
                        tenant_types={"enterprise": ENTERPRISE})
    slugs = [f"m{prefix}{i:02d}" for i in range(n)]
    for slug in slugs:  # one at a time: concurrent GRANTs on schema public collide (XX000)
        await create_tenant(admin, slug=slug, tenant_type=ENTERPRISE, proxy_role=PROXY_ROLE)
    config = tmp / "pgtenant.toml"
    config.write_text(f"""\
[databases.{dbname}]
dsn = "postgresql://{PROXY_ROLE}:{'x' * 20}@{cluster.host}:{cluster.port}/{dbname}"

[tenant_types.enterprise]
role = "{{schema}}"
search_path = ["{{schema}}", "public"]

[migrations]
dir = "migs"
""")
    (tmp / "migs").mkdir()
    return Fleet(dbname, admin, slugs, config, tmp / "migs")


FleetFactory = Callable[[int], Coroutine[Any, Any, Fleet]]


def status_by_tenant(fleet: Fleet) -> dict[str, dict[str, Any]]:
    out = fleet.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return {row["tenant"]: row for row in events(out.stdout)}
