"""Migration files (issue #12): directives, checksums, lint, and how progress is shown."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from pgtenant.configfile import parse_config
from pgtenant.control import ControlError
from pgtenant.control.migrations.files import lint, load_migrations, new_migration, parse_migration
from pgtenant.control.migrations.progress import JsonLines, RichProgress
from pgtenant.errors import ConfigError


def test_directives_set_scope_transaction_and_split_off_the_down_part() -> None:
    mig = parse_migration(Path("0007_idx.sql"), (
        "-- pgtenant: scope=shared transaction=off\n"
        "CREATE INDEX CONCURRENTLY i ON t (x);\n"
        "-- pgtenant: down\n"
        "DROP INDEX i;\n"))
    assert (mig.version, mig.name, mig.scope, mig.transactional) == (7, "idx", "shared", False)
    assert mig.down == "DROP INDEX i;\n"
    assert "DROP INDEX" not in mig.up


def test_checksum_covers_the_up_part_only() -> None:
    a = parse_migration(Path("0001_a.sql"), "SELECT 1;\n-- pgtenant: down\nSELECT 2;\n")
    b = parse_migration(Path("0001_a.sql"), "SELECT 1;\n-- pgtenant: down\nSELECT 3;\n")
    c = parse_migration(Path("0001_a.sql"), "SELECT 2;\n-- pgtenant: down\nSELECT 2;\n")
    assert a.checksum == b.checksum != c.checksum


@pytest.mark.parametrize(("name", "text", "words"), [
    ("7_x.sql", "SELECT 1;", "NNNN_name.sql"),
    ("0001_x.sql", "-- pgtenant: scope=galaxy\nSELECT 1;", "unknown directive"),
    ("0001_x.sql", "SELEC 1;", "syntax error"),
    ("0001_x.sql", "-- only a comment\n", "no statement"),
    ("0001_x.sql", "SELECT 1;\n-- pgtenant: down\n-- pgtenant: down\n", "more than one"),
])
def test_bad_files_are_refused_naming_the_file(name: str, text: str, words: str) -> None:
    with pytest.raises(ControlError, match=words) as info:
        parse_migration(Path(name), text)
    assert name in str(info.value)


def test_new_migration_numbers_after_the_highest(tmp_path: Path) -> None:
    first = new_migration(tmp_path, "First one")
    assert first.name == "0001_first_one.sql"
    (tmp_path / "0033_story.sql").write_text("SELECT 1;\n")
    path = new_migration(tmp_path, "add_budget")
    assert path.name == "0034_add_budget.sql"
    # a template not filled in yet is refused (applying it empty would freeze its checksum)
    with pytest.raises(ControlError, match=r"0001_first_one\.sql: no statement"):
        load_migrations(tmp_path)
    for p in (first, path):
        p.write_text(p.read_text().replace("-- pgtenant: down", "SELECT 1;\n-- pgtenant: down"))
    assert [m.version for m in load_migrations(tmp_path)] == [1, 33, 34]


def test_lint_flags_rewrites_and_long_locks_but_not_cheap_changes() -> None:
    mig = parse_migration(Path("0002_x.sql"), """
        ALTER TABLE t ADD COLUMN a int DEFAULT 0;
        ALTER TABLE t ADD COLUMN b timestamptz DEFAULT clock_timestamp();
        ALTER TABLE t ADD COLUMN c bigserial;
        ALTER TABLE t ALTER COLUMN d TYPE bigint;
        ALTER TABLE t ALTER COLUMN e SET NOT NULL;
        ALTER TABLE t ADD CONSTRAINT f CHECK (a > 0) NOT VALID;
        ALTER TABLE t ADD CONSTRAINT g FOREIGN KEY (a) REFERENCES u (id);
        CREATE INDEX h ON t (a);
        CREATE TABLE fresh (id int);
        VACUUM FULL t;
    """)
    flagged = [w.statement.split(" ")[-1].rstrip(";") for w in lint(mig)]
    assert flagged == ["clock_timestamp()", "bigserial", "bigint", "NULL", "(id)", "(a)", "t"]


def test_concurrently_inside_a_transaction_file_is_flagged() -> None:
    mig = parse_migration(Path("0003_i.sql"), "CREATE INDEX CONCURRENTLY i ON t (a);\n")
    assert "transaction=off" in lint(mig)[0].message


def test_json_lines_writes_one_object_per_event() -> None:
    out = io.StringIO()
    JsonLines(out).event("target_failed", tenant="acme", file="0002_x.sql", sqlstate="42701")
    line = json.loads(out.getvalue())
    assert (line["event"], line["tenant"], line["sqlstate"]) == ("target_failed", "acme",
                                                                  "42701")


def test_progress_bar_shows_waves_counts_and_failures() -> None:
    out = io.StringIO()
    bar = RichProgress(Console(file=out, force_terminal=True, width=120))
    bar.event("run_started", run_id=3, targets=2, waves=1, wave_names=["wave 1"])
    bar.event("wave_started", wave="wave 1", index=1, size=2)
    bar.event("target_done", tenant="a", versions=[1], seconds=0.1)
    bar.event("target_failed", tenant="b", message="tenant b: 0001_x.sql: boom (SQLSTATE "
                                                   "42P01) in statement: SELECT")
    bar.event("run_finished", run_id=3, status="failed", done=1, failed=1, not_started=0,
              seconds=0.2)
    text = out.getvalue()
    assert "FAILED" in text and "tenant b: 0001_x.sql" in text and "42P01" in text
    assert "1 done" in text and "1 failed" in text and "wave 1" in text


def test_migrations_config_section_is_validated() -> None:
    base = {"databases": {"d": {"dsn": "postgresql://u@h/d"}},
            "tenant_types": {"e": {"role": "{schema}", "search_path": ["{schema}"]}}}
    config = parse_config({**base, "migrations": {"dir": "db/migrations",
                                                  "lock_timeout_ms": 500}})
    assert (config.migrations.dir, config.migrations.lock_timeout_ms,
            config.migrations.statement_timeout_ms) == ("db/migrations", 500, 300000)
    with pytest.raises(ConfigError, match=r"migrations\.lock_timeout_ms"):
        parse_config({**base, "migrations": {"lock_timeout_ms": 0}})
    with pytest.raises(ConfigError, match="did you mean 'dir'"):
        parse_config({**base, "migrations": {"dirs": "x"}})
