"""The compiled protocol core against the pure one, through real proxies (issue 16).

``python -m benchmarks.compiled [--seconds 3] [--rounds 3]``: the quick benchmark's scratch
cluster and tenants, PgBouncer, and two pgtenant processes on the same database, one started
with ``PGTENANT_PURE=1``; then ``pgbench -S -c 16`` (simple, then ``-M extended``) through
each, interleaved round by round (rotating order, median round by tps). Each proxy's build
is checked from its memory map (the compiled one has mypyc's shared library loaded), so a
figure cannot be credited to the wrong build. Prints a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pgtenant.compiled import PURE_ENV

from .endpoints import Pgtenant
from .measure import Result
from .run import Bench

__all__ = ["main"]

_SHARED_LIB = "_compiled__mypyc"


def _runs_compiled(proxy: Pgtenant) -> bool:
    """Returns: whether the proxy process has the compiled core loaded."""
    return _SHARED_LIB in Path(f"/proc/{proxy.pid}/maps").read_text()


def _pure_proxy(bench: Bench) -> Pgtenant:
    db = bench.dbs[bench.counts[0]]
    before = os.environ.get(PURE_ENV)
    os.environ[PURE_ENV] = "1"  # inherited by the proxy process only
    try:
        return Pgtenant(bench.cluster, db.name, bench.workdir / "pgtenant-pure", pool_size=20)
    finally:
        if before is None:
            del os.environ[PURE_ENV]
        else:
            os.environ[PURE_ENV] = before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgtenant-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(True, workdir)
        bench.rounds = args.rounds
        bench.setup()
        pure = _pure_proxy(bench)
        try:
            db = bench.dbs[bench.counts[0]]
            compiled = bench.tenant_proxies[db.count]
            builds = {"compiled": _runs_compiled(compiled), "pure": _runs_compiled(pure)}
            print(f"compiled core loaded: {builds}")
            if builds != {"compiled": True, "pure": False}:
                raise SystemExit("the two proxies do not run the two builds: "
                                 "is the install compiled (make install)?")
            rows = []
            for protocol in ("simple", "extended"):
                variants: dict[str, Callable[[], Result]] = {
                    "pgtenant compiled": partial(bench._select_as_tenant, compiled, db, 16,
                                                 args.seconds, protocol),
                    "pgtenant pure": partial(bench._select_as_tenant, pure, db, 16,
                                             args.seconds, protocol),
                }
                if bench.pgbouncer is not None:
                    variants["pgbouncer"] = partial(bench._app_run, bench.pgbouncer, db, 16,
                                                    args.seconds, protocol)
                res: dict[str, Result] = bench._interleave(variants)
                for name, r in res.items():
                    rows.append((protocol, name, r))
                if bench.pgbouncer is not None:
                    base = res["pgbouncer"].tps
                    for name in ("pgtenant compiled", "pgtenant pure"):
                        print(f"{protocol}: {name} / pgbouncer = {res[name].tps / base:.3f}")
                print(f"{protocol}: compiled / pure = "
                      f"{res['pgtenant compiled'].tps / res['pgtenant pure'].tps:.3f}")
        finally:
            pure.stop()
            bench.stop()
    print(f"\n`pgbench -S -c 16 -j 2`, {args.seconds:g} s per run, median of "
          f"{args.rounds} interleaved rounds ({bench.pgbouncer_note or 'no PgBouncer'})\n")
    print("| protocol | endpoint | tps | p99 ms | endpoint CPU µs/txn |")
    print("|---|---|---|---|---|")
    for protocol, name, r in rows:
        print(f"| {protocol} | {name} | {r.tps:,.0f} | {r.p99:.2f} | {r.cpu_us_per_txn:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
