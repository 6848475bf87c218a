"""Classification of client SQL: transaction control, statement drops, session state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgtenant.protocol.sql import (
    DROPS_STATEMENTS,
    SESSION_STATE,
    TXN_CONTROL,
    classify,
    pins_server,
)


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


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE t (a int)",
        "CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS",
        "CREATE TEMP TABLE t (a int) ON COMMIT PRESERVE ROWS",
        "CREATE TEMPORARY TABLE t AS SELECT 1",
        "CREATE TEMP TABLE t AS SELECT 1 WITH NO DATA",
        "SELECT 1 AS a INTO TEMPORARY t",
        "CREATE TEMP VIEW v AS SELECT 1",
        "CREATE TEMP SEQUENCE s",
        "CREATE TABLE pg_temp.t (a int)",
        "create table PG_TEMP_3.t (a int)",
        "CREATE VIEW pg_temp.v AS SELECT 1",
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TYPE pg_temp.ty AS (a int)",
        "CREATE DOMAIN pg_temp.d AS int",
        "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
        # ON COMMIT DROP does not cover what else the text does.
        "CREATE TEMP TABLE t (a int) ON COMMIT DROP; CREATE TEMP TABLE u (a int)",
        "CREATE TEMP TABLE t (a int) ON COMMIT DROP; SELECT pg_advisory_lock(1)",
        "CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1; SELECT 2 INTO TEMP u",
    ],
)
def test_session_temp_objects_pin_the_server(sql: str) -> None:
    assert pins_server(sql.encode())


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
        "create temporary table t (a int) on commit drop",
        "CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1",
        "CREATE TABLE pg_temp.t (a int) ON COMMIT DROP",
        "BEGIN; CREATE TEMP TABLE t (a int) ON COMMIT DROP; INSERT INTO t VALUES (1); COMMIT",
        "SELECT * FROM pg_temp.t",  # reading one is not making one
        "INSERT INTO pg_temp.t VALUES (1)",
        "CREATE TABLE t (a int)",
        "CREATE TABLE t (a int, b text DEFAULT 'temp')",
    ],
)
def test_on_commit_drop_and_uses_of_temp_tables_do_not_pin(sql: str) -> None:
    """An ON COMMIT DROP table ends with its transaction: neither pinned nor closed (the
    server still reports it, and the pool empties pg_temp before anyone else uses it)."""
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


_SQL_FRAGMENTS = [b"begin", b"Start", b"commit", b"end", b"rollback", b"abort", b"prepare",
                  b"call", b"do", b"deallocate", b"discard", b"set", b"reset", b"listen",
                  b"hold", b"temp", b"temporary", b"load", b"set_config", b"into",
                  b"advisory", b"pg_advisory_lock", b"select", b"x", b"_", b"1", b" ", b";",
                  b"(", b"'", b"\xc3\xa9", b"INTO", b"pg_temp", b"PG_TEMP_3", b"."]


@pytest.mark.parametrize("parts", [[a, b] for a in _SQL_FRAGMENTS
                                   for b in (b"", b" ", b";", b"x", b"(")])
def test_classify_prefilter_passes_each_fragment_the_patterns_match(parts: list[bytes]) -> None:
    test_classify_prefilter_passes_every_text_the_patterns_match.hypothesis.inner_test(parts)  # type: ignore[attr-defined]


@given(st.lists(st.sampled_from(_SQL_FRAGMENTS), max_size=12))
def test_classify_prefilter_passes_every_text_the_patterns_match(parts: list[bytes]) -> None:
    from pgtenant.protocol import sql

    text = b"".join(parts)
    if any(p.search(text) for p in (sql._TXN_RE, sql._DROPS_RE, sql._SESSION_RE,
                                    sql._END_RE, sql._LOCAL_RE)):
        assert (not sql._ANY_WORDS.isdisjoint(sql.words(text))
                or sql._SUBWORDS.search(text)), text


@given(st.lists(st.sampled_from([
    *_SQL_FRAGMENTS, b"ADVISORY", b"Advis", b"ory", b"pg_", b"TeMp", b"pg", b"\xc1", b"\x00",
    b"-", b"P"]), max_size=12))
def test_classify_prefilter_finds_exactly_the_words_and_the_subword_regex(
        parts: list[bytes]) -> None:
    # _flagless translates a text once for the words and the inside-a-word matches that the
    # regex _SUBWORDS looked for: it must say no flag exactly where the two tests did.
    from pgtenant.protocol import sql

    text = b"".join(parts)
    expected = not sql.has_word(text, sql._ANY_WORDS) and not sql._SUBWORDS.search(text)
    assert sql._flagless(text) == expected, text


@pytest.mark.parametrize("text", [b"SELECT pg_advisory_lock(1)", b"select 1 from PG_TEMP_3.t",
                                  b"SELECT AdViSoRy", b"SELECT x FROM pg_Temp.t"])
def test_classify_prefilter_passes_subwords_in_any_case(text: bytes) -> None:
    from pgtenant.protocol import sql

    assert not sql._flagless(text)
    assert not sql._flagless(text * (sql._WORDS_CHUNK // len(text) + 1))  # chunked path


@given(st.lists(st.sampled_from([b"set", b"SeT", b"x", b"se", b"t", b" ", b"\n", b"(", b"_",
                                 b"\xc3\xa9", b"commit", b"1"]), max_size=40),
       st.integers(min_value=1, max_value=12))
def test_has_word_in_chunks_finds_exactly_what_words_finds(parts: list[bytes],
                                                           chunk: int) -> None:
    from pgtenant.protocol.sql import has_word, words

    text = b"".join(parts)
    for wanted in (frozenset({b"set"}), frozenset({b"commit", b"x1"}), frozenset({b"t_"})):
        assert has_word(text, wanted, chunk) == (not wanted.isdisjoint(words(text)))


def test_has_word_on_a_huge_text_does_not_build_one_list_of_its_words() -> None:
    import tracemalloc

    from pgtenant.protocol.sql import has_word

    text = b"INSERT INTO t VALUES (1, 'abc def'), " * 200_000  # 7 MB, ~1.4 M words
    tracemalloc.start()
    try:
        assert not has_word(text, frozenset({b"set"}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(text), peak  # one translated copy and a chunk's words, not 70 MB
