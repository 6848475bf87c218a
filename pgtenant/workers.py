"""``pgtenant serve --workers N`` (issue #5): N processes on one port with SO_REUSEPORT.

The kernel spreads new client connections over the workers' listening sockets; each worker
is a whole proxy (its own pools, clients and admin console). A supervisor process starts
them, forwards SIGTERM/SIGINT/SIGHUP, restarts a worker that dies, and serves the
operator's HTTP endpoint with every worker's metrics summed.

Workers and the supervisor talk over Unix sockets in a private directory (mode 0700), one
per worker, with one-line requests:

- ``metrics``: the worker's Prometheus exposition text;
- ``ready``: the reasons it is not ready (empty: ready);
- ``cancel <pid> <secret>``: a CancelRequest that reached another worker. Cancel keys carry
  their worker (``pid % N``), so whichever worker the kernel hands a CancelRequest to can
  pass it to the one serving that client, as PgBouncer's peering does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from .config import Config
from .configfile import parse_listen

__all__ = ["ControlServer", "WorkerInfo", "ask_worker", "merge_expositions", "run_supervisor"]

log = logging.getLogger("pgtenant.workers")
_RESTART_DELAY = 1.0
_ASK_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """This process's place among the workers."""

    index: int
    count: int
    rundir: Path

    def socket(self, index: int) -> Path:
        return control_socket(self.rundir, index)


def control_socket(rundir: Path, index: int) -> Path:
    return rundir / f"worker-{index}.sock"


async def ask_worker(path: Path, request: str) -> bytes:
    """Returns: a worker's whole answer to one request line.
    Raises: OSError / TimeoutError when the worker does not answer."""
    async with asyncio.timeout(_ASK_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(request.encode() + b"\n")
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()


class ControlServer:
    """A worker's end of the control socket."""

    def __init__(self, path: Path, *, metrics: Callable[[], bytes],
                 readiness: Callable[[], list[str]], cancel: Callable[[int, int], None]):
        self.path = path
        self.metrics = metrics
        self.readiness = readiness
        self.cancel = cancel
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), _ASK_TIMEOUT)).decode().split()
            if line == ["metrics"]:
                writer.write(self.metrics())
            elif line == ["ready"]:
                writer.write("\n".join(self.readiness()).encode())
            elif len(line) == 3 and line[0] == "cancel":
                self.cancel(int(line[1]), int(line[2]))
            await writer.drain()
        except (ValueError, TimeoutError, ConnectionError):
            pass  # a malformed or slow request: just close
        finally:
            writer.close()


# ----------------------------------------------------------------------------- metrics


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Sum the workers' expositions into one: counters, gauges and histogram series add up
    (connections, transactions, CPU seconds, memory); start time is the earliest, limits
    the largest.

    Returns: Prometheus text exposition.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(family.name,
                                                (family.type, family.documentation, {}))
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif s.name.endswith("start_time_seconds"):
                    samples[key] = min(samples[key], s.value)
                elif s.name.endswith("max_fds"):
                    samples[key] = max(samples[key], s.value)
                else:
                    samples[key] += s.value
    out = []
    for name, (kind, doc, samples) in families.items():
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        for (sample, labels), value in samples.items():
            out.append(f"{sample}{_labels(dict(labels))} {value!r}")
    return ("\n".join(out) + "\n").encode()


# ----------------------------------------------------------------------------- supervisor


def run_supervisor(config: Config, config_path: str, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT (forwarded); SIGHUP reloads them all.

    Returns: the process exit code.
    """
    return uvloop.run(_supervise(config, config_path, count))


async def _supervise(config: Config, config_path: str, count: int) -> int:
    from .http import HttpEndpoint

    rundir = Path(tempfile.mkdtemp(prefix="pgtenant-workers-"))
    os.chmod(rundir, 0o700)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def spawn(index: int) -> None:
        procs[index] = subprocess.Popen(
            [sys.executable, "-m", "pgtenant", "serve", "--config", config_path,
             "--worker", f"{index}/{count}", "--rundir", str(rundir)])

    def forward(sig: int) -> None:
        if sig != signal.SIGHUP:
            stopping.set()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    for index in range(count):
        spawn(index)

    async def metrics() -> bytes:
        texts = []
        for index in range(count):
            try:
                texts.append((await ask_worker(control_socket(rundir, index), "metrics"))
                             .decode())
            except (OSError, TimeoutError):
                pass  # a worker restarting: its series are missing from this scrape
        return merge_expositions(texts)

    async def readiness() -> list[str]:
        reasons = []
        for index in range(count):
            try:
                answer = await ask_worker(control_socket(rundir, index), "ready")
            except (OSError, TimeoutError):
                reasons.append(f"worker {index} is not answering")
                continue
            reasons += [f"worker {index}: {r}" for r in answer.decode().splitlines() if r]
        return reasons

    http: HttpEndpoint | None = None
    if config.metrics.listen is not None:
        host, port = parse_listen(config.metrics.listen, "metrics.listen")
        http = HttpEndpoint(metrics, readiness)
        await http.start(host, port)
    # Announce once every worker answers on its control socket (it is listening by then).
    deadline = time.monotonic() + 60
    pending = set(range(count))
    while pending and time.monotonic() < deadline and not stopping.is_set():
        for index in list(pending):
            if procs[index].poll() is not None:
                log.error("worker %d exited with %s during start", index, procs[index].returncode)
                forward(signal.SIGTERM)
                break
            try:
                await ask_worker(control_socket(rundir, index), "ready")
                pending.discard(index)
            except (OSError, TimeoutError):
                pass
        await asyncio.sleep(0.05)
    if not pending:
        host, port = config.listen
        log.info("pgtenant: %d workers listening on %s:%d", count, host, port)
    while not stopping.is_set():
        for index, proc in list(procs.items()):
            if proc.poll() is not None and not stopping.is_set():
                log.error("worker %d (pid %d) exited with %s; restarting it", index, proc.pid,
                          proc.returncode)
                await asyncio.sleep(_RESTART_DELAY)
                if not stopping.is_set():
                    spawn(index)
        try:
            await asyncio.wait_for(stopping.wait(), 0.2)
        except TimeoutError:
            pass
    codes = [await loop.run_in_executor(None, proc.wait) for proc in procs.values()]
    if http is not None:
        await http.close()
    _remove_rundir(rundir)
    log.info("pgtenant: all workers stopped (exit codes %s)", codes)
    return 0 if all(code == 0 for code in codes) else 1


def _remove_rundir(rundir: Path) -> None:
    shutil.rmtree(rundir, ignore_errors=True)
