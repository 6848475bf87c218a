"""A private, throwaway PostgreSQL cluster for tests, benchmarks and the demo.

Owns finding the server binaries, initdb, the config overrides, pg_hba.conf, start and stop.
Works as root (CI containers) by running the server tools as the ``postgres`` OS user.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from . import ControlError

__all__ = ["PG_HBA", "PostgresCluster", "find_bindir"]

# Exactly what the proxy's security model assumes: the superuser may log in without a password
# only from this host (tests and `pgtenant init`), everybody else needs SCRAM.
PG_HBA = (
    "local all all trust\n"
    "host all postgres 127.0.0.1/32 trust\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)

# Our overrides live in their own file included from postgresql.conf, so a restart can rewrite
# them (e.g. a new port) without editing initdb's file twice.
_OVERRIDES_FILE = "pgtenant.conf"
_SERVER_USER = "postgres"
_FALLBACK_USER = "pgtenant-pg"
# Names of the TLS files inside the data directory (see _install_tls).
_SSL_CERT = "pgtenant-server.crt"
_SSL_KEY = "pgtenant-server.key"


def find_bindir() -> Path:
    """Locate a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$PGTENANT_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, ``initdb`` on ``PATH``, then the ``pgserver`` wheel.

    Returns: the bindir.
    Raises: ControlError when no PostgreSQL server binaries can be found.
    """
    candidates: list[Path] = []
    if env := os.environ.get("PGTENANT_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], check=True, capture_output=True, text=True
            ).stdout.strip()
            candidates.append(Path(out))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in debian)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    # The optional "embedded" extra: pgserver ships binaries in pgserver/pginstall/bin. Found
    # without importing it, since importing pgserver registers atexit hooks.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise ControlError(
        "no PostgreSQL server binaries found: install postgresql (initdb, pg_ctl), set "
        "PGTENANT_PG_BINDIR, or `pip install pgserver`"
    )


def _free_port(host: str) -> int:
    # The port may be taken again before postgres binds it; acceptable for a test cluster.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ensure_server_user() -> str:
    """Returns: an unprivileged OS user to run Postgres as when we are root.

    ``postgres`` when it exists (Debian's packages make it); otherwise a system user
    ``pgtenant-pg`` is created, so a fresh machine with only the pgserver wheel works too.
    Raises: ControlError when no such user exists and none can be created.
    """
    for name in (_SERVER_USER, _FALLBACK_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is not None:
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        _FALLBACK_USER], check=False, capture_output=True)
        try:
            pwd.getpwnam(_FALLBACK_USER)
            return _FALLBACK_USER
        except KeyError:
            pass
    raise ControlError(
        f"running as root needs an OS user ({_SERVER_USER!r}) to run postgres as, "
        "and useradd could not create one"
    )


class PostgresCluster:
    """One local cluster under ``basedir`` (``data/``, ``sockets/``, ``postgres.log``).

    With ``basedir=None`` a fresh directory under the system temp dir is created and
    ``destroy()`` removes it. Use as a context manager for start/stop.
    """

    host = "127.0.0.1"

    def __init__(self, basedir: Path | None = None, *, port: int | None = None,
                 ssl_cert_key: tuple[str | Path, str | Path] | None = None,
                 tls_only_roles: Sequence[str] = ()) -> None:
        """``ssl_cert_key`` turns on ``ssl = on`` with that PEM certificate and key (copied
        into the data directory, where Postgres accepts the key's owner and mode).
        ``tls_only_roles`` may log in over TCP only with TLS (``hostssl``; ``hostnossl``
        rejects them), so a successful login proves the connection is encrypted."""
        self._owns_basedir = basedir is None
        self._ssl_cert_key = ssl_cert_key
        self._tls_only_roles = tuple(tls_only_roles)
        if basedir is None:
            basedir = Path(tempfile.mkdtemp(prefix="pgtenant-pg-"))
        self.basedir = Path(basedir).resolve()
        self.datadir = self.basedir / "data"
        self.socket_dir = self.basedir / "sockets"
        self.logfile = self.basedir / "postgres.log"
        self._requested_port = port
        self.port: int = port or 0
        self.bindir: Path = find_bindir()
        self._running = False
        # Postgres refuses to run as root: then every server tool runs as the postgres user.
        self._as_user: str | None = _SERVER_USER if os.geteuid() == 0 else None
        if self._as_user is not None:
            self._as_user = _ensure_server_user()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Initialise the cluster if needed, write the overrides and start the server.

        Returns: None once the server accepts connections (``pg_ctl -w``).
        Raises: ControlError when initdb or pg_ctl fails (the log file is quoted).
        """
        if self._running:
            return
        self._prepare_dirs()
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                 "-E", "UTF8", "--locale=C", "--auth=trust", "--no-sync"],
                what="initdb",
            )
            with (self.datadir / "postgresql.conf").open("a") as conf:
                conf.write(f"\ninclude_if_exists = '{_OVERRIDES_FILE}'\n")
        self.port = self._requested_port or _free_port(self.host)
        self._install_tls()
        self._write_file(self.datadir / _OVERRIDES_FILE, self._overrides())
        self._write_file(self.datadir / "pg_hba.conf", self._hba())
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
             "-w", "-t", "60", "start"],
            what="pg_ctl start",
        )
        self._running = True

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``); calling it again does nothing.

        Returns: None.
        Raises: ControlError when a running server cannot be stopped.
        """
        if not (self.datadir / "postmaster.pid").exists():
            self._running = False
            return
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
             "stop"],
            what="pg_ctl stop",
        )
        self._running = False

    def destroy(self) -> None:
        """Stop the server and delete ``basedir`` if this object created it.

        Returns: None.
        Raises: ControlError when the server cannot be stopped.
        """
        self.stop()
        if self._owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ accessors

    @property
    def running(self) -> bool:
        """Returns: whether ``start()`` succeeded and ``stop()`` was not called since."""
        return self._running

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """Returns: the superuser URL over TCP (trusted from 127.0.0.1 by pg_hba.conf)."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def tool(self, name: str) -> str | None:
        """Returns: the path of a client tool (``psql``, ``pgbench``...) or None."""
        path = self.bindir / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        return shutil.which(name)

    def create_database(self, name: str) -> None:
        """Create database ``name`` owned by ``postgres`` unless it already exists.

        Returns: None.
        Raises: ControlError when psql is missing or the statement fails.
        """
        from ..identity.context import quote_ident, quote_literal

        exists = self.psql(
            f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(name)}"
        ).strip()
        if exists != "1":
            self.psql(f"CREATE DATABASE {quote_ident(name)}")

    def psql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run one SQL command through psql as the superuser.

        Returns: psql's unaligned, tuples-only output.
        Raises: ControlError when psql is missing or the command fails.
        """
        psql = self.tool("psql")
        if psql is None:
            raise ControlError("psql not found next to the server binaries nor on PATH")
        proc = subprocess.run(
            [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
             self.admin_dsn(dbname), "-c", sql],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise ControlError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    # ------------------------------------------------------------------ internals

    def _overrides(self) -> str:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "'128MB'",
            "password_encryption": "'scram-sha-256'",
        }
        if self._ssl_cert_key is not None:
            # Relative paths are resolved against the data directory by the server.
            settings.update(ssl="on", ssl_cert_file=f"'{_SSL_CERT}'",
                            ssl_key_file=f"'{_SSL_KEY}'")
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _hba(self) -> str:
        # First match wins: the TLS-only lines must come before PG_HBA's catch-all "host".
        lines = []
        for role in self._tls_only_roles:
            lines += [f"hostssl all {role} 127.0.0.1/32 scram-sha-256",
                      f"hostnossl all {role} 127.0.0.1/32 reject"]
        return "".join(f"{line}\n" for line in lines) + PG_HBA

    def _install_tls(self) -> None:
        """Copy the certificate and key into the data dir, owned by the server user.

        Postgres refuses a key file that others can read, or that is owned by anyone but
        the server user (or root with mode 0640): copying sidesteps where the caller's
        files live and who owns them.
        """
        if self._ssl_cert_key is None:
            return
        cert, key = self._ssl_cert_key
        for src, name, mode in ((cert, _SSL_CERT, 0o644), (key, _SSL_KEY, 0o600)):
            dest = self.datadir / name
            shutil.copyfile(src, dest)
            dest.chmod(mode)
            if self._as_user is not None:
                pw = pwd.getpwnam(self._as_user)
                os.chown(dest, pw.pw_uid, pw.pw_gid)

    def _prepare_dirs(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_user is not None:
            # The server user must traverse basedir and write the log, data and socket dirs.
            pw = pwd.getpwnam(self._as_user)
            self.basedir.chmod(0o755)
            for path in (self.basedir, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            if self.datadir.exists():
                os.chown(self.datadir, pw.pw_uid, pw.pw_gid)

    def _write_file(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._as_user is not None:
            pw = pwd.getpwnam(self._as_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, argv: Sequence[str], *, what: str) -> None:
        cmd = list(argv)
        if self._as_user is not None:
            cmd = ["runuser", "-u", self._as_user, "--", *cmd]
        # cwd=basedir: the server user may not be allowed into the caller's cwd (e.g. /root).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        # Files, not pipes: a server that inherited a pipe would keep the call from returning.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd, cwd=self.basedir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                check=False,
            )
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError):
                log = self.logfile.read_text()[-2000:]
            hint = ""
            if self._as_user is not None:
                hint = f"\n(the {self._as_user!r} OS user must be able to run {self.bindir})"
            raise ControlError(
                f"{what} failed (exit {proc.returncode}): {output.strip()}\n{log}{hint}".strip()
            )
