"""``pgtenant demo`` as a newcomer runs it: every line it prints works, Ctrl-C leaves no secret.

Runs the real command in a subprocess (its own throwaway cluster), pastes what it printed,
then interrupts it as a terminal would.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from .conftest import ROOT, free_port

__all__: list[str] = []


def _conninfo(printed: str) -> str:
    """Returns: the libpq conninfo of a printed ``psql "..." [-c ...]`` line."""
    return shlex.split(printed)[1]


@pytest.mark.timeout(180)
def test_demo_prints_lines_that_work_and_ctrl_c_deletes_its_secrets(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    port = free_port()
    log = (tmp_path / "demo.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--dir", str(workdir), "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        text = ""
        while "listening on" not in text:
            assert proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
            text = (tmp_path / "demo.log").read_text()
        lines = [line.strip() for line in text.splitlines()]

        insert = next(line for line in lines if "INSERT INTO campaigns (name, budget)" in line)
        with psycopg.connect(_conninfo(insert), autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO campaigns (name, budget) VALUES ('x', 1) RETURNING org_id"
            ).fetchone()
            assert row is not None and row[0] is not None

        admin = next(line for line in lines if "user=admin" in line)
        assert "SHOW POOLS" in admin
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            cur = conn.execute("SHOW POOLS")
            assert cur.description is not None and cur.description[0].name == "database"

        metrics = next(line for line in lines if line.startswith("Metrics:"))
        url = re.search(r"http://\S+/metrics", metrics)
        assert url, metrics
        with urllib.request.urlopen(url.group(0), timeout=10) as answer:
            assert b"pgtenant_client_connections" in answer.read()

        assert (workdir / "tokens.json").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not workdir.exists()
        assert "deleted the demo cluster" in (tmp_path / "demo.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_make_demo_installs_without_test_tools_and_takes_a_port() -> None:
    out = subprocess.run(
        ["make", "-n", "-B", "demo", "PORT=7432"], cwd=ROOT, capture_output=True, text=True,
        timeout=30, check=True,
    ).stdout
    assert "-m proxy demo --port 7432" in out
    installs = [line for line in out.splitlines() if "pip install" in line]
    assert installs and not any(".[test]" in line for line in installs), installs
    assert not any("--quiet" in line for line in installs if "-e" in line), installs
