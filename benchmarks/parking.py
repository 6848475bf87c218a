"""Parked servers (issue 16, lever 4) against another build, through real proxies.

``python -m benchmarks.parking --before PATH [--seconds 3] [--rounds 4] [--clients 16 32]``:
the quick benchmark's scratch cluster and tenants, and two pgtenant processes on the same
database (pool_size 20): one as installed here, one importing ``pgtenant`` from ``PATH`` (a
copy of another commit's package with its compiled core, e.g. ``git show`` of the files
that differ over a copy of this tree; ``PYTHONSAFEPATH`` keeps the working directory off
its path). ``pgbench -S -c N -j 2`` through each, alternated round by round; for each run
the proxy's user and system CPU from ``/proc/PID/stat`` per transaction. Each proxy's tree
is checked from its memory map (whose compiled library it loaded) before timing. Prints
a Markdown table of every run; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .endpoints import Pgtenant
from .measure import Load, run_loads
from .run import Bench

__all__ = ["main"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, float]:
    """Returns: (user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def _tree(proxy: Pgtenant) -> str:
    """Returns: the directory of the compiled library the proxy loaded."""
    for line in Path(f"/proc/{proxy.pid}/maps").read_text().splitlines():
        if "__mypyc." in line:  # setup.py's GROUPS: pgtenant/<group>__mypyc.*.so
            return line.split()[-1].rsplit("/", 2)[0]
    return "(no compiled core)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path,
                        help="a directory holding the other build's pgtenant package")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[16])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgtenant-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(True, workdir)
        bench.counts = [10]
        bench.setup()
        db = bench.dbs[10]
        proxies = {
            "after": bench.tenant_proxies[10],
            "before": Pgtenant(bench.cluster, db.name, workdir / "pgtenant-before",
                               pool_size=20, env={"PYTHONPATH": str(args.before.resolve()),
                                                  "PYTHONSAFEPATH": "1"}),
        }
        rows = []
        try:
            trees = {name: _tree(p) for name, p in proxies.items()}
            print(f"compiled core loaded from: {trees}")
            if trees["before"] == trees["after"]:
                raise SystemExit("both proxies run the same tree")
            tenant = db.tenant("filtered", 0)
            for clients in args.clients:
                for r in range(args.rounds):
                    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                    for name in order:
                        proxy = proxies[name]
                        pid = proxy.pid
                        assert pid is not None
                        u0, s0 = _cpu(pid)
                        res = run_loads(bench.pgbench, [Load(name, proxy.port, db.name,
                                                             tenant.slug, tenant.token,
                                                             clients)],
                                        args.seconds, pid)
                        u1, s1 = _cpu(pid)
                        n = res.transactions
                        rows.append((clients, r + 1, name, res.tps, (u1 - u0) / n * 1e6,
                                     (s1 - s0) / n * 1e6))
                        print(rows[-1], flush=True)
        finally:
            proxies["before"].stop()
            bench.stop()
    print(f"\n`pgbench -n -S -c N -j 2 -T {args.seconds:g}`, pool_size 20, alternated\n")
    print("| clients | round | build | tps | user µs/txn | system µs/txn |")
    print("|---|---|---|---|---|---|")
    for clients, r, name, tps, user, system in rows:
        print(f"| {clients} | {r} | {name} | {tps:,.0f} | {user:.1f} | {system:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
