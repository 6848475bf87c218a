"""The compiled hot path against the pure one, through real proxies (issue 16).

``python -m benchmarks.compiled [--seconds 3] [--rounds 3] [--baseline DIR] [--no-pure]``:
the quick benchmark's scratch cluster and tenants, PgBouncer, and pgtenant processes on the
same database: the install as built, one started with ``PGTENANT_PURE=1``, and with
``--baseline DIR`` one running the ``pgtenant`` package of another checkout built in place
(``python setup.py build_ext --inplace`` there: an older set of compiled modules, to tell
what a change to that set gains). Then ``pgbench -S -c 16 -j 2`` (simple, then ``-M
extended``) through each, interleaved round by round (rotating order). Each proxy's build is
checked from its memory map (mypyc's shared library, and from which directory), so a figure
cannot be credited to the wrong build. Prints every round's proxy CPU per transaction and a
Markdown table of medians and ranges; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pgtenant.compiled import PURE_ENV

from .endpoints import ROOT, Pgtenant
from .measure import Result
from .run import Bench

__all__ = ["main"]

_SHARED_LIB = "__mypyc."  # pgtenant/_protocol__mypyc.*.so and its sibling (setup.py GROUPS)


def _loaded_from(proxy: Pgtenant) -> str | None:
    """Returns: the directory of the compiled shared library the proxy loaded, if any."""
    for line in Path(f"/proc/{proxy.pid}/maps").read_text().splitlines():
        if _SHARED_LIB in line:
            return str(Path(line.split()[-1]).parent.parent)
    return None


def _proxy(bench: Bench, name: str, env: dict[str, str]) -> Pgtenant:
    db = bench.dbs[bench.counts[0]]
    return Pgtenant(bench.cluster, db.name, bench.workdir / f"pgtenant-{name}", pool_size=20,
                    env=env)


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--baseline", type=Path, help="a checkout whose pgtenant/ was built "
                        "in place: its build runs as a third proxy")
    parser.add_argument("--no-pure", action="store_true", help="leave the pure build out")
    parser.add_argument("--protocols", default="simple,extended")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgtenant-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(True, workdir)
        bench.setup()
        db = bench.dbs[bench.counts[0]]
        proxies = {"compiled": bench.tenant_proxies[db.count]}
        expected: dict[str, str | None] = {"compiled": str(ROOT)}
        try:
            if not args.no_pure:
                proxies["pure"] = _proxy(bench, "pure", {PURE_ENV: "1"})
                expected["pure"] = None
            if args.baseline is not None:
                # PYTHONSAFEPATH: `-m` would put the working directory (this checkout) first.
                base = str(args.baseline.resolve())
                proxies["baseline"] = _proxy(bench, "baseline",
                                             {"PYTHONSAFEPATH": "1", "PYTHONPATH": base})
                expected["baseline"] = base
            loaded = {name: _loaded_from(p) for name, p in proxies.items()}
            print(f"compiled library loaded from: {loaded}")
            if loaded != expected:
                raise SystemExit(f"the proxies do not run the expected builds {expected}: "
                                 "is the install compiled (make install)?")
            rows = []
            for protocol in args.protocols.split(","):
                variants: dict[str, Callable[[], Result]] = {
                    f"pgtenant {name}": partial(bench._select_as_tenant, p, db, 16,
                                                args.seconds, protocol)
                    for name, p in proxies.items()}
                if bench.pgbouncer is not None:
                    variants["pgbouncer"] = partial(bench._app_run, bench.pgbouncer, db, 16,
                                                    args.seconds, protocol)
                runs: dict[str, list[Result]] = {name: [] for name in variants}
                names = list(variants)
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        result = variants[name]()
                        runs[name].append(result)
                        print(f"{protocol} round {r + 1} {name}: {result.tps:,.0f} tps, "
                              f"{result.cpu_us_per_txn:.1f} µs CPU/txn", flush=True)
                for name, rs in runs.items():
                    rows.append((protocol, name, [x.tps for x in rs],
                                 [x.cpu_us_per_txn for x in rs]))
        finally:
            for name, p in proxies.items():
                if name != "compiled":
                    p.stop()
            bench.stop()
    print(f"\n`pgbench -S -c 16 -j 2`, {args.seconds:g} s per run, {args.rounds} interleaved "
          f"rounds, median (range) ({bench.pgbouncer_note or 'no PgBouncer'})\n")
    print("| protocol | endpoint | tps | endpoint CPU µs/txn |")
    print("|---|---|---|---|")
    for protocol, name, tps, cpu in rows:
        print(f"| {protocol} | {name} | {_span(tps)} | {_span(cpu)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
