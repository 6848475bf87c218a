"""The benchmark report: Markdown tables, JSON and PNG charts in ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "write_report"]

# The targets: (ratio key, comparison, bound, what it means). Issue 16's table
# (``python -m benchmarks.goals`` measures just these, quicker), and issue #6's round trips.
TARGETS = (
    ("select_only_c16_pgtenant_vs_pgbouncer", ">=", 0.8,
     "pgbench -S -c 16 through pgtenant vs PgBouncer"),
    ("tenant_scoped_filtered_read_pgtenant_vs_pgbouncer_one_packet", ">=", 1.0,
     "tenant-scoped read vs PgBouncer + SET LOCAL in one packet"),
    ("select_only_c16_extended_pgtenant_vs_pgbouncer", ">=", 0.7,
     "pgbench -S -M extended -c 16 through pgtenant vs PgBouncer"),
    ("clients_1000_vs_50", ">=", 0.85, "1,000 clients vs 50 through pgtenant (pool of 20)"),
    ("cpu_per_txn_pgtenant_vs_pgbouncer", "<=", 1.4,
     "proxy CPU per transaction vs PgBouncer's"),
    ("tenant_scoped_filtered_read_pgtenant_vs_pgbouncer_round_trips", ">=", 1.5,
     "tenant-scoped transactions vs the SET LOCAL round-trip baseline"),
)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    exp = results["experiments"]
    parts = [
        f"## Benchmark results ({results['mode']} run, {results['finished_at']})",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}; {results['postgres']}; "
        f"{results['pgbouncer'] or 'PgBouncer: skipped'}. Everything ran on this one "
        f"machine (clients, proxies and Postgres share the CPUs), {results['seconds_per_run']}"
        f" s per run, {results['rounds']} interleaved round(s), median round kept. "
        f"Total {results['total_seconds']} s.",
        "",
        "### pgbench -S (select-only), tps",
        "",
        "Simple protocol unless the row says `-M extended` (unnamed statements, what most "
        "drivers send) or `-M prepared` (named statements; PgBouncer 1.18 has no prepared "
        "statements in transaction mode).",
        "",
    ]
    so = exp.get("select_only", {})
    names = ["direct", "pgbouncer", "pgtenant", "splice"]
    rows = []
    for clients, res in so.items():
        rows.append([clients.replace(" ", " -M ")]
                    + [_fmt(res[n]["tps"]) if n in res else "-" for n in names]
                    + [_fmt(res["pgtenant"]["p99_ms"]),
                       _fmt(res["pgtenant"]["cpu_us_per_txn"]),
                       _fmt(res["pgbouncer"]["cpu_us_per_txn"]) if "pgbouncer" in res else "-"])
    parts.append(_table(["clients", "direct", "PgBouncer", "pgtenant", "bare splice",
                         "pgtenant p99 ms", "pgtenant CPU µs/txn", "PgBouncer CPU µs/txn"],
                        rows))
    parts += ["", "### Tenant-scoped transactions (16 clients over 4 tenants), tps", ""]
    rows = []
    for key, res in exp.get("tenant_scoped", {}).items():
        rows.append([key.replace("_", " ")] + [
            f"{_fmt(res[n]['tps'])} (p99 {_fmt(res[n]['p99_ms'])} ms)" if n in res else "-"
            for n in ("pgtenant", "pgbouncer_round_trips", "pgbouncer_one_packet")])
    parts.append(_table(["layout, workload", "pgtenant (context injected)",
                         "PgBouncer + SET LOCAL, round trips", "PgBouncer + SET LOCAL, "
                         "one packet"], rows))
    parts += ["", "### Layouts through pgtenant (4 active tenants, one 100x the median), "
                  "tps (p99 ms)", ""]
    rows = []
    for key, res in exp.get("layouts", {}).items():
        count, workload = key.split("_", 1)
        rows.append([count, workload] + [
            f"{_fmt(res[n]['tps'])} ({_fmt(res[n]['p99_ms'])})" if n in res else "-"
            for n in ("filtered", "routed", "by_type", "db_per_tenant")])
    parts.append(_table(["tenants", "workload", "filtered (RLS)", "routed (schema)",
                         "by type (view + router)", "database per tenant"], rows))
    noisy = exp.get("noisy_neighbour")
    if noisy:
        parts += ["", "### Noisy neighbour (pool of 4; tenant 0 runs 12 clients)", ""]
        parts.append(_table(["tenant", "clients", "transactions", "p50 ms", "p99 ms"], [
            [k, v["clients"], v["transactions"], _fmt(v["p50_ms"]), _fmt(v["p99_ms"])]
            for k, v in noisy.items()]))
    many = exp.get("many_clients")
    if many:
        parts += ["", "### Many clients through pgtenant (pool of 20), select-only", ""]
        parts.append(_table(["clients", "tps", "p50 ms", "p99 ms"], [
            [k, _fmt(v["tps"]), _fmt(v["p50_ms"]), _fmt(v["p99_ms"])]
            for k, v in many.items()]))
    idle = exp.get("idle_memory")
    if idle:
        parts += ["", "### Memory per idle client (resident, bytes)", ""]
        parts.append(_table(["idle clients", "pgtenant", "PgBouncer"], [
            [k, _fmt(float(v["pgtenant_bytes"])), _fmt(float(v.get("pgbouncer_bytes", 0)))
             if "pgbouncer_bytes" in v else "-"] for k, v in idle.items()]))
    parts += ["", "### Ratios and targets", ""]
    ratios = results["ratios"]
    rows = []
    for key, op, bound, what in TARGETS:
        value = ratios.get(key)
        ok = "-" if value is None else ("met" if (value >= bound if op == ">=" else
                                                   value <= bound) else "**not met**")
        rows.append([what, _fmt(value) if value is not None else "-", f"{op} {bound}", ok])
    parts.append(_table(["target", "measured", "goal", ""], rows))
    parts += ["", _table(["ratio", "value"], [[k, v] for k, v in ratios.items()]), ""]
    return "\n".join(parts)


def _bars(plt: Any, path: Path, title: str, groups: dict[str, dict[str, Any]],
          names: list[str]) -> None:
    """One bar per name (tps; 0 when missing) in each group, groups side by side."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(groups))],
               [res[name]["tps"] if name in res else 0 for res in groups.values()], width,
               label=name.replace("_", " "))
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))], list(groups))
    ax.set_ylabel("tps")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clients_label(key: str) -> str:
    """"16" -> "16 clients"; "16 extended" -> "16 clients" over "-M extended"."""
    clients, _, protocol = key.partition(" ")
    return f"{clients} clients" + (f"\n-M {protocol}" if protocol else "")


def charts(results: dict[str, Any], out: Path) -> list[str]:
    """Returns: the PNG files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    exp = results["experiments"]
    so = exp.get("select_only")
    if so:
        names = [n for n in ("direct", "pgbouncer", "pgtenant", "splice")
                 if n in next(iter(so.values()))]
        _bars(plt, out / "select_only.png", "pgbench -S",
              {_clients_label(c): res for c, res in so.items()}, names)
        written.append("select_only.png")
    ts = exp.get("tenant_scoped")
    if ts:
        _bars(plt, out / "tenant_scoped.png", "Tenant-scoped transactions",
              {k.replace("_", " "): res for k, res in ts.items()},
              ["pgtenant", "pgbouncer_round_trips", "pgbouncer_one_packet"])
        written.append("tenant_scoped.png")
    lay = exp.get("layouts")
    if lay:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layout in ("filtered", "routed", "by_type"):
            keys = [k for k in lay if k.endswith("_read")]
            ax.plot([int(k.split("_")[0]) for k in keys], [lay[k][layout]["tps"] for k in keys],
                    marker="o", label=layout)
        ax.set_xscale("log")
        ax.set_xlabel("tenants")
        ax.set_ylabel("tps (read-mostly)")
        ax.set_title("Routed vs filtered tenancy through pgtenant")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "layouts.png", dpi=100)
        plt.close(fig)
        written.append("layouts.png")
    return written


def write_report(results: dict[str, Any], out: Path) -> str:
    """Write latest.md, latest.json and the charts into ``out``. Returns: the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    results["charts"] = charts(results, out)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(text + "\n")
    return text
