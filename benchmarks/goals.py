"""Issue 16's table in one interleaved run: ``python -m benchmarks.goals``.

Every figure of the issue ("Faster than doing it by hand") against its goal, measured side by
side on this machine (clients, proxies and Postgres share the CPUs), 16 clients unless said:

- ``pgbench -S``: pgtenant ÷ PgBouncer 1.18 (transaction mode);
- a tenant-scoped read on an RLS table (4 tenants x 4 clients): pgtenant, which injects the
  context, ÷ PgBouncer with the application sending ``BEGIN\\; SET LOCAL app.tenant_id ...\\;
  <query>\\; COMMIT`` in one packet (what a team would do by hand instead);
- ``pgbench -S -M extended``: pgtenant ÷ PgBouncer;
- 1,000 clients ÷ 50 clients, pool of 20 (PgBouncer's own ratio next to it: pgbench's cost of
  driving 1,000 connections on the same two cores is in both);
- proxy CPU (user + system, ``/proc/<pid>/stat``) per ``-S`` transaction ÷ PgBouncer's;
- resident memory per idle logged-in client (1,000 clients, a fresh proxy).

Each round runs every variant once, in an order rotated from round to round; a ratio is the
median over rounds of the ratio within a round (the two sides ran seconds apart), and its range
over the rounds is printed too. ``--baseline CHECKOUT`` adds a second pgtenant, run from another
checkout's ``.venv`` (e.g. a worktree of an older commit, after its ``make install``), to every
round: before and after in the same run. Writes ``results/goals.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .endpoints import Endpoint, PgBouncer, Pgtenant, find_pgbouncer
from .fixture import APP_PASSWORD, APP_ROLE, BenchDb
from .measure import Load, Result, idle_clients_memory, run_loads
from .run import RESULTS, Bench, machine, raise_fd_limit, tenant_loads

__all__ = ["GOALS", "figures", "main", "ratio", "report"]

# (figure, comparison, goal, what it is): the table.
GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("select_only", ">=", 0.80, "`pgbench -S`: pgtenant ÷ PgBouncer"),
    ("one_packet", ">=", 1.0, "tenant-scoped read (RLS): pgtenant ÷ PgBouncer + SET LOCAL "
                              "in one packet"),
    ("extended", ">=", 0.70, "`pgbench -S -M extended`: pgtenant ÷ PgBouncer"),
    ("many_clients", ">=", 0.85, "1,000 clients ÷ 50 clients (pool of 20)"),
    ("cpu", "<=", 1.4, "proxy CPU per `-S` transaction ÷ PgBouncer's"),
    ("idle_bytes", "<=", 5000.0, "memory per idle client, bytes"),
)


class Goals:
    def __init__(self, bench: Bench, seconds: float, rounds: int,
                 baseline: Pgtenant | None):
        self.bench = bench
        self.seconds = seconds
        self.rounds = rounds
        self.db: BenchDb = bench.dbs[bench.counts[0]]
        self.proxies: dict[str, Pgtenant] = {"pgtenant": bench.tenant_proxies[self.db.count]}
        if baseline is not None:
            self.proxies["baseline"] = baseline
        assert bench.pgbouncer is not None
        self.pgbouncer: Endpoint = bench.pgbouncer
        self.runs: dict[str, list[Result]] = {}

    def _select(self, endpoint: Endpoint, clients: int, protocol: str) -> Result:
        # pgbench's -T includes connecting, which for 1,000 clients takes seconds here (tps
        # excludes it): those runs get twice the time.
        seconds = self.seconds * (2 if clients > 100 else 1)
        if isinstance(endpoint, Pgtenant):
            return self.bench._select_as_tenant(endpoint, self.db, clients, seconds, protocol)
        load = Load(endpoint.name, endpoint.port, self.db.name, APP_ROLE, APP_PASSWORD,
                    clients, protocol=protocol)
        return run_loads(self.bench.pgbench, [load], seconds, endpoint.pid)

    def _scoped(self, endpoint: Endpoint, via: str) -> Result:
        loads = tenant_loads("filtered", "read", self.db, endpoint.port, via)
        return run_loads(self.bench.pgbench, loads, self.seconds, endpoint.pid)

    def variants(self) -> dict[str, Callable[[], Result]]:
        out: dict[str, Callable[[], Result]] = {}
        ends: dict[str, Endpoint] = {**self.proxies, "pgbouncer": self.pgbouncer}
        for name, end in ends.items():
            out[f"S/{name}"] = partial(self._select, end, 16, "simple")
            out[f"X/{name}"] = partial(self._select, end, 16, "extended")
            out[f"scoped/{name}"] = partial(
                self._scoped, end, "pgbouncer_one_packet" if name == "pgbouncer" else "pgtenant")
            for clients in (50, 1000):
                out[f"c{clients}/{name}"] = partial(self._select, end, clients, "simple")
        assert self.bench.splice is not None
        out["S/splice"] = partial(self._select, self.bench.splice, 16, "simple")
        return out

    def run(self) -> None:
        variants = self.variants()
        names = list(variants)
        self.runs = {name: [] for name in names}
        for r in range(self.rounds):
            shift = r * len(names) // self.rounds
            for name in names[shift:] + names[:shift]:
                self.runs[name].append(variants[name]())
                print(f"  round {r + 1}: {name} {self.runs[name][-1].tps:,.0f} tps",
                      file=sys.stderr)

    def idle_memory(self, clients: int = 1000) -> dict[str, float]:
        """Resident bytes per idle client: a fresh proxy of each kind (pool of 4)."""
        tenant = self.db.tenant("filtered", 0)
        out: dict[str, float] = {}
        for name, proxy in self.proxies.items():
            fresh = Pgtenant(self.bench.cluster, self.db.name,
                             self.bench.workdir / f"idle-{name}", pool_size=4,
                             checkout=proxy.checkout)
            try:
                assert fresh.pid is not None
                out[name] = idle_clients_memory(fresh.pid, fresh.port, tenant.slug,
                                                tenant.token, self.db.name, clients)
            finally:
                fresh.stop()
        # A fresh PgBouncer too: its slabs keep what the 1,000-client runs allocated, so the
        # one that served them would charge nothing to new idle clients.
        binary = find_pgbouncer()
        assert binary is not None
        bouncer = PgBouncer(binary, self.bench.cluster, [self.db.name],
                            self.bench.workdir / "idle-pgbouncer", pool_size=4)
        try:
            assert bouncer.pid is not None
            out["pgbouncer"] = idle_clients_memory(bouncer.pid, bouncer.port, APP_ROLE,
                                                   APP_PASSWORD, self.db.name, clients)
        finally:
            bouncer.stop()
        return out


def ratio(runs: dict[str, list[Result]], top: str, bottom: str, *,
          cpu: bool = False) -> list[float]:
    """Returns: ``top`` ÷ ``bottom`` within each round (tps, or CPU µs per transaction)."""
    def value(res: Result) -> float:
        return res.cpu_us_per_txn if cpu else res.tps
    return [value(a) / value(b) for a, b in zip(runs[top], runs[bottom], strict=True)]


def figures(runs: dict[str, list[Result]], proxy: str) -> dict[str, list[float]]:
    """Returns: the issue's ratios for ``proxy`` ("pgtenant" or "baseline"), per round."""
    return {
        "select_only": ratio(runs, f"S/{proxy}", "S/pgbouncer"),
        "one_packet": ratio(runs, f"scoped/{proxy}", "scoped/pgbouncer"),
        "extended": ratio(runs, f"X/{proxy}", "X/pgbouncer"),
        "many_clients": ratio(runs, f"c1000/{proxy}", f"c50/{proxy}"),
        "cpu": ratio(runs, f"S/{proxy}", "S/pgbouncer", cpu=True),
    }


def _judge(op: str, value: float, goal: float) -> str:
    met = value >= goal if op == ">=" else value <= goal
    return "met" if met else "**not met**"


def report(runs: dict[str, list[Result]], proxies: list[str], memory: dict[str, float]
           ) -> tuple[str, dict[str, Any]]:
    """Returns: the Markdown table of the goals and the figures for goals.json."""
    data: dict[str, Any] = {"tps": {}, "cpu_us_per_txn": {}, "figures": {}, "memory": memory}
    for name, results in runs.items():
        data["tps"][name] = [round(r.tps, 1) for r in results]
        data["cpu_us_per_txn"][name] = [round(r.cpu_us_per_txn, 2) for r in results]
    head = ["figure", *(f"{p} (median; range)" for p in proxies), "goal", ""]
    per_proxy = {proxy: figures(runs, proxy) for proxy in proxies}
    rows = []
    for key, op, goal, what in GOALS:
        cells = []
        judged: float | None = None  # the first proxy's (this checkout's), not a baseline's
        for proxy in proxies:
            if key == "idle_bytes":
                value = memory[proxy]
                cells.append(f"{value:,.0f} (PgBouncer {memory['pgbouncer']:,.0f})")
                data["figures"].setdefault(proxy, {})[key] = round(value)
            else:
                values = per_proxy[proxy][key]
                value = statistics.median(values)
                data["figures"].setdefault(proxy, {})[key] = [round(v, 3) for v in values]
                cells.append(f"{value:.3f} ({min(values):.3f}-{max(values):.3f})")
            if judged is None:
                judged = value
        assert judged is not None
        bound = f"{op} {goal:,.0f}" if key == "idle_bytes" else f"{op} {goal:.2f}"
        rows.append([what, *cells, bound, _judge(op, judged, goal)])
    bouncer = ratio(runs, "c1000/pgbouncer", "c50/pgbouncer")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", f"PgBouncer's own 1,000 ÷ 50 clients: {statistics.median(bouncer):.3f} "
              f"({min(bouncer):.3f}-{max(bouncer):.3f}).", "",
              "| variant | tps (median) | endpoint CPU µs/txn (median) |", "|---|---|---|"]
    for name, results in runs.items():
        lines.append(f"| {name} | {statistics.median(r.tps for r in results):,.0f} | "
                     f"{statistics.median(r.cpu_us_per_txn for r in results):.1f} |")
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.goals",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--baseline", type=Path, help="another pgtenant checkout (with .venv)")
    parser.add_argument("--out", type=Path, default=RESULTS / "goals.json")
    args = parser.parse_args(argv)
    if args.seconds < 2:
        parser.error("--seconds: at least 2 (1,000 clients take seconds to connect)")
    raise_fd_limit()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgtenant-goals-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(True, workdir)
        bench.counts = [10]
        try:
            bench.setup()
            if bench.pgbouncer is None:
                raise SystemExit(bench.pgbouncer_note)
            baseline = None
            if args.baseline is not None:
                db = bench.dbs[10]
                baseline = Pgtenant(bench.cluster, db.name, workdir / "baseline", pool_size=20,
                                    checkout=args.baseline.resolve())
            try:
                goals = Goals(bench, args.seconds, args.rounds, baseline)
                goals.run()
                memory = goals.idle_memory()
            finally:
                if baseline is not None:
                    baseline.stop()
        finally:
            bench.stop()
    table, data = report(goals.runs, list(goals.proxies), memory)
    data.update(machine=machine(), pgbouncer=bench.pgbouncer_note, seconds=args.seconds,
                rounds=args.rounds, baseline=str(args.baseline or ""),
                total_seconds=round(time.monotonic() - started, 1),
                finished_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"Issue 16's figures, {args.seconds:g} s per run, {args.rounds} interleaved rounds, "
          f"{data['total_seconds']:.0f} s ({bench.pgbouncer_note})\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
