"""A real pgtenant process per test (or per module), on a free port, with its own config and log.

Teardown stops *that* PID and checks the log's invariants: no traceback, no internal error,
no "Task exception was never retrieved" (pgbouncer's test suite does the same).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from pgtenant.control.demo import DemoEnv

__all__ = ["ProxyProcess", "connect", "free_port"]

ROOT = Path(__file__).resolve().parents[2]
_FORBIDDEN_IN_LOG = ("Traceback", "internal error", "Task exception was never retrieved",
                     "Exception in callback")


async def connect(proxy: ProxyProcess, slug: str) -> asyncpg.Connection:
    """Returns: an asyncpg connection as tenant ``slug`` through ``proxy``, with no
    statement cache (one protocol thing at a time)."""
    return await asyncpg.connect(proxy.dsn(slug), statement_cache_size=0, timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyProcess:
    """``python -m pgtenant serve`` as a subprocess."""

    def __init__(self, env: DemoEnv, workdir: Path, *, pool_size: int = 4, extra: str = "",
                 transform: Callable[[str], str] | None = None, args: tuple[str, ...] = (),
                 ready_line: str = "listening on"):
        self.env = env
        self.port = free_port()
        self.config_path = workdir / f"pgtenant-{self.port}.toml"
        if "shutdown_timeout" not in extra:  # teardown's SIGTERM must not wait 30 s
            extra = "shutdown_timeout = 3.0\n" + extra
        text = env.config_toml(self.port, pool_size=pool_size, extra=extra)
        self.config_path.write_text(transform(text) if transform else text)
        self.log_path = workdir / f"pgtenant-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgtenant", "serve", "--config", str(self.config_path), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._wait_ready(ready_line)

    def _wait_ready(self, ready_line: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgtenant exited with {self.proc.returncode}:\n{self.log()}")
            if ready_line in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"pgtenant did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dsn(self, slug: str, *, token: str | None = None, user: str | None = None,
            dbname: str = "app") -> str:
        """Returns: a libpq URL that logs in as tenant ``slug`` through the proxy."""
        tok = token if token is not None else self.env.tenants[slug].token
        return f"postgresql://{user or slug}:{tok}@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, slug: str, *, token: str | None = None) -> dict[str, str]:
        tok = token if token is not None else self.env.tenants[slug].token
        return {"host": "127.0.0.1", "port": str(self.port), "dbname": "app", "user": slug,
                "password": tok}

    def stop(self) -> str:
        """Stop the process; returns its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.log()

    def check_invariants(self, log: str) -> None:
        bad = [word for word in _FORBIDDEN_IN_LOG if word in log]
        assert not bad, f"pgtenant log has {bad}:\n{log[-6000:]}"


@pytest.fixture
def start_proxy(demo_env: DemoEnv, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: start a proxy with custom pool_size/extra config; all stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(*, pool_size: int = 4, extra: str = "",
              transform: Callable[[str], str] | None = None, args: tuple[str, ...] = (),
              ready_line: str = "listening on") -> ProxyProcess:
        proxy = ProxyProcess(demo_env, tmp_path, pool_size=pool_size, extra=extra,
                             transform=transform, args=args, ready_line=ready_line)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.check_invariants(proxy.stop())


@pytest.fixture(scope="module")
def solo(demo_env: DemoEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy with ONE server, for the module: attacker and victim transactions share the
    same backend.

    Module-scoped to keep a module fast; every test leaves the server idle and clean (or
    retired), which the victim checks of the next test verify again. A module that needs
    more of it (test_temp_tables: metrics) defines its own ``solo``.
    """
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("solo"), pool_size=1,
                        extra="auth_failure_delay = 0.0")
    yield proc
    proc.check_invariants(proc.stop())


@pytest.fixture(scope="module")
def proxy(demo_env: DemoEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One shared proxy (pool_size 4) for a module of tests that do not reconfigure it."""
    proc = ProxyProcess(demo_env, tmp_path_factory.mktemp("proxy"), pool_size=4,
                        extra="token_cache_ttl = 0.2\nauth_failure_delay = 0.0")
    yield proc
    proc.check_invariants(proc.stop())
