"""What the benchmark connects to: Postgres directly, PgBouncer, pgtenant, a bare splice.

Each endpoint is a real process on its own port; ``pid`` is the process whose CPU time and
memory the report charges to it (None for direct Postgres).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pgtenant.control.cluster import PostgresCluster

from .fixture import (
    APP_PASSWORD,
    APP_ROLE,
    CONTROL_PASSWORD,
    CONTROL_ROLE,
    PROXY_PASSWORD,
    PROXY_ROLE,
    TENANT_TYPES,
)

__all__ = ["Endpoint", "PgBouncer", "Pgtenant", "Splice", "find_pgbouncer", "free_port"]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


class Endpoint:
    """A place pgbench can connect to."""

    name = "direct"

    def __init__(self, port: int):
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def find_pgbouncer() -> str | None:
    """Returns: the pgbouncer binary, installing the OS package once when it is missing."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "pgbouncer"], capture_output=True,
                       check=False)
        found = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    return found


class PgBouncer(Endpoint):
    """PgBouncer in transaction mode in front of every ``bench_*`` database."""

    name = "pgbouncer"

    def __init__(self, binary: str, cluster: PostgresCluster, databases: list[str],
                 workdir: Path, pool_size: int, max_clients: int = 12000):
        super().__init__(free_port())
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "pgbouncer.log"
        dbs = "\n".join(f"{d} = host=127.0.0.1 port={cluster.port} dbname={d}"
                        for d in databases)
        (workdir / "userlist.txt").write_text(f'"{APP_ROLE}" "{APP_PASSWORD}"\n')
        ini = workdir / "pgbouncer.ini"
        ini.write_text(f"""[databases]
{dbs}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
auth_type = plain
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_clients}
max_db_connections = {pool_size}
logfile = {self.log}
pidfile = {workdir / "pgbouncer.pid"}
unix_socket_dir =
ignore_startup_parameters = extra_float_digits,options
""")
        argv = [binary, str(ini)]
        if os.geteuid() == 0:
            # PgBouncer refuses root: -u makes it switch to the Postgres OS user itself
            # (runuser would reset the file-descriptor limit through PAM).
            user = "postgres"
            pw = pwd.getpwnam(user)
            os.chmod(workdir, 0o755)
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            argv = [binary, "-u", user, str(ini)]
        with (workdir / "pgbouncer.out").open("wb") as out:
            # File descriptors: inherited from the benchmark, which raised its soft limit.
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=workdir)
        _wait_port(self.port, self.proc, self.log)



class Pgtenant(Endpoint):
    """pgtenant serving one ``bench_<n>`` database."""

    name = "pgtenant"

    def __init__(self, cluster: PostgresCluster, database: str, workdir: Path, pool_size: int,
                 extra: str = "", routes: dict[str, str] | None = None,
                 module: str = "pgtenant", env: dict[str, str] | None = None,
                 startup_timeout: float = 30, checkout: Path = ROOT):
        """``routes``: more [databases.<name>] (name -> Postgres database) for tenants
        routed to a database of their own; ``database`` then holds the control schema.
        ``module``/``env``: what runs ``serve`` (idle_memory.py runs it under tracemalloc).
        ``checkout``: the pgtenant checkout whose ``.venv`` runs it (goals.py compares a
        baseline checkout with this one in the same run)."""
        super().__init__(free_port())
        self.checkout = checkout
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / f"pgtenant-{database}-{self.port}.toml"
        def dsn(dbname: str) -> str:
            return f"postgresql://{PROXY_ROLE}:{PROXY_PASSWORD}@127.0.0.1:{cluster.port}/{dbname}"

        more = "".join(f'\n[databases.{name}]\ndsn = "{dsn(dbname)}"\npool_size = 2\n'
                       for name, dbname in (routes or {}).items())
        # The registry lives in ``database``; every database's key is read as the control
        # role at that database's address.
        control = f"postgresql://{CONTROL_ROLE}:{CONTROL_PASSWORD}@127.0.0.1:{cluster.port}"
        more += f'\n[control]\ndsn = "{control}/{database}"\n'
        types = "\n".join(
            f'[tenant_types.{n}]\nrole = "{t.role}"\n'
            f'search_path = [{", ".join(json.dumps(p) for p in t.search_path)}]\n'
            for n, t in TENANT_TYPES.items())
        config.write_text(f"""listen = "127.0.0.1:{self.port}"
max_client_conn = 12000
log_level = "warning"
{extra}

[databases.{database}]
dsn = "{dsn(database)}"
pool_size = {pool_size}
{more}
{types}
""")
        self.log = workdir / f"pgtenant-{self.port}.log"
        with self.log.open("wb") as out:
            python = (sys.executable if checkout == ROOT
                      else str(checkout / ".venv" / "bin" / "python"))
            self.proc = subprocess.Popen(
                [python, "-m", module, "serve", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=checkout,
                env={**os.environ, **(env or {})})
        _wait_port(self.port, self.proc, self.log, startup_timeout)


class Splice(Endpoint):
    """A bare uvloop TCP splice: the floor for any Python proxy (no parsing, no pooling)."""

    name = "splice"

    def __init__(self, cluster: PostgresCluster, workdir: Path):
        super().__init__(free_port())
        self.log = workdir / f"splice-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.splice", str(self.port),
                 str(cluster.port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _wait_port(self.port, self.proc, self.log)
