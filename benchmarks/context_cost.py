"""What the injected context costs Postgres, statement by statement (issue 16, lever 3).

``python -m benchmarks.context_cost [--rounds 3] [--transactions 20000] [--clients 8]``

A scratch cluster with pgtenant's ``init`` (login role, its defaults, a tenant role) and
pgbench's tables; then ``pgbench -S``-like scripts sent **direct to Postgres** as pgtenant's
login role, each a single simple Query like the one pgtenant sends: the bare query, the
application's one-packet baseline (``BEGIN; SET LOCAL app.tenant_id ...; query; COMMIT``),
pgtenant's full prefix (the bytes ``Injection.q_prefix`` holds, checked), the prefix minus
each statement in turn, and other encodings of the same values.

Rounds are interleaved (every variant once per round, the order rotated each round) and
each variant reports the range over rounds of: tps, and Postgres CPU per transaction
(user + system of the postmaster and all its children, the exited backends included through
the postmaster's ``cutime``/``cstime``: pgbench's own CPU is not counted). CPU time, unlike
tps, does not depend much on what else the shared machine runs. The derived cost of a
statement is the full prefix's CPU minus the variant's without it (medians).

The login role gets SELECT on ``pgbench_accounts`` in this scratch database only, so that
the variants without ``SET LOCAL ROLE`` can run the query at all (and USAGE on ``public``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgtenant.control.cluster import PostgresCluster
from pgtenant.identity.context import (
    TenantContext,
    TenantIdentity,
    build_context,
    quote_literal,
)
from pgtenant.protocol.inject import Injection

from .fixture import PROXY_PASSWORD, PROXY_ROLE, TENANT_TYPES, build_database, pgbench_init
from .measure import Load, run_loads

__all__ = ["main", "variants"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
QUERY = "SELECT abalance FROM public.pgbench_accounts WHERE aid = :aid"
_HEAD = "\\set aid random(1, 100000)\n"
AMPLIFY = 20


def _set(name: str, value: str) -> str:
    return f"SET LOCAL {name} = {quote_literal(value)}"


def _set_config(pairs: Sequence[tuple[str, str]]) -> str:
    return "SELECT " + ", ".join(
        f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(v)}, true)" for n, v in pairs)


def variants(context: TenantContext, signature: str) -> dict[str, list[str]]:
    """Returns: variant name -> the statements of its one Query (the query last)."""
    ident = context.identity
    entity = str(ident.entity_id) if ident.entity_id else ""
    named = {
        "tenant_id": _set("app.tenant_id", str(ident.org_id)),
        "tenant_type": _set("app.tenant_type", ident.tenant_type),
        "entity_id": _set("app.entity_id", entity),
        "tenant_sig": _set("app.tenant_sig", signature),
        "search_path": f"SET LOCAL search_path = {context.search_path_value}",
        "role": f"SET LOCAL ROLE {quote_literal(context.role)}",
    }
    full = list(named.values())
    out: dict[str, list[str]] = {
        "bare query": [QUERY],
        "app: BEGIN; SET LOCAL app.tenant_id; q; COMMIT": [
            "BEGIN", named["tenant_id"], QUERY, "COMMIT"],
        "pgtenant: six SET LOCAL; q": [*full, QUERY],
    }
    for name in named:
        out[f"  minus {name}"] = [s for k, s in named.items() if k != name] + [QUERY]
    out["  minus entity_id and tenant_sig"] = [
        s for k, s in named.items() if k not in ("entity_id", "tenant_sig")] + [QUERY]
    values = [("app.tenant_id", str(ident.org_id)), ("app.tenant_type", ident.tenant_type),
              ("app.entity_id", entity), ("app.tenant_sig", signature),
              ("search_path", context.search_path_value), ("role", context.role)]
    out["one SELECT set_config(x6); q"] = [_set_config(values), QUERY]
    out["one SELECT set_config(x4 app.*) + SET path, ROLE; q"] = [
        _set_config(values[:4]), named["search_path"], named["role"], QUERY]
    # One statement repeated: its own cost, AMPLIFY times over the machine's noise.
    for name, statement in named.items():
        out[f"{AMPLIFY} x {name}; q"] = [statement] * AMPLIFY + [QUERY]
    return out


def _script(statements: Sequence[str]) -> str:
    return _HEAD + "\\; ".join(statements) + ";\n"


def _stat_cpu(pid: int, *, children: bool) -> tuple[float, float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # exited between the listing and the read
        return 0.0, 0.0
    user, system = int(fields[11]), int(fields[12])
    if children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / _CLK_TCK, system / _CLK_TCK


def postgres_cpu(postmaster: int) -> tuple[float, float]:
    """Returns: user and system CPU seconds used so far by the postmaster, its live children
    and (through cutime/cstime) the children it has reaped."""
    user, system = _stat_cpu(postmaster, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == postmaster:
            child_user, child_system = _stat_cpu(int(entry), children=False)
            user, system = user + child_user, system + child_system
    return user, system


@dataclass
class Figures:
    tps: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)  # Postgres user CPU per transaction
    sys_us: list[float] = field(default_factory=list)


def _range(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


async def _prepare(cluster: PostgresCluster) -> tuple[TenantContext, str]:
    db = await build_database(cluster, 1, 10, 0)
    pgbench_init(cluster, db)
    cluster.psql(f"GRANT USAGE ON SCHEMA public TO {PROXY_ROLE}; "
                 f"GRANT SELECT ON pgbench_accounts TO {PROXY_ROLE}", dbname=db.name)
    tenant = db.tenants["filtered"][0]
    identity = TenantIdentity(org_id=tenant.org_id, slug=tenant.slug, tenant_type="flt",
                              token_id=uuid.uuid4())
    return build_context(identity, TENANT_TYPES["flt"]), db.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_cost")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transactions", type=int, default=40000, help="per variant and round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the variants whose name contains TEXT (repeatable; "
                             "the bare query and the full prefix always run)")
    args = parser.parse_args(argv)
    cluster = PostgresCluster()  # a fresh directory the server's user may enter
    cluster.start()
    try:
        context, dbname = asyncio.run(_prepare(cluster))
        key = secrets.token_bytes(32)
        injection = Injection(context, key)
        table = variants(context, injection.signature)
        full = "; ".join(table["pgtenant: six SET LOCAL; q"][:-1]) + ";"
        assert injection.q_prefix.decode() == full, (injection.q_prefix, full)
        pgbench = cluster.tool("pgbench")
        assert pgbench is not None
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        always = ("bare query", "pgtenant: six SET LOCAL; q")
        names = [n for n in table if n in always or not args.only
                 or any(text in n for text in args.only)]
        results = {name: Figures() for name in names}
        per_client = max(1, args.transactions // args.clients)
        for round_no in range(args.rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                load = Load(name, cluster.port, dbname, PROXY_ROLE, PROXY_PASSWORD,
                            args.clients, script=_script(table[name]))
                user0, sys0 = postgres_cpu(postmaster)
                result = run_loads(pgbench, [load], 0, None, transactions=per_client)
                user1, sys1 = postgres_cpu(postmaster)
                fig = results[name]
                fig.tps.append(result.tps)
                fig.user_us.append((user1 - user0) / result.transactions * 1e6)
                fig.sys_us.append((sys1 - sys0) / result.transactions * 1e6)
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        cluster.destroy()
    full_user = statistics.median(results["pgtenant: six SET LOCAL; q"].user_us)
    print(f"{args.rounds} interleaved rounds, {per_client * args.clients} transactions per "
          f"variant and round, pgbench -c {args.clients} -j 2 -M simple, direct to Postgres")
    print("| variant | tps (range) | Postgres user µs/txn (range) | system µs/txn (range) "
          "| user µs vs full prefix (medians) |")
    print("|---|---|---|---|---|")
    for name in names:
        fig = results[name]
        delta = statistics.median(fig.user_us) - full_user
        print(f"| {name.strip()} | {_range(fig.tps, '.0f')} | {_range(fig.user_us, '.1f')} "
              f"| {_range(fig.sys_us, '.1f')} | {delta:+.1f} |")
    bare = results["bare query"]
    if not any(name.startswith(f"{AMPLIFY} x ") for name in names):
        return 0
    print(f"\nOne statement's own cost: (the {AMPLIFY}-fold variant - the bare query) / "
          f"{AMPLIFY}, user + system, from each round's pair (range) and medians")
    print("| statement | Postgres CPU µs per statement (range) | median |")
    print("|---|---|---|")
    for name in names:
        if not name.startswith(f"{AMPLIFY} x "):
            continue
        fig = results[name]
        each = [((u + y) - (bu + by)) / AMPLIFY for u, y, bu, by in
                zip(fig.user_us, fig.sys_us, bare.user_us, bare.sys_us, strict=True)]
        print(f"| {name.removeprefix(f'{AMPLIFY} x ').removesuffix('; q')} "
              f"| {_range(each, '.2f')} | {statistics.median(each):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
