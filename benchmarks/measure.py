"""Measuring: pgbench runs (tps, per-transaction latencies), process CPU and memory.

Latencies come from pgbench's per-transaction log (``-l``), so percentiles are exact, not
estimated; CPU time from ``/proc/<pid>/stat``; memory from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Load", "Result", "cpu_seconds", "idle_clients_memory", "percentile", "rss_kib",
           "run_loads"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """Returns: user + system CPU seconds used so far by ``pid`` (0 when None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class Load:
    """One pgbench process: who connects where, running what."""

    label: str  # e.g. the tenant it runs as
    port: int
    database: str
    user: str
    password: str
    clients: int
    script: str | None = None  # None: built-in select-only (-S)
    defines: dict[str, str] = field(default_factory=dict)
    protocol: str = "simple"


@dataclass
class Result:
    tps: float
    transactions: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: float  # the endpoint process's CPU over the run
    per_load: dict[str, list[float]]  # label -> latencies (ms)

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies_ms, 95)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def cpu_us_per_txn(self) -> float:
        return self.cpu_s / self.transactions * 1e6 if self.transactions else float("nan")


def run_loads(pgbench: str, loads: Sequence[Load], seconds: float,
              cpu_pid: int | None, *, transactions: int | None = None) -> Result:
    """Run every load at once for ``seconds`` (or ``transactions`` per client); sum their
    throughput.

    Returns: the combined result (latencies of every transaction of every load).
    Raises: RuntimeError when a pgbench fails (its output is quoted).
    """
    with tempfile.TemporaryDirectory(prefix="pgtenant-bench-") as tmp:
        procs = []
        for i, load in enumerate(loads):
            duration = (["-t", str(transactions)] if transactions is not None
                        else ["-T", str(max(1, round(seconds)))])
            argv = [pgbench, "-n", *duration, "-c", str(load.clients),
                    "-j", str(min(load.clients, 2)), "-M", load.protocol,
                    "-h", "127.0.0.1", "-p", str(load.port), "-U", load.user,
                    "-l", "--log-prefix", f"{tmp}/log{i}"]
            if load.script is None:
                argv.append("-S")
            else:
                script = Path(tmp) / f"script{i}.sql"
                script.write_text(load.script)
                argv += ["-f", str(script)]
            for key, value in load.defines.items():
                argv += ["-D", f"{key}={value}"]
            argv.append(load.database)
            env = {**os.environ, "PGPASSWORD": load.password, "PGAPPNAME": "bench",
                   "PGCONNECT_TIMEOUT": "30"}
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env, cwd=tmp))
        cpu_before = cpu_seconds(cpu_pid)
        started = time.monotonic()
        outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(cpu_pid) - cpu_before
        tps = 0.0
        per_load: dict[str, list[float]] = {}
        for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
            match = re.search(r"tps = ([\d.]+) \(without initial", out)
            if proc.returncode != 0 or match is None or "aborted" in out.split("tps =")[0]:
                raise RuntimeError(f"pgbench failed ({loads[i].label}):\n{out[-2500:]}")
            tps += float(match.group(1))
            lat: list[float] = []
            for path in Path(tmp).glob(f"log{i}.*"):
                for line in path.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 3:
                        lat.append(int(parts[2]) / 1000.0)
            per_load.setdefault(loads[i].label, []).extend(lat)
    latencies = [v for values in per_load.values() for v in values]
    return Result(tps, len(latencies), elapsed, latencies, cpu, per_load)


# ----------------------------------------------------------------------------- idle memory


def _startup(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def _open_idle(port: int, user: str, password: str, database: str
                     ) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_startup(user, database))
    while True:
        kind = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(length - 4)
        if kind == b"R" and struct.unpack("!i", body[:4])[0] == 3:  # cleartext password
            pw = password.encode() + b"\0"
            writer.write(b"p" + struct.pack("!i", len(pw) + 4) + pw)
        elif kind == b"E":
            raise RuntimeError(f"login refused: {body!r}")
        elif kind == b"Z":
            return writer


async def _idle_memory(pid: int, port: int, user: str, password: str, database: str,
                       count: int) -> float:
    before = rss_kib(pid)
    sem = asyncio.Semaphore(100)

    async def one() -> asyncio.StreamWriter:
        async with sem:
            return await _open_idle(port, user, password, database)

    writers = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 300)
    await asyncio.sleep(0.5)
    after = rss_kib(pid)
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.5)
    return (after - before) * 1024 / count


def idle_clients_memory(pid: int, port: int, user: str, password: str, database: str,
                        count: int) -> float:
    """Returns: the endpoint's resident memory per idle, logged-in client, in bytes."""
    return asyncio.run(_idle_memory(pid, port, user, password, database, count))
