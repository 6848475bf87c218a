"""``make bench`` (``python -m benchmarks [--quick]``): what pgtenant costs, in one run.

Everything is measured in one run and interleaved (each round runs every variant of an
experiment in turn, the order rotating between rounds; the median round is kept), so the
ratios hold on a noisy machine. Writes ``benchmarks/results/latest.{md,json}`` and PNG
charts, and prints the Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pgtenant.control.cluster import PostgresCluster

from .endpoints import Endpoint, PgBouncer, Pgtenant, Splice, find_pgbouncer
from .fixture import (
    APP_PASSWORD,
    APP_ROLE,
    BenchDb,
    add_database_per_tenant,
    build_database,
    pgbench_init,
)
from .measure import Load, Result, idle_clients_memory, percentile, run_loads
from .report import write_report

__all__ = ["main", "raise_fd_limit", "tenant_loads"]

RESULTS = Path(__file__).resolve().parent / "results"

READ = "\\set id random(1, :nrows)\nSELECT v, payload FROM {table} WHERE id = :id;\n"
WRITE = "\\set id random(1, :nrows)\nUPDATE {table} SET v = v + 1 WHERE id = :id;\n"
TABLES = {"filtered": "items", "routed": "items", "by_type": "all_items",
          "db_per_tenant": "items"}


def _script(layout: str, workload: str) -> str:
    if workload == "write" and layout == "by_type":
        return "\\set id random(1, :nrows)\nSELECT public.bump_item(:id);\n"
    return (READ if workload == "read" else WRITE).format(table=TABLES[layout])


def _baseline(layout: str, workload: str, packet: bool) -> str:
    """What applications do today behind PgBouncer: the context by hand, per transaction."""
    body = _script(layout, workload).splitlines()
    if layout == "db_per_tenant":  # nothing to set: the database is the boundary
        statements = ["BEGIN", body[1].rstrip(";"), "COMMIT"]
        if packet:
            return body[0] + "\n" + "\\; ".join(statements) + ";\n"
        return body[0] + "\n" + "".join(f"{s};\n" for s in statements)
    sets = ["SET LOCAL app.tenant_id = :tid"]
    if layout == "routed":
        sets.append("SET LOCAL search_path = :schema")
    if layout == "by_type":
        sets += ["SET LOCAL app.tenant_type = :ttype",
                 "SET LOCAL search_path = tenant_b, public"]
    statements = ["BEGIN", *sets, body[1].rstrip(";"), "COMMIT"]
    if packet:
        return body[0] + "\n" + "\\; ".join(statements) + ";\n"
    return body[0] + "\n" + "".join(f"{s};\n" for s in statements)


def tenant_loads(layout: str, workload: str, db: BenchDb, port: int, via: str,
                 clients: int = 16, tenants: int = 4) -> list[Load]:
    """pgbench loads for ``tenants`` tenants of ``layout`` (``clients`` split between them):
    ``via="pgtenant"`` connects as each tenant with its token and runs the bare statement;
    anything else connects as the application role and sets the context by hand, in
    separate round trips or (``via`` ending in ``packet``) in one Query."""
    loads = []
    per = max(1, clients // tenants)
    for i in range(tenants):
        t = db.tenant(layout, i)
        defines = {"nrows": str(t.rows)}
        if via == "pgtenant":
            loads.append(Load(t.slug, port, db.name, t.slug, t.token, per,
                              _script(layout, workload), defines))
            continue
        defines["tid"] = f"'{t.org_id}'"
        if t.schema:
            defines["schema"] = t.schema
        defines["ttype"] = "'typ_a'" if i % 2 == 0 else "'typ_b'"
        script = _baseline(layout, workload, packet=via.endswith("packet"))
        # Without pgtenant, the application itself connects to the tenant's own database.
        dbname = f"bench_{t.database}" if t.database else db.name
        loads.append(Load(t.slug, port, dbname, APP_ROLE, APP_PASSWORD, per, script, defines))
    return loads


class Bench:
    def __init__(self, quick: bool, workdir: Path):
        self.quick = quick
        self.workdir = workdir
        self.seconds = 3.0 if quick else 8.0
        self.rounds = 1 if quick else 3
        self.counts = [10, 100] if quick else [10, 100, 1000]
        self.cluster = PostgresCluster(workdir / "pg")
        self.dbs: dict[int, BenchDb] = {}
        self.tenant_proxies: dict[int, Pgtenant] = {}
        self.pgbouncer: PgBouncer | None = None
        self.pgbouncer_note = ""
        self.splice: Splice | None = None
        self.pgbench = ""
        self.routes: dict[str, str] = {}  # database per tenant (full runs)
        self.results: dict[str, Any] = {"experiments": {}, "ratios": {}}

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        started = time.monotonic()
        self.cluster.start()
        pgbench = self.cluster.tool("pgbench")
        if pgbench is None:
            raise SystemExit("pgbench not found next to the Postgres binaries")
        self.pgbench = pgbench
        for count in self.counts:
            median = 200 if count < 1000 else 50
            self.dbs[count] = asyncio.run(build_database(self.cluster, count, median, 8))
            pgbench_init(self.cluster, self.dbs[count])
        first = self.dbs[self.counts[0]]
        if not self.quick:  # database per tenant: 10 more databases, where the box allows
            self.routes = asyncio.run(add_database_per_tenant(self.cluster, first, 10, 200))
        for count, db in self.dbs.items():
            self.tenant_proxies[count] = Pgtenant(
                self.cluster, db.name, self.workdir / "pgtenant", pool_size=20,
                routes=self.routes if db is first else None)
        binary = find_pgbouncer()
        if binary is None:
            self.pgbouncer_note = ("PgBouncer not installed and could not be installed "
                                   "(apt-get install pgbouncer): its columns are skipped")
        else:
            self.pgbouncer = PgBouncer(binary, self.cluster, [d.name for d in self.dbs.values()],
                                       self.workdir / "pgbouncer", pool_size=20)
            version = subprocess.run([binary, "--version"], capture_output=True, text=True)
            self.pgbouncer_note = version.stdout.splitlines()[0] if version.stdout else ""
        self.splice = Splice(self.cluster, self.workdir)
        self.results["setup_seconds"] = round(time.monotonic() - started, 1)

    def stop(self) -> None:
        for endpoint in (*self.tenant_proxies.values(), self.pgbouncer, self.splice):
            if endpoint is not None:
                endpoint.stop()
        self.cluster.destroy()

    # ------------------------------------------------------------------ helpers

    def _app_load(self, port: int, db: BenchDb, clients: int, label: str,
                  script: str | None = None, defines: dict[str, str] | None = None) -> Load:
        return Load(label, port, db.name, APP_ROLE, APP_PASSWORD, clients, script,
                    defines or {})

    def _app_run(self, endpoint: Endpoint, db: BenchDb, clients: int,
                 seconds: float, protocol: str = "simple") -> Result:
        """pgbench -S as the application role through ``endpoint``."""
        load = self._app_load(endpoint.port, db, clients, endpoint.name)
        load.protocol = protocol
        return run_loads(self.pgbench, [load], seconds, endpoint.pid)

    def _select_as_tenant(self, pgt: Pgtenant, db: BenchDb, clients: int,
                          seconds: float, protocol: str = "simple") -> Result:
        """pgbench -S through pgtenant as the first filtered tenant."""
        tenant = db.tenant("filtered", 0)
        return run_loads(self.pgbench, [Load("pgtenant", pgt.port, db.name, tenant.slug,
                                             tenant.token, clients, protocol=protocol)],
                         seconds, pgt.pid)

    def _tenant_run(self, layout: str, workload: str, db: BenchDb, endpoint: Endpoint,
                    via: str) -> Result:
        return run_loads(self.pgbench, tenant_loads(layout, workload, db, endpoint.port, via),
                         self.seconds, endpoint.pid)

    def _interleave(self, variants: dict[str, Callable[[], Result]]) -> dict[str, Result]:
        """Run every variant once per round, rotating the order; keep each one's median
        round (by tps)."""
        runs: dict[str, list[Result]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(self.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                runs[name].append(variants[name]())
        return {name: sorted(rs, key=lambda x: x.tps)[len(rs) // 2] for name, rs in runs.items()}

    @staticmethod
    def _row(result: Result) -> dict[str, float]:
        return {"tps": round(result.tps, 1), "p50_ms": round(result.p50, 3),
                "p95_ms": round(result.p95, 3), "p99_ms": round(result.p99, 3),
                "cpu_us_per_txn": round(result.cpu_us_per_txn, 1),
                "transactions": result.transactions}

    # ------------------------------------------------------------------ experiments

    def select_only(self) -> None:
        """pgbench -S at 1, 16 and 64 clients: direct, PgBouncer, pgtenant, bare splice; and
        at 16 clients with the extended protocol (``-M extended``: unnamed statements, what
        most drivers send) and ``-M prepared`` (named statements)."""
        db = self.dbs[self.counts[0]]
        pgt = self.tenant_proxies[db.count]
        seconds = 2.0 if self.quick else self.seconds
        out: dict[str, Any] = {}
        for clients, protocol in ((1, "simple"), (16, "simple"), (64, "simple"),
                                  (16, "extended"), (16, "prepared")):
            variants: dict[str, Callable[[], Result]] = {
                "direct": partial(self._app_run, Endpoint(self.cluster.port), db, clients,
                                  seconds, protocol),
                "pgtenant": partial(self._select_as_tenant, pgt, db, clients, seconds,
                                    protocol),
            }
            assert self.splice is not None
            variants["splice"] = partial(self._app_run, self.splice, db, clients, seconds,
                                         protocol)
            # PgBouncer 1.18 has no prepared statements in transaction mode (1.21 added
            # them): -M prepared through it fails once a client changes servers.
            if self.pgbouncer is not None and protocol != "prepared":
                variants["pgbouncer"] = partial(self._app_run, self.pgbouncer, db, clients,
                                                seconds, protocol)
            res = self._interleave(variants)
            if protocol != "simple":
                out[f"{clients} {protocol}"] = {name: self._row(r) for name, r in res.items()}
                key = f"select_only_c{clients}_{protocol}_pgtenant_vs_"
                if "pgbouncer" in res:
                    self.results["ratios"][key + "pgbouncer"] = round(
                        res["pgtenant"].tps / res["pgbouncer"].tps, 3)
                self.results["ratios"][key + "splice"] = round(
                    res["pgtenant"].tps / res["splice"].tps, 3)
                continue
            out[str(clients)] = {name: self._row(r) for name, r in res.items()}
            if "pgbouncer" in res:
                self.results["ratios"][f"select_only_c{clients}_pgtenant_vs_pgbouncer"] = round(
                    res["pgtenant"].tps / res["pgbouncer"].tps, 3)
            self.results["ratios"][f"select_only_c{clients}_pgtenant_vs_splice"] = round(
                res["pgtenant"].tps / res["splice"].tps, 3)
            if clients == 16 and "pgbouncer" in res:
                self.results["ratios"]["cpu_per_txn_pgtenant_vs_pgbouncer"] = round(
                    res["pgtenant"].cpu_us_per_txn / res["pgbouncer"].cpu_us_per_txn, 3)
        self.results["experiments"]["select_only"] = out

    def tenant_scoped(self) -> None:
        """Tenant-scoped transactions: pgtenant against what applications do today."""
        db = self.dbs[self.counts[0]]
        pgt = self.tenant_proxies[db.count]
        out: dict[str, Any] = {}
        workloads = ["read"] if self.quick else ["read", "write"]
        for layout in ("filtered", "routed"):
            for workload in workloads:
                variants: dict[str, Callable[[], Result]] = {
                    "pgtenant": partial(self._tenant_run, layout, workload, db, pgt,
                                        "pgtenant"),
                }
                if self.pgbouncer is not None:
                    for via in ("pgbouncer_round_trips", "pgbouncer_one_packet"):
                        variants[via] = partial(self._tenant_run, layout, workload, db,
                                                self.pgbouncer, via)
                res = self._interleave(variants)
                key = f"{layout}_{workload}"
                out[key] = {name: self._row(r) for name, r in res.items()}
                for via in ("pgbouncer_round_trips", "pgbouncer_one_packet"):
                    if via in res:
                        self.results["ratios"][f"tenant_scoped_{key}_pgtenant_vs_{via}"] = round(
                            res["pgtenant"].tps / res[via].tps, 3)
        self.results["experiments"]["tenant_scoped"] = out

    def layouts(self) -> None:
        """Routed against filtered (and the story's by-type design) at each tenant count,
        all through pgtenant, 4 tenants active (tenant 0 is 100x the median size)."""
        out: dict[str, Any] = {}
        workloads = ["read"] if self.quick else ["read", "write"]
        for count, db in self.dbs.items():
            pgt = self.tenant_proxies[count]
            for workload in workloads:
                layouts = ["filtered", "routed", "by_type"]
                if "db_per_tenant" in db.tenants:
                    layouts.append("db_per_tenant")
                variants: dict[str, Callable[[], Result]] = {
                    layout: partial(self._tenant_run, layout, workload, db, pgt, "pgtenant")
                    for layout in layouts
                }
                res = self._interleave(variants)
                out[f"{count}_{workload}"] = {name: self._row(r) for name, r in res.items()}
                self.results["ratios"][f"routed_vs_filtered_{count}_tenants_{workload}"] = round(
                    res["routed"].tps / res["filtered"].tps, 3)
        self.results["experiments"]["layouts"] = out

    def noisy_neighbour(self) -> None:
        """One tenant with 12 clients against three with one each, on a pool of 4: each
        tenant's latency shows whether the busy one slows the others."""
        db = self.dbs[self.counts[0]]
        pgt = Pgtenant(self.cluster, db.name, self.workdir / "pgtenant-noisy", pool_size=4)
        try:
            loads = []
            for i, clients in enumerate((12, 1, 1, 1)):
                t = db.tenant("filtered", i)
                loads.append(Load(t.slug, pgt.port, db.name, t.slug, t.token, clients,
                                  _script("filtered", "read"), {"nrows": str(t.rows)}))
            result = run_loads(self.pgbench, loads, self.seconds, pgt.pid)
        finally:
            pgt.stop()
        self.results["experiments"]["noisy_neighbour"] = {
            label: {"clients": load.clients, "transactions": len(lat),
                    "p50_ms": round(percentile(lat, 50), 3),
                    "p99_ms": round(percentile(lat, 99), 3)}
            for load, (label, lat) in zip(loads, result.per_load.items(), strict=True)}

    def many_clients(self) -> None:
        """1,000 clients against 50 through pgtenant (pool of 20), select-only."""
        db = self.dbs[self.counts[0]]
        pgt = self.tenant_proxies[db.count]
        variants: dict[str, Callable[[], Result]] = {
            str(c): partial(self._select_as_tenant, pgt, db, c, self.seconds)
            for c in (50, 1000)
        }
        res = self._interleave(variants)
        self.results["experiments"]["many_clients"] = {
            k: self._row(r) for k, r in res.items()}
        self.results["ratios"]["clients_1000_vs_50"] = round(res["1000"].tps / res["50"].tps, 3)

    def idle_memory(self) -> None:
        """Resident memory per idle logged-in client, at 1,000 (and 10,000) clients."""
        db = self.dbs[self.counts[0]]
        tenant = db.tenant("filtered", 0)
        out: dict[str, Any] = {}
        for count in ([1000] if self.quick else [1000, 10000]):
            pgt = Pgtenant(self.cluster, db.name, self.workdir / f"pgtenant-idle-{count}",
                           pool_size=4)
            try:
                assert pgt.pid is not None
                row = {"pgtenant_bytes": round(idle_clients_memory(
                    pgt.pid, pgt.port, tenant.slug, tenant.token, db.name, count))}
            finally:
                pgt.stop()
            if self.pgbouncer is not None and self.pgbouncer.pid is not None:
                row["pgbouncer_bytes"] = round(idle_clients_memory(
                    self.pgbouncer.pid, self.pgbouncer.port, APP_ROLE, APP_PASSWORD, db.name,
                    count))
            out[str(count)] = row
        self.results["experiments"]["idle_memory"] = out

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            for step in (self.select_only, self.tenant_scoped, self.layouts,
                         self.noisy_neighbour, self.many_clients, self.idle_memory):
                started = time.monotonic()
                step()
                print(f"  {step.__name__}: {time.monotonic() - started:.1f}s", file=sys.stderr)
        finally:
            self.stop()
        return self.results


def machine() -> dict[str, Any]:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def raise_fd_limit() -> None:
    """Every process started from here (proxies, pgbench) inherits as many descriptors as
    this machine allows: the idle-client runs hold up to 10,000 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                else max(soft, 65536), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    raise_fd_limit()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgtenant-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(args.quick, workdir)
        results = bench.run()
    results["mode"] = "quick" if args.quick else "full"
    results["machine"] = machine()
    results["pgbouncer"] = bench.pgbouncer_note
    results["postgres"] = subprocess.run(
        [str(bench.cluster.bindir / "postgres"), "--version"], capture_output=True,
        text=True).stdout.strip()
    results["seconds_per_run"] = bench.seconds
    results["rounds"] = bench.rounds
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    markdown = write_report(results, args.out)
    print(markdown)
    print(json.dumps(results["ratios"], indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

