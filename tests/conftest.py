"""Shared fixtures: one real PostgreSQL cluster per test session and the demo database in it.

Set ``PGTENANT_TEST_PG_KEEP=1`` to leave the cluster's directory (data, log) behind for
inspection; its path is printed at the end of the session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.demo import DemoEnv, build_demo

__all__ = ["demo_env", "pg_cluster"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A started cluster in a fresh temp directory; stopped (and deleted) at session end."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        if os.environ.get("PGTENANT_TEST_PG_KEEP"):
            cluster.stop()
            print(f"\nPGTENANT_TEST_PG_KEEP: cluster kept in {cluster.basedir}", file=sys.stderr)
        else:
            cluster.destroy()


@pytest.fixture(scope="session")
async def demo_env(pg_cluster: PostgresCluster) -> AsyncIterator[DemoEnv]:
    """Database ``app`` with pgtenant installed and the demo tenants, rows and tokens."""
    pg_cluster.create_database("app")
    yield await build_demo(pg_cluster.admin_dsn("app"))
