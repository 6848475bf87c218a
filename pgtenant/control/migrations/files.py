"""Migration files on disk: ``NNNN_name.sql``, their header directives, checksums and lint.

Owns reading and writing the files and the static checks on their SQL (pglast). Does not
touch a database: which versions a tenant has is the ledger's business (``ledger.py``).

Format::

    -- pgtenant: scope=tenant            (default; or scope=shared: once, not per tenant)
    -- pgtenant: transaction=off         (runs alone, outside a transaction: CONCURRENTLY)
    ALTER TABLE projects ADD COLUMN budget numeric;
    -- pgtenant: down
    ALTER TABLE projects DROP COLUMN budget;

The checksum is the SHA-256 of the up part (header directives included, the down part
excluded) so a fixed rollback does not make an applied file look edited.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pglast
from pglast import ast
from pglast.enums.parsenodes import AlterTableType, ConstrType
from pglast.parser import ParseError
from pglast.visitors import Visitor

from .. import ControlError

__all__ = [
    "Migration",
    "Warning_",
    "lint",
    "load_migrations",
    "new_migration",
    "parse_migration",
    "split_statements",
]

Scope = Literal["tenant", "shared"]

_FILENAME = re.compile(r"^(\d{4,})_([a-z0-9_]+)\.sql$")
_DIRECTIVE = re.compile(r"^\s*--\s*pgtenant:\s*(.*?)\s*$", re.IGNORECASE)
_NAME = re.compile(r"[^a-z0-9_]+")

# Functions whose value differs per row: as a column DEFAULT they make ADD COLUMN rewrite the
# table under ACCESS EXCLUSIVE (a constant or stable default is stored once, PG >= 11).
_VOLATILE = frozenset({
    "random", "clock_timestamp", "timeofday", "gen_random_uuid", "uuid_generate_v1",
    "uuid_generate_v4", "nextval", "txid_current", "statement_timestamp",
})
_SERIAL_TYPES = frozenset({"serial", "bigserial", "smallserial", "serial4", "serial8",
                           "serial2"})


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file, parsed."""

    version: int
    name: str
    path: Path
    scope: Scope
    transactional: bool
    up: str
    down: str | None
    checksum: str

    @property
    def filename(self) -> str:
        """Returns: the file's name (what messages show)."""
        return self.path.name


@dataclass(frozen=True, slots=True)
class Warning_:  # trailing underscore: not the builtin Warning
    """A statement that `plan` flags: what it locks or rewrites, and what to do instead."""

    filename: str
    statement: str
    message: str


def parse_migration(path: Path, text: str) -> Migration:
    """Parse one file's text.

    Returns: the Migration.
    Raises: ControlError naming the file (bad name, unknown directive, SQL syntax error).
    """
    m = _FILENAME.match(path.name)
    if m is None:
        raise ControlError(f"{path.name}: expected NNNN_name.sql (digits, underscore, "
                           "lower-case name)")
    scope: Scope = "tenant"
    transactional = True
    up_lines: list[str] = []
    down_lines: list[str] | None = None
    for line in text.splitlines(keepends=True):
        d = _DIRECTIVE.match(line)
        if d is None:
            (up_lines if down_lines is None else down_lines).append(line)
            continue
        words = d.group(1).lower().split()
        if words == ["down"]:
            if down_lines is not None:
                raise ControlError(f"{path.name}: more than one '-- pgtenant: down' line")
            down_lines = []
            continue
        if down_lines is not None:
            raise ControlError(f"{path.name}: directives belong above '-- pgtenant: down'")
        up_lines.append(line)
        for word in words:
            if word in ("scope=tenant", "scope=shared"):
                scope = "shared" if word == "scope=shared" else "tenant"
            elif word in ("transaction=off", "transaction=on"):
                transactional = word == "transaction=on"
            else:
                raise ControlError(
                    f"{path.name}: unknown directive {word!r} (known: scope=tenant, "
                    "scope=shared, transaction=off, down)"
                )
    up = "".join(up_lines)
    down = "".join(down_lines) if down_lines is not None else None
    for part, sql in (("up", up), ("down", down)):
        if sql is not None:
            try:
                pglast.parse_sql(sql)
            except ParseError as exc:
                raise ControlError(f"{path.name}: {part} part: syntax error: {exc}") from exc
    if not split_statements(up):
        raise ControlError(f"{path.name}: no statement in the up part")
    return Migration(
        version=int(m.group(1)), name=m.group(2), path=path, scope=scope,
        transactional=transactional, up=up,
        down=down if down is not None and split_statements(down) else None,
        checksum=hashlib.sha256(up.encode()).hexdigest(),
    )


def load_migrations(directory: Path) -> list[Migration]:
    """Read every ``NNNN_name.sql`` in ``directory``, sorted by version.

    Returns: the migrations (empty when the folder does not exist yet).
    Raises: ControlError for a bad file or two files with one version.
    """
    if not directory.is_dir():
        return []
    out: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        mig = parse_migration(path, path.read_text())
        if mig.version in out:
            raise ControlError(f"{path.name} and {out[mig.version].filename}: same version "
                               f"{mig.version}")
        out[mig.version] = mig
    return [out[v] for v in sorted(out)]


_TEMPLATE = """\
-- pgtenant: scope={scope}
-- Runs once per tenant schema with search_path set to that schema alone (unqualified
-- names are the tenant's), inside one transaction with the tenant's other pending files.
-- For CREATE INDEX CONCURRENTLY add a line '-- pgtenant: transaction=off' (file runs alone).

-- pgtenant: down
"""


def new_migration(directory: Path, name: str, *, scope: Scope = "tenant") -> Path:
    """Write the next numbered file with a header template.

    Returns: its path.
    Raises: ControlError for a name with no letters or digits.
    """
    slug = _NAME.sub("_", name.lower()).strip("_")
    if not slug:
        raise ControlError(f"bad migration name {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    versions = [int(m.group(1)) for p in directory.glob("*.sql")
                if (m := _FILENAME.match(p.name))]
    path = directory / f"{max(versions, default=0) + 1:04d}_{slug}.sql"
    path.write_text(_TEMPLATE.format(scope=scope))
    return path


def split_statements(sql: str) -> list[str]:
    """Returns: the statements of ``sql`` (by the server's grammar: dollar quotes, comments)."""
    return [s for s in pglast.split(sql) if s.strip()]


def lint(mig: Migration) -> list[Warning_]:
    """Flag statements that hold strong locks for long or rewrite a table.

    A short, honest list, not a proof: ADD COLUMN with a volatile default or a serial or
    stored generated column (rewrite), ALTER COLUMN TYPE (rewrite, usually), SET NOT NULL
    and constraints without NOT VALID (full scan under lock), CREATE INDEX without
    CONCURRENTLY (writes blocked while it builds), VACUUM FULL / CLUSTER / LOCK TABLE, and
    CONCURRENTLY in a file that runs in a transaction (it would fail).

    Returns: the warnings, in file order.
    """
    out: list[Warning_] = []

    def warn(stmt: str, message: str) -> None:
        out.append(Warning_(mig.filename, " ".join(stmt.split())[:200], message))

    for raw in pglast.parse_sql(mig.up):
        node = raw.stmt
        text = _slice(mig.up, raw)
        if isinstance(node, ast.AlterTableStmt):
            for cmd in node.cmds or ():
                if not isinstance(cmd, ast.AlterTableCmd):
                    continue
                if cmd.subtype == AlterTableType.AT_AddColumn and isinstance(cmd.def_,
                                                                             ast.ColumnDef):
                    reason = _rewriting_column(cmd.def_)
                    if reason:
                        warn(text, f"ADD COLUMN with {reason} rewrites the whole table under "
                                   "ACCESS EXCLUSIVE; add it without, then backfill in batches")
                elif cmd.subtype == AlterTableType.AT_AlterColumnType:
                    warn(text, "ALTER COLUMN ... TYPE usually rewrites the table (and its "
                               "indexes) under ACCESS EXCLUSIVE; add a new column and backfill")
                elif cmd.subtype == AlterTableType.AT_SetNotNull:
                    warn(text, "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE; "
                               "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET")
                elif cmd.subtype == AlterTableType.AT_AddConstraint and isinstance(
                        cmd.def_, ast.Constraint):
                    c = cmd.def_
                    if c.contype in (ConstrType.CONSTR_CHECK, ConstrType.CONSTR_FOREIGN) \
                            and not c.skip_validation:
                        warn(text, "ADD CONSTRAINT without NOT VALID scans the table under "
                                   "lock; add it NOT VALID and VALIDATE CONSTRAINT later")
                    elif c.contype in (ConstrType.CONSTR_PRIMARY, ConstrType.CONSTR_UNIQUE) \
                            and not c.indexname:
                        warn(text, "ADD PRIMARY KEY/UNIQUE builds an index under ACCESS "
                                   "EXCLUSIVE; CREATE UNIQUE INDEX CONCURRENTLY, then USING "
                                   "INDEX")
        elif isinstance(node, ast.IndexStmt):
            if node.concurrent and mig.transactional:
                warn(text, "CREATE INDEX CONCURRENTLY cannot run in a transaction: add "
                           "'-- pgtenant: transaction=off' to this file")
            elif node.concurrent and node.if_not_exists:
                warn(text, "a failed CONCURRENTLY build leaves an INVALID index that IF NOT "
                           "EXISTS then skips on the retry: check pg_index.indisvalid and "
                           "drop it before re-running")
            elif not node.concurrent:
                warn(text, "CREATE INDEX without CONCURRENTLY blocks writes to the table "
                           "while it builds (fine on small tables, not on big ones)")
        elif isinstance(node, ast.VacuumStmt) and any(
                isinstance(o, ast.DefElem) and o.defname == "full" for o in node.options or ()):
            warn(text, "VACUUM FULL rewrites the table under ACCESS EXCLUSIVE")
        elif isinstance(node, ast.ClusterStmt):
            warn(text, "CLUSTER rewrites the table under ACCESS EXCLUSIVE")
        elif isinstance(node, ast.LockStmt):
            warn(text, "explicit LOCK TABLE: held until the tenant's transaction ends")
    if not mig.transactional and len(split_statements(mig.up)) > 1:
        out.append(Warning_(mig.filename, "", "transaction=off with several statements: a "
                            "failure leaves the earlier ones applied; write them idempotent "
                            "(IF NOT EXISTS) or put one statement per file"))
    return out


def _slice(sql: str, raw: ast.RawStmt) -> str:
    start = raw.stmt_location or 0
    length = raw.stmt_len or len(sql.encode()) - start
    return sql.encode()[start:start + length].decode(errors="replace").strip()


def _rewriting_column(col: ast.ColumnDef) -> str | None:
    type_names = col.typeName.names if col.typeName is not None else None
    names = [getattr(n, "sval", "") for n in type_names or ()]
    if names and names[-1] in _SERIAL_TYPES:
        return f"type {names[-1]}"
    for c in col.constraints or ():
        if not isinstance(c, ast.Constraint):
            continue
        if c.contype == ConstrType.CONSTR_IDENTITY:
            return "an identity"
        if c.contype == ConstrType.CONSTR_GENERATED:
            return "a stored generated expression"
        if c.contype == ConstrType.CONSTR_DEFAULT and _has_volatile_call(c.raw_expr):
            return "a volatile default"
    return None


def _has_volatile_call(expr: object) -> bool:
    found = False

    class Calls(Visitor):
        def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
            nonlocal found
            name = getattr((node.funcname or (None,))[-1], "sval", "")
            found = found or name in _VOLATILE

    if isinstance(expr, ast.Node):
        Calls()(expr)
    return found
