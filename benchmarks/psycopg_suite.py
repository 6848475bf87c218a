"""Run psycopg 3's own test suite through pgtenant (and, with ``--direct``, straight at
Postgres for the baseline).

``python -m benchmarks.psycopg_suite --psycopg PATH`` takes a psycopg checkout (default:
``$PGTENANT_PSYCOPG_SRC``; e.g. ``git clone https://github.com/psycopg/psycopg``). Without
one it prints one "skipped" line and exits 0. Otherwise it starts a scratch cluster, installs
pgtenant into a scratch database with one tenant type whose static role may CREATE in
``public``, in a schema of its own and in the database (schemas; TEMP comes from init, as
for any type with ``temp_tables`` on) (the suite creates schemas, tables, types, functions,
temp tables), makes one tenant and a token, starts
``pgtenant serve`` on a free port and runs

    python -m pytest PSYCOPG/tests -m "not slow and not timing and not flakey"
        --ignore=PSYCOPG/tests/pool --ignore=PSYCOPG/tests/crdb -q -rfE ...

with ``PSYCOPG_IMPL=python`` and ``PSYCOPG_TEST_DSN`` pointing at the proxy (the token as
password), psycopg's sources first on ``PYTHONPATH``. psycopg's test dependencies (pytest,
anyio; pproxy for its proxy tests) must be importable by this interpreter (e.g.
``pip install --target DIR anyio pproxy`` and ``PYTHONPATH=DIR``); when they are not, it
says which and exits 0. The junit XML is
summarised (passed, failed, errors, skipped, failures grouped by the first line of their
message) and stored under the mode's key in ``benchmarks/results/psycopg_suite.json``.
``--limit-tests EXPR`` passes ``-k EXPR`` for quick runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from pgtenant.config import TenantTypeConfig
from pgtenant.control.cluster import PostgresCluster
from pgtenant.control.init import DEFAULT_CONTROL_ROLE, DEFAULT_PROXY_ROLE, init_database
from pgtenant.control.tenants import create_tenant, issue_token

__all__ = ["group_failures", "main", "parse_junit", "required_missing"]

DBNAME = "psycopg_suite"
SLUG = "psysuite"
TYPE_NAME = "suite"
ROLE = "tenant_psysuite"
SCHEMA = "psysuite"
REQUIRED = ("pytest", "anyio")  # psycopg's tests use anyio's pytest plugin
MARKERS = "not slow and not timing and not flakey"
TOP_GROUPS = 30
RESULTS = Path(__file__).parent / "results" / "psycopg_suite.json"


# ---------------------------------------------------------------- junit summary

def group_failures(messages: list[str], top: int = TOP_GROUPS) -> list[tuple[str, int]]:
    """Returns: the ``top`` most common first lines of ``messages`` with their counts."""
    firsts = [(m.strip().splitlines() or [""])[0].strip()[:200] for m in messages]
    return Counter(firsts).most_common(top)


def parse_junit(path: Path, top: int = TOP_GROUPS) -> dict[str, Any]:
    """Summarise a pytest junit XML file.

    Returns: {"tests", "passed", "failed", "errors", "skipped", "groups": [[first line of
    the failure or error message, count], ...], "failures": [test ids (first 200)]}.
    """
    root = ET.parse(path).getroot()
    counts = Counter[str]()
    messages: list[str] = []
    failed_ids: list[str] = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors"}.get(child.tag, child.tag)
                if child.tag != "skipped":
                    msg = child.get("message") or (child.text or "")
                    messages.append(f"[{child.tag}] {msg.strip()}" if msg.strip()
                                    else f"[{child.tag}]")
                    failed_ids.append(f"{case.get('classname', '')}::{case.get('name', '')}")
                break
        counts[outcome] += 1
    return {
        "tests": counts["tests"], "passed": counts["passed"], "failed": counts["failed"],
        "errors": counts["errors"], "skipped": counts["skipped"],
        "groups": [[m, n] for m, n in group_failures(messages, top)],
        "failures": failed_ids[:200],
    }


def print_summary(mode: str, summary: dict[str, Any]) -> None:
    """Print ``parse_junit``'s summary as a few lines."""
    print(f"psycopg suite via {mode}: {summary['tests']} tests, {summary['passed']} passed, "
          f"{summary['failed']} failed, {summary['errors']} errors, "
          f"{summary['skipped']} skipped ({summary.get('seconds', '?')} s)")
    for message, count in summary["groups"]:
        print(f"  {count:5d}  {message}")


# ---------------------------------------------------------------- environment

# pproxy (psycopg's proxy tests start it as a subprocess) uses uvloop when it can import it,
# and calls asyncio.get_event_loop() with no loop, which uvloop's raises: every proxy test
# would fail in this virtualenv, direct too. A module that refuses the import hides it
# (ModuleNotFoundError: the one pproxy catches).
_NO_UVLOOP = (
    "raise ModuleNotFoundError('hidden from psycopg\\'s suite: pproxy would pick it, and "
    "uvloop\\'s get_event_loop() raises where pproxy expects a new loop')\n")


def suite_env(psycopg: Path, dsn: str, shim: Path | None = None) -> dict[str, str]:
    """Returns: the environment for the suite: pure-Python psycopg from the checkout
    (and, with ``shim``, a directory whose uvloop.py hides uvloop: see _NO_UVLOOP)."""
    env = dict(os.environ)
    paths = [str(psycopg / "psycopg"), str(psycopg / "psycopg_pool"), str(psycopg)]
    if shim is not None:
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "uvloop.py").write_text(_NO_UVLOOP)
        paths.insert(0, str(shim))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PSYCOPG_IMPL="python",
               PSYCOPG_TEST_DSN=dsn)
    return env


def required_missing(env: dict[str, str] | None = None,
                     modules: tuple[str, ...] = REQUIRED) -> list[str]:
    """Returns: which of ``modules`` this interpreter cannot import with ``env``."""
    code = ("import importlib.util, sys\n"
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", code, *modules], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- setup

async def prepare(cluster: PostgresCluster) -> tuple[dict[str, str], str]:
    """Install pgtenant in the scratch database with one tenant with full rights there.

    Returns: (passwords {"proxy", "control"}, the tenant's token).
    """
    admin = cluster.admin_dsn(DBNAME)
    tenant_type = TenantTypeConfig(name=TYPE_NAME, role=ROLE, search_path=(SCHEMA, "public"))
    passwords = {"proxy": secrets.token_hex(16), "control": secrets.token_hex(16)}
    await init_database(admin, proxy_password=passwords["proxy"],
                        control_password=passwords["control"],
                        tenant_types={TYPE_NAME: tenant_type})
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"""
            CREATE SCHEMA {SCHEMA};
            GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO {ROLE};
            GRANT CREATE ON SCHEMA public TO {ROLE};
            GRANT CREATE ON DATABASE {DBNAME} TO {ROLE};  -- create schema testschema
        """)
    finally:
        await conn.close()
    await create_tenant(admin, slug=SLUG, tenant_type=tenant_type,
                        proxy_role=DEFAULT_PROXY_ROLE)
    _, token = await issue_token(admin, tenant_slug=SLUG, label="psycopg suite")
    return passwords, token


def config_toml(cluster: PostgresCluster, port: int, passwords: dict[str, str]) -> str:
    """Returns: the proxy config (see ``DemoEnv.config_toml`` for the shape)."""
    at = f"{cluster.host}:{cluster.port}/{DBNAME}"
    return f"""\
listen = "127.0.0.1:{port}"
lockdown_check = "warn"
any_user = ["*"]

[databases.{DBNAME}]
dsn = "postgresql://{DEFAULT_PROXY_ROLE}:{passwords['proxy']}@{at}"
pool_size = 4

[tenant_types.{TYPE_NAME}]
role = "{ROLE}"
search_path = ["{SCHEMA}", "public"]

[control]
dsn = "postgresql://{DEFAULT_CONTROL_ROLE}:{passwords['control']}@{at}"
"""


def start_proxy(config: Path, log: Path, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``pgtenant serve`` and wait for "listening on" in its log.

    Returns: the process.
    Raises: RuntimeError (with the log's tail) when it exits or does not listen in time.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgtenant", "serve",
                                 "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "listening on" in text:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_proxy(proc)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"pgtenant serve did not start:\n{tail}")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the proxy (kill after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the run

def pytest_argv(psycopg: Path, junit: Path, limit: str | None,
                timeout: int | None) -> list[str]:
    """Returns: the suite's command line."""
    tests = psycopg / "tests"
    argv = [sys.executable, "-m", "pytest", str(tests), "-m", MARKERS,
            f"--ignore={tests / 'pool'}", f"--ignore={tests / 'crdb'}",
            # psycopg's conftest needs the cache plugin: its cache goes to the temp dir.
            "-o", f"cache_dir={junit.parent / 'pytest_cache'}",
            "-p", "no:asyncio", "-p", "no:randomly",
            "-q", "-rfE", f"--junitxml={junit}"]
    if timeout:
        argv.append(f"--timeout={timeout}")
    if limit:
        argv += ["-k", limit]
    return argv


def run_suite(psycopg: Path, dsn: str, workdir: Path, args: argparse.Namespace,
              ) -> dict[str, Any]:
    """Run the suite against ``dsn``.

    Returns: ``parse_junit``'s summary plus the exit code, the seconds and the argv.
    """
    env = suite_env(psycopg, dsn, workdir / "shim")
    junit = workdir / "junit.xml"
    has_timeout = not required_missing(env, ("pytest_timeout",))
    argv = pytest_argv(psycopg, junit, args.limit_tests,
                       args.test_timeout if has_timeout else None)
    log = workdir / "pytest.log"
    t0 = time.perf_counter()
    with log.open("wb") as out:
        rc = subprocess.run(argv, cwd=psycopg, env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=args.max_seconds).returncode
    seconds = round(time.perf_counter() - t0, 1)
    if not junit.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"pytest wrote no junit XML (exit {rc}):\n{tail}")
    summary = parse_junit(junit)
    shown = " ".join(argv[1:]).replace(f"-o cache_dir={workdir / 'pytest_cache'} ", "")
    shown = shown.replace(f" --junitxml={junit}", "").replace(str(psycopg), "PSYCOPG")
    summary.update(exit_code=rc, seconds=seconds, command=f"python {shown}")
    if args.keep_log:
        Path(args.keep_log).write_bytes(log.read_bytes())
    return summary


def save(mode: str, summary: dict[str, Any], psycopg: Path, out: Path = RESULTS) -> None:
    """Store the summary under ``mode`` in ``out`` (other modes are kept)."""
    data: dict[str, Any] = {}
    if out.exists():
        try:
            loaded = json.loads(out.read_text())
            data = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            data = {}
    rev = subprocess.run(["git", "-C", str(psycopg), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    data[mode] = {"psycopg_rev": rev or None, **summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def run(psycopg: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cluster, pgtenant (unless ``--direct``), the suite; everything is torn down after.

    Returns: the summary.
    """
    cluster = PostgresCluster()
    proc: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="pgtenant-psycopg-") as tmp:
        workdir = Path(tmp)
        try:
            cluster.start()
            cluster.create_database(DBNAME)
            if args.direct:
                dsn = (f"host={cluster.host} port={cluster.port} dbname={DBNAME} "
                       "user=postgres")
            else:
                passwords, token = asyncio.run(prepare(cluster))
                port = _free_port()
                config = workdir / "pgtenant.toml"
                config.write_text(config_toml(cluster, port, passwords))
                proc = start_proxy(config, workdir / "pgtenant.log")
                dsn = (f"host=127.0.0.1 port={port} dbname={DBNAME} user={SLUG} "
                       f"password={token} sslmode=disable")
            return run_suite(psycopg, dsn, workdir, args)
        finally:
            if proc is not None:
                stop_proxy(proc)
                if args.keep_log:
                    proxy_log = Path(args.keep_log).with_suffix(".proxy.log")
                    proxy_log.write_bytes((workdir / "pgtenant.log").read_bytes())
            cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    """Parse the options, skip cleanly or run; print and store the summary.

    Returns: the exit code (0 also when skipped).
    """
    parser = argparse.ArgumentParser(
        description="Run psycopg 3's test suite through pgtenant (or directly).")
    parser.add_argument("--psycopg", default=os.environ.get("PGTENANT_PSYCOPG_SRC"),
                        help="a psycopg checkout (default: $PGTENANT_PSYCOPG_SRC)")
    parser.add_argument("--direct", action="store_true",
                        help="run the suite straight against Postgres (the baseline)")
    parser.add_argument("--limit-tests", metavar="EXPR", help="passed as pytest -k EXPR")
    parser.add_argument("--test-timeout", type=int, default=60,
                        help="per-test timeout in seconds (when pytest-timeout is there)")
    parser.add_argument("--max-seconds", type=float, default=3600,
                        help="give up on the whole suite after this long")
    parser.add_argument("--keep-log", metavar="FILE",
                        help="copy pytest's output to FILE (the proxy's to FILE.proxy.log)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="the results JSON (default: benchmarks/results/psycopg_suite.json)")
    args = parser.parse_args(argv)
    psycopg = Path(args.psycopg).resolve() if args.psycopg else None
    if psycopg is None or not (psycopg / "tests" / "conftest.py").is_file():
        print(f"psycopg sources not found: {args.psycopg or '$PGTENANT_PSYCOPG_SRC unset'} "
              "(skipped)")
        return 0
    missing = required_missing(suite_env(psycopg, ""))
    if missing:
        print(f"skipped: missing {', '.join(missing)} (psycopg's test dependencies; "
              "e.g. pip install --target DIR them and set PYTHONPATH=DIR)")
        return 0
    mode = "direct" if args.direct else "pgtenant"
    summary = run(psycopg, args)
    print_summary(mode, summary)
    save(mode, summary, psycopg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
