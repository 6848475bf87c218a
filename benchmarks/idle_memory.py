"""Memory per idle client (issue 16), alone: ``python -m benchmarks.idle_memory``.

A scratch cluster with one small ``bench_10`` database (fixture.py), a real ``pgtenant
serve`` (pool_size 4, as in run.py's idle_memory), then ``--clients`` raw-protocol clients
logged in and left idle: resident memory of the proxy with them minus without them, per
client (measure.idle_clients_memory, the method of the full suite), ``--runs`` times, each
with a fresh proxy.

``--trace``: one more run with the proxy under tracemalloc (traced_serve.py), which prints
where the bytes of an idle client go: the tracemalloc difference between the snapshots
taken with and without the clients, per client, grouped by the innermost pgtenant line that
caused each allocation (allocations made inside asyncio/uvloop on pgtenant's behalf are
charged to pgtenant's call), and the live pgtenant objects per class with their sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pgtenant.control.cluster import PostgresCluster

from .endpoints import Pgtenant
from .fixture import build_database
from .measure import _open_idle, idle_clients_memory
from .run import raise_fd_limit

ROOT = Path(__file__).resolve().parents[1]


def _request(folder: Path, name: str) -> tuple[tracemalloc.Snapshot, dict[str, Any]]:
    (folder / f"{name}.req").write_text("")
    deadline = time.monotonic() + 120
    while not (folder / f"{name}.snap").exists():
        if (folder / f"{name}.err").exists():
            raise RuntimeError((folder / f"{name}.err").read_text())
        if time.monotonic() > deadline:
            raise RuntimeError("the traced proxy wrote no snapshot")
        time.sleep(0.1)
    return (tracemalloc.Snapshot.load(str(folder / f"{name}.snap")),
            json.loads((folder / f"{name}.objs.json").read_text()))


def _where(frames: tracemalloc.Traceback) -> str:
    """The innermost pgtenant frame of an allocation, else its innermost frame."""
    for frame in reversed(frames):  # a Traceback lists the oldest frame first
        if "/pgtenant/" in frame.filename:
            return f"{frame.filename.split('/pgtenant/', 1)[1]}:{frame.lineno}"
    top = frames[-1]
    return f"{top.filename.rsplit('/', 2)[-1]}:{top.lineno} (no pgtenant frame)"


async def _hold(port: int, user: str, password: str, database: str, count: int) -> list[Any]:
    sem = asyncio.Semaphore(100)

    async def one() -> Any:
        async with sem:
            return await _open_idle(port, user, password, database)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def trace(cluster: PostgresCluster, db: Any, workdir: Path, count: int, top: int) -> None:
    folder = workdir / "trace"
    folder.mkdir()
    tenant = db.tenant("filtered", 0)
    pgt = Pgtenant(cluster, db.name, workdir / "traced", pool_size=4,
                   module="benchmarks.traced_serve", env={"PGTENANT_TRACE_DIR": str(folder)},
                   startup_timeout=120)
    try:
        # One client first, gone again: caches filled by the first login (the tenant's
        # registry entry, the guard, imports) are not charged to the idle clients. The
        # first request starts tracing, so "before" is the second.
        _request(folder, "start")
        loop = asyncio.new_event_loop()
        for writer in loop.run_until_complete(_hold(pgt.port, tenant.slug, tenant.token,
                                                    db.name, 1)):
            writer.close()
        time.sleep(0.5)
        before, objs_before = _request(folder, "before")
        writers = loop.run_until_complete(_hold(pgt.port, tenant.slug, tenant.token,
                                                db.name, count))
        time.sleep(0.5)
        after, objs_after = _request(folder, "after")
        for writer in writers:
            writer.close()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()
    finally:
        pgt.stop()
    diff = after.compare_to(before, "traceback")
    grouped: dict[str, list[int]] = {}
    for stat in diff:
        row = grouped.setdefault(_where(stat.traceback), [0, 0])
        row[0] += stat.size_diff
        row[1] += stat.count_diff
    total = sum(size for size, _ in grouped.values())
    print(f"\ntracemalloc: {total / count:,.0f} bytes per idle client "
          f"({count} clients), by the innermost pgtenant line:")
    print(f"{'bytes/client':>13} {'blocks/client':>14}  where")
    for where, (size, blocks) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{size / count:>13,.1f} {blocks / count:>14.2f}  {where}")
    print("\nlive pgtenant objects added per idle client (count, bytes each: object, "
          "__dict__, containers held):")
    for name, row in sorted(objs_after.items(), key=lambda kv: -kv[1]["count"]):
        added = row["count"] - objs_before.get(name, {"count": 0})["count"]
        if added < count // 2:
            continue
        n = row["count"]
        attrs = ", ".join(f"{k} {v / n:.0f}" for k, v in
                          sorted(row["attributes"].items(), key=lambda kv: -kv[1]) if v / n >= 40)
        print(f"  {name}: +{added / count:.2f}/client, object {row['object'] / n:.0f}, "
              f"__dict__ {row['dict'] / n:.0f}; {attrs}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle_memory",
                                     description=__doc__)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="also the tracemalloc breakdown")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="pgtenant-idle-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        cluster = PostgresCluster(workdir / "pg")
        cluster.start()
        try:
            db = asyncio.run(build_database(cluster, 10, 20, 2))
            tenant = db.tenant("filtered", 0)
            figures = []
            for run in range(args.runs):
                pgt = Pgtenant(cluster, db.name, workdir / f"run{run}", pool_size=4)
                try:
                    assert pgt.pid is not None
                    figures.append(idle_clients_memory(pgt.pid, pgt.port, tenant.slug,
                                                       tenant.token, db.name, args.clients))
                finally:
                    pgt.stop()
            print(f"resident memory per idle client ({args.clients} clients, {args.runs} "
                  f"runs): " + ", ".join(f"{f:,.0f}" for f in figures) + " bytes")
            if args.trace:
                trace(cluster, db, workdir, args.clients, args.top)
        finally:
            cluster.destroy()


if __name__ == "__main__":
    main()
