"""Classification of client SQL: transaction control, statement drops, session state."""

from __future__ import annotations

import pytest

from proxy.protocol.sql import DROPS_STATEMENTS, SESSION_STATE, TXN_CONTROL, classify


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = 1",
        "set search_path to x",
        "RESET ALL",
        "SET ROLE tenant_agency",
        "SET SESSION AUTHORIZATION postgres",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "LISTEN channel",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t(a int)",
        "create temporary view v as select 1",
        "SELECT 1 INTO TEMP t",
        "SELECT pg_advisory_lock(42)",
        "select pg_catalog.pg_try_advisory_lock_shared(1, 2)",
        "SELECT set_config('work_mem', '1MB', false)",
        "SELECT set_config('work_mem', '1MB', $1)",
        "DO $$ BEGIN PERFORM 1; END $$",
        "CALL do_things()",
        "LOAD 'auto_explain'",
        "SELECT 1; SET x.y = 2",
        "this is not sql but mentions set",
    ],
)
def test_statements_that_leave_session_state_are_flagged(sql: str) -> None:
    assert classify(sql.encode()) & SESSION_STATE


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "UPDATE campaigns SET name = 'x' WHERE id = 1",
        "SET LOCAL statement_timeout = 1",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT set_config('app.x', '1', true)",
        "SELECT pg_advisory_xact_lock(1)",
        "DECLARE c CURSOR FOR SELECT 1",
        "CREATE TABLE persistent(a int)",
        "SELECT 'set listen prepare' AS words",
        "INSERT INTO t SELECT * FROM u",
    ],
)
def test_transaction_scoped_statements_are_not_flagged(sql: str) -> None:
    assert not classify(sql.encode()) & SESSION_STATE


@pytest.mark.parametrize("sql", ["BEGIN", "commit", "ROLLBACK", "END", "start transaction",
                                 "PREPARE TRANSACTION 'x'", "abort"])
def test_transaction_control_is_flagged(sql: str) -> None:
    assert classify(sql.encode()) & TXN_CONTROL


def test_plain_select_changes_no_transaction_status() -> None:
    assert not classify(b"SELECT name FROM campaigns") & TXN_CONTROL


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "deallocate p", "DISCARD ALL"])
def test_statement_drops_are_flagged(sql: str) -> None:
    assert classify(sql.encode()) & DROPS_STATEMENTS
