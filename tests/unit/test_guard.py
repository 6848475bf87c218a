"""The statement guard: what tenant sessions may not run, however it is spelled."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgtenant.guard import Guard, PinCapped
from pgtenant.protocol.redirect import CLIENT_PID, STATEMENTS, client_statements, render

GUARD = Guard(("app.", "myapp.tenant"))


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE tenant_agency",
        "set role 'tenant_agency'",
        "SET LOCAL ROLE t_hooli",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION postgres",
        "RESET SESSION AUTHORIZATION",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SET search_path = t_hooli",
        "SET SCHEMA 't_hooli'",
        "set Search_Path to public",
        'SET "search_path" TO t_hooli',
        "RESET search_path",
        "SET app.tenant_id = '00000000-0000-0000-0000-000000000000'",
        "SET LOCAL app.tenant_id TO 'x'",
        "RESET app.tenant_sig",
        "SET myapp.tenant = 'x'",
        "RESET ALL",
        "SELECT set_config('app.tenant_id', 'x', true)",
        "SELECT pg_catalog.set_config('role', 'tenant_agency', false)",
        "select PG_CATALOG.SET_CONFIG('search_path', 'x', true)",
        'SELECT "pg_catalog"."set_config"(\'app.tenant_id\', \'x\', true)',
        "SELECT set_config('ROLE', 'x', true)",
        "SELECT 1 WHERE (SELECT set_config('app.tenant_id', 'x', true)) IS NOT NULL",
        "WITH x AS (SELECT set_config('role', 'r', true)) SELECT * FROM x",
        "SELECT count(*) FROM campaigns; SELECT set_config('app.tenant_id', 'x', true)",
        "/* harmless */ SET /* really */ ROLE -- comment\n tenant_agency",
        "EXPLAIN ANALYZE SELECT set_config('role', 'x', true)",
        "DISCARD ALL",
        "LOAD 'auto_explain'",
        "ALTER SYSTEM SET work_mem = '1GB'",
        "COPY campaigns TO '/tmp/out.csv'",
        "COPY campaigns FROM PROGRAM 'cat /etc/passwd'",
        "SELECT query_to_xml('SET ROLE x', true, true, '')",
        "SELECT pg_catalog.cursor_to_xml('c', 1, true, true, '')",
        "SELECT pg_read_file('/etc/passwd')",
        "DO $$ BEGIN EXECUTE 'SET ROLE tenant_agency'; END $$",
        "VACUUM campaigns",
        "VACUUM",
        "CREATE INDEX CONCURRENTLY i ON campaigns(name)",
        "DROP INDEX CONCURRENTLY i",
        "REINDEX TABLE CONCURRENTLY campaigns",
        "CREATE DATABASE evil",
        "ALTER ROLE tenant_sme SET search_path = t_hooli",
        "COMMIT; SELECT pgtenant.signing_key()",
        "begin; select 1; end; select * from campaigns",
        "ROLLBACK; SELECT 1",
        "SELECT 1; ABORT; SELECT 2",
        "COMMIT AND CHAIN",
        "rollback and chain",
        "CALL some_proc(); SELECT 1",
        "SET client_encoding TO 'SJIS'",
        "SET LOCAL client_encoding = 'Shift-JIS'",
        "SET NAMES 'big5'",
        "set client_encoding to gbk",
        "SET client_encoding TO 'WIN949'",
        "SELECT set_config('client_encoding', 'GB18030', false)",
        "SET standard_conforming_strings = off",
        "LISTEN tenant_news",
        "NOTIFY tenant_news, 'x'",
        "SET LOCAL standard_conforming_strings TO false",
        "SELECT U&\"\\0073et_config\"('role', 't_hooli', true)",
    ],
)
def test_escapes_are_refused(sql: str) -> None:
    message = GUARD.check(sql.encode())
    assert message is not None and message.startswith("pgtenant: ")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM campaigns",
        "UPDATE campaigns SET name = 'x' WHERE id = 1",
        "SET statement_timeout = 5000",
        "SET LOCAL work_mem = '64MB'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT current_setting('app.tenant_id')",
        "ANALYZE campaigns",
        "COPY campaigns FROM STDIN",
        "COPY (SELECT 1) TO STDOUT",
        "SELECT 'SET ROLE postgres' AS text_only",
        "CREATE INDEX i ON campaigns(name)",
        "selec 1",  # no suspect word: not parsed, Postgres gives its own syntax error
        "BEGIN; SELECT 1; COMMIT",
        "SET appx.flag = 1",
        "BEGIN; SELECT 1; COMMIT;",
        "SELECT CASE WHEN true THEN 1 END; SELECT 2",
        "BEGIN; SAVEPOINT a; SELECT 1; ROLLBACK TO SAVEPOINT a; COMMIT",
        "COMMIT",
        "SET client_encoding TO 'UTF8'",
        "SET NAMES 'LATIN1'",
        "SET client_encoding TO 'EUC_JP'",
        "RESET client_encoding",
        "SET standard_conforming_strings = on",
        "discard temp",  # removes only what the session holds
        "DISCARD PLANS",
    ],
)
def test_ordinary_statements_pass(sql: str) -> None:
    assert GUARD.check(sql.encode()) is None


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # Values (and names) Postgres will see are judged by pgtenant.set_config itself.
        ("SELECT set_config('work_mem', '8MB', true)",
         "SELECT pgtenant.set_config('work_mem', '8MB', true)"),
        ("select set_config('client_encoding', $1, false)",
         "select pgtenant.set_config('client_encoding', $1, false)"),
        ("SELECT set_config($1, $2, false)", "SELECT pgtenant.set_config($1, $2, false)"),
        ("SELECT set_config(lower('ROLE'), 'x', true)",
         "SELECT pgtenant.set_config(lower('ROLE'), 'x', true)"),
        ("SELECT set_config(name, 'x', true) FROM (VALUES ('role')) v(name)",
         "SELECT pgtenant.set_config(name, 'x', true) FROM (VALUES ('role')) v(name)"),
        ("SELECT pg_catalog . \"set_config\"('TimeZone', 'UTC', false)",
         "SELECT pgtenant.set_config('TimeZone', 'UTC', false)"),
        ("SELECT 'set_config(' AS t, \"SET_CONFIG\"(1), Set_Config('a', 'b', true)",
         "SELECT 'set_config(' AS t, \"SET_CONFIG\"(1), pgtenant.set_config('a', 'b', true)"),
        # Bytes of another encoding (or UTF-8) before the call keep their offsets.
        ("SELECT '\u00e9\u20ac', set_config('DateStyle', 'ISO', false)",
         "SELECT '\u00e9\u20ac', pgtenant.set_config('DateStyle', 'ISO', false)"),
        ("SELECT pg_notify('tenant_news', 'x')", "SELECT pgtenant.pg_notify('tenant_news', 'x')"),
        ("SELECT pg_catalog.pg_notify($1, $2)", "SELECT pgtenant.pg_notify($1, $2)"),
        # Another schema's set_config is the tenant's own function: left alone.
        ("SELECT myschema.set_config('a', 'b', true), pgtenant.set_config('a', 'b', true)",
         None),
    ],
)
def test_set_config_calls_are_redirected(sql: str, expected: str | None) -> None:
    verdict = GUARD.check(sql.encode())
    assert verdict == (expected.encode() if expected is not None else None)


def test_set_config_in_latin1_text_keeps_byte_offsets() -> None:
    sql = "SELECT 'caf\u00e9', set_config('DateStyle', 'ISO', false)".encode("latin-1")
    assert GUARD.check(sql) == sql.replace(b"set_config", b"pgtenant.set_config")


def test_unrewritable_set_config_is_refused() -> None:
    # The tree has a set_config call the token scan cannot place (U&"..." name): refused.
    verdict = GUARD.check(b"SELECT U&\"set_config\"('work_mem', '1MB', true)")
    assert isinstance(verdict, str) and "cannot rewrite" in verdict


def test_messages_name_the_statement() -> None:
    assert "SET role" in (GUARD.check(b"SET ROLE x") or "")
    assert "RESET search_path" in (GUARD.check(b"RESET search_path") or "")
    assert "SET SESSION AUTHORIZATION" in (GUARD.check(b"SET SESSION AUTHORIZATION x") or "")
    assert "set_config('app.tenant_id'" in (GUARD.check(
        b"SELECT set_config('app.tenant_id', 'x', true)") or "")
    assert "VACUUM cannot run through pgtenant" in (GUARD.check(b"VACUUM") or "")


def test_verdicts_are_cached_by_text() -> None:
    guard = Guard()
    sql = b"SET ROLE someone"
    first = guard.check(sql)
    assert guard._cache[sql] == (first, "variable_set")
    assert guard.check(sql) is first
    assert guard.refusals_by_rule == {"variable_set": 2}  # counted per refusal, cached or not


def test_unparsable_text_with_a_suspect_word_is_refused() -> None:
    # Postgres 15 parses "system_user" as a plain alias; pglast (Postgres 18) does not, so
    # without this rule the SET ROLE behind it would go unchecked to an older backend.
    message = GUARD.check(b"SELECT 1 FROM (SELECT 1) system_user; SET ROLE t_hooli")
    assert message is not None and "cannot parse" in message
    assert "syntax error" in (GUARD.check(b"SELEC 1; SET x = 1") or "")


def test_outside_transaction_kind_names_single_statements_only() -> None:
    guard = Guard()
    assert guard.outside_transaction_kind(b"VACUUM campaigns") == "VACUUM"
    assert guard.outside_transaction_kind(b"create index concurrently i on t(a)") == (
        "CREATE INDEX CONCURRENTLY")
    assert guard.outside_transaction_kind(b"VACUUM a; VACUUM b") is None
    assert guard.outside_transaction_kind(b"SET ROLE x") is None
    assert guard.outside_transaction_kind(b"CREATE DATABASE x") is None


# The prefilter that spares the regexes for plain texts must never miss what they find.
_FRAGMENTS = [b"set", b"SeT", b"reset", b"set_config", b"commit", b"END", b"chain", b"do",
              b"u&", b"U&", b"query_to_xml", b"xx_to_xmlschema", b"dblink_exec", b"copy",
              b"listen", b"select", b"x", b"_", b"1", b" ", b";", b"(", b"'", b'"', b".",
              b"\xc3\xa9", b"\t", b"pg_notify", b"lo_export", b"call", b"rollback", b"lock",
              b"explain", b"lo_open", b"loread", b"lo_from_bytea", b"function",
              b"PROCEDURE"]


def _guard_pairs() -> list[list[bytes]]:
    return [[a, b] for a in _FRAGMENTS for b in (b"", b" ", b";", b"x", b"(")]


@pytest.mark.parametrize("parts", _guard_pairs())
def test_prefilter_passes_each_fragment_the_guard_patterns_match(parts: list[bytes]) -> None:
    test_prefilter_passes_every_text_the_guard_patterns_match.hypothesis.inner_test(parts)  # type: ignore[attr-defined]


@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=12))
def test_prefilter_passes_every_text_the_guard_patterns_match(parts: list[bytes]) -> None:
    from pgtenant.guard import _ANY_WORDS, _CHAIN, _SUSPECT, _TXN_END, _has_inside
    from pgtenant.protocol.sql import words

    text = b"".join(parts)
    if _SUSPECT.search(text) or _CHAIN.search(text) or _TXN_END.search(text):
        assert not _ANY_WORDS.isdisjoint(words(text)) or _has_inside(text), text


# ---------------------------------------------------------------------- shared-role policy

_SHARED_ROLE_ONLY = {
    "lock_table": ["LOCK TABLE campaigns IN ACCESS EXCLUSIVE MODE", "lock campaigns",
                   "SELECT 1; LOCK TABLE campaigns"],
    "large_objects": ["SELECT lo_creat(-1)", "SELECT loread(lo_open(16400, 262144), 100)",
                      "SELECT pg_catalog.lo_unlink(16400)", "SELECT lo_get(16400)",
                      "SELECT lo_from_bytea(0, 'x')", "SELECT lowrite(0, 'x')",
                      "SELECT 1 FROM t WHERE lo_tell64(0) > 0"],
    "explain_analyze": ["EXPLAIN ANALYZE SELECT * FROM campaigns",
                        "explain (analyze, costs off) select 1", "EXPLAIN (ANALYZE on) SELECT 1",
                        "EXPLAIN (ANALYZE 1) SELECT 1", "EXPLAIN (ANALYZE 'true') SELECT 1",
                        "EXPLAIN ANALYSE SELECT 1", "explain (format json, analyse) select 1"],
}


@pytest.mark.parametrize("switch,sql", [(k, q) for k, qs in _SHARED_ROLE_ONLY.items()
                                        for q in qs])
def test_shared_role_policy_refuses_unless_the_type_allows_it(switch: str, sql: str) -> None:
    strict = Guard()
    assert strict.check(sql.encode()) is not None, sql
    allowed = Guard(allow=[switch])
    assert allowed.check(sql.encode()) is None, sql


@pytest.mark.parametrize("sql", ["EXPLAIN SELECT 1", "EXPLAIN (ANALYZE false) SELECT 1",
                                 "EXPLAIN (analyze off, verbose) SELECT 1",
                                 "EXPLAIN (ANALYZE 0) SELECT 1", "SELECT 'lock'",
                                 "SELECT lock FROM t", "SELECT pg_advisory_xact_lock(1)"])
def test_shared_role_policy_allows_plain_explain_and_lookalikes(sql: str) -> None:
    assert Guard().check(sql.encode()) is None


def test_lock_refusal_names_its_switch() -> None:
    assert "allow_lock_table" in (Guard().check(b"LOCK TABLE t") or "")
    assert "allow_large_objects" in (Guard().check(b"SELECT lo_open(1, 2)") or "")
    assert "allow_explain_analyze" in (Guard().check(b"EXPLAIN ANALYZE SELECT 1") or "")


# ---------------------------------------------------------------------- bounded cost


def test_a_big_text_the_guard_would_parse_is_refused_unparsed_with_54000() -> None:
    from pgtenant.protocol.refusal import refusal_sql

    guard = Guard(max_parse=10_000)
    big = b"SELECT 1 WHERE 'x' = 'set';" * 1000
    refusal = guard.check(big)
    assert refusal is not None and getattr(refusal, "sqlstate", None) == "54000"
    assert "max_parsed_query_size" in refusal
    # Raised by Postgres itself with that SQLSTATE, in the session, as any refusal.
    assert refusal_sql(refusal).startswith(b"CALL pgtenant.refuse_with('54000', 'pgtenant:")
    assert len(guard._cache) == 0  # nothing kept for it
    # Texts with no word to check are never parsed, whatever their size.
    assert guard.check(b"SELECT 1 WHERE 'x' = 'y';" * 100_000) is None
    assert guard.check(b"SET work_mem = '1MB'") is None  # small ones are still judged


def test_guard_cache_is_bounded_in_bytes_and_keeps_no_huge_text() -> None:
    guard = Guard(max_parse=1 << 20)
    cache = guard._cache
    for i in range(3000):  # ~6 MB of distinct suspect texts, each judged once
        guard.check(b"SET work_mem = '1MB' /* " + str(i).encode() + b" */ --" + b"x" * 2000)
    assert 0 < cache.size <= cache.max_bytes == 4 << 20
    assert sum(len(k) for k in cache._data) <= cache.max_bytes
    guard.check(b"SET work_mem = '1MB' -- " + b"y" * (900 * 1024))  # under max_parse
    assert cache.size <= cache.max_bytes


def test_text_cache_evicts_oldest_first_and_refuses_big_items() -> None:
    from pgtenant.protocol.textcache import TextCache

    cache: TextCache[int] = TextCache(max_bytes=1000, max_item=300)
    cache.put(b"a" * 400, 1)
    assert len(cache) == 0 and cache.size == 0  # above max_item: never kept
    for i in range(20):
        cache.put(bytes([65 + i]) * 200, i)
    assert cache.size <= 1000 and len(cache) == 3
    assert cache.get(b"T" * 200) == 19 and cache.get(b"A" * 200) is None
    cache.clear()
    assert cache.size == 0 and len(cache) == 0


def test_classifier_caches_are_bounded_in_bytes() -> None:
    from pgtenant.protocol import sql

    for i in range(2000):
        sql.classify(b"SET work_mem = 1 -- " + str(i).encode() + b"z" * 3000)
    assert sql._cache.size <= sql._cache.max_bytes == 4 << 20
    assert sql._TREES.size <= sql._TREES.max_bytes == 1 << 20
    # Too big to parse here: the worst is assumed (server closed afterwards), no parse.
    huge = b"SET work_mem = 1; SELECT 1 -- " + b"z" * (sql.CLASSIFY_PARSE_MAX + 1)
    assert sql.classify(huge) & sql.SESSION_STATE
    assert huge not in sql._TREES and huge not in sql._cache


def test_guard_and_classifier_share_one_parse() -> None:
    from pgtenant.protocol import sql

    text = b"SET LOCAL work_mem = '2MB' -- shared parse"
    sql.classify(text)
    assert text in sql._TREES
    calls = []
    real = sql.parse_sql_json
    sql.parse_sql_json = lambda s: calls.append(s) or real(s)  # type: ignore[assignment]
    try:
        assert Guard().check(text) is None
    finally:
        sql.parse_sql_json = real
    assert calls == []


def test_outside_transaction_kind_survives_its_own_cache_entry_being_evicted() -> None:
    guard = Guard()
    assert guard.outside_transaction_kind(b"VACUUM campaigns") == "VACUUM"
    guard._outside.clear()  # as if evicted while the verdict stayed cached
    assert guard.outside_transaction_kind(b"VACUUM campaigns") == "VACUUM"


def test_a_bigger_text_is_parsed_once_for_classifier_and_guard() -> None:
    from pgtenant.protocol import sql

    text = b"UPDATE t SET a = 1 WHERE b IN (" + b",".join(b"%d" % i for i in range(4000)) + b")"
    assert sql._TREES.max_item < len(text) <= sql.CLASSIFY_PARSE_MAX
    calls = []
    real = sql.parse_sql_json
    sql.parse_sql_json = lambda s: calls.append(s) or real(s)  # type: ignore[assignment]
    try:
        sql.classify(text)
        assert Guard().check(text) is None
    finally:
        sql.parse_sql_json = real
    assert len(calls) == 1
    assert text not in sql._TREES  # kept only as the one last big tree


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT count(*) FROM pg_prepared_statements",
     "SELECT count(*) FROM pgtenant.prepared_statements(@) AS pg_prepared_statements"),
    ("select * from PG_CATALOG.pg_prepared_statements p where p.name <> ''",
     "select * from pgtenant.prepared_statements(@) p where p.name <> ''"),
    ("SELECT 1 FROM pg_prepared_statements AS a JOIN pg_catalog.pg_prepared_statements b "
     "USING (name)",
     "SELECT 1 FROM pgtenant.prepared_statements(@) AS a JOIN "
     "pgtenant.prepared_statements(@) b USING (name)"),
])
def test_pg_prepared_statements_is_read_through_the_clients_view(sql: str,
                                                                 expected: str) -> None:
    verdict = GUARD.check(sql.encode())
    assert isinstance(verdict, tuple)
    assert render(verdict, {STATEMENTS: b"@"}) == expected.encode()


def test_the_clients_statement_names_cannot_leave_their_literal() -> None:
    """Client statement names are the client's bytes: quoted so that the rendered text has
    exactly one argument, a string constant, whatever the names hold."""
    import json

    from pglast.parser import parse_sql_json

    parts = GUARD.check(b"SELECT name FROM pg_prepared_statements")
    assert isinstance(parts, tuple)
    hostile = [b"x'); SET ROLE postgres; --", b'q"\\', b"\\'", b"ok"]
    statements = {name: (b"__pgtenant_p%d" % i, b"SELECT 1", b"")
                  for i, name in enumerate(hostile)}
    text = render(parts, {STATEMENTS: client_statements(statements, itself=b"self'")})
    tree = json.loads(parse_sql_json(text.decode()))
    assert len(tree["stmts"]) == 1
    call = tree["stmts"][0]["stmt"]["SelectStmt"]["fromClause"][0]["RangeFunction"]
    func = call["functions"][0]["List"]["items"][0]["FuncCall"]
    [arg] = func["args"]
    literal = arg["TypeCast"]["arg"]["A_Const"]["sval"]["sval"]
    assert literal.startswith('{"__pgtenant_p0","x\'); SET ROLE postgres; --"')
    assert literal.endswith(',NULL,"self\'"}')


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT pg_terminate_backend(pg_backend_pid())",
     "SELECT pgtenant.pg_terminate_backend(@, pg_backend_pid())"),
    ("select PG_CATALOG . pg_terminate_backend ( $1 )",
     "select pgtenant.pg_terminate_backend(@,  $1 )"),
    ("SELECT pg_terminate_backend($1::int, 100), pg_prepared_statements.name "
     "FROM pg_prepared_statements",
     "SELECT pgtenant.pg_terminate_backend(@, $1::int, 100), pg_prepared_statements.name "
     "FROM pgtenant.prepared_statements(#) AS pg_prepared_statements"),
])
def test_pg_terminate_backend_is_given_the_clients_pid(sql: str, expected: str) -> None:
    verdict = GUARD.check(sql.encode())
    assert isinstance(verdict, tuple)
    assert render(verdict, {CLIENT_PID: b"@", STATEMENTS: b"#"}) == expected.encode()


# A function body runs later, where the guard cannot look, so it is judged when the function
# is created (issue 16: a tenant's pg_temp function ran SET ROLE to another tenant's role).
@pytest.mark.parametrize(
    ("sql", "contains"),
    [
        ("CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
         "$$ SET ROLE t_hooli; SELECT current_user::text $$", "SET role"),
        # No suspect word in the text itself: the body is an escaped string.
        ("CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS E'\\x53ET ROLE x; SELECT 1'",
         "SET role"),
        ("create or replace function pg_temp.g() returns text language SQL as "
         "'set app.entity_id = ''forged''; select ''x'''", "SET app.entity_id"),
        ("CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
         "$$ SELECT set_config('app.tenant_sig', 'x', false) $$", "set_config('app.tenant_sig'"),
        ("CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
         "$$ SELECT set_config('work_mem', '1MB', false) $$", "function body may not call"),
        ("CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS $b$ CREATE FUNCTION "
         "pg_temp.h() RETURNS int LANGUAGE sql AS 'SET search_path = x; SELECT 1'; "
         "SELECT 1 $b$", "SET search_path"),
        ("CREATE PROCEDURE pg_temp.p() LANGUAGE sql AS $$ RESET ROLE $$", "RESET role"),
        ("CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE plpgsql AS "
         "$$ BEGIN RETURN 1; END $$", "language plpgsql"),
        ("CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS $$ SELEC 1 $$",
         "cannot parse"),
        ("CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS $$ DISCARD ALL $$",
         "DISCARD"),
    ],
)
def test_function_bodies_are_judged_when_created(sql: str, contains: str) -> None:
    verdict = GUARD.check(sql.encode())
    assert isinstance(verdict, str) and contains in verdict, verdict


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE FUNCTION pg_temp.g() RETURNS int LANGUAGE sql AS "
        "$$ SET LOCAL statement_timeout = 5; SELECT 1 $$",
        "CREATE FUNCTION pg_temp.g() RETURNS int BEGIN ATOMIC SELECT 1; END",
        "SELECT 'function' AS kind",
    ],
)
def test_harmless_function_bodies_pass(sql: str) -> None:
    assert GUARD.check(sql.encode()) is None


@pytest.mark.parametrize("sql, pins", [
    (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", True), (b"PREPARE q AS SELECT 1", True),
    (b"SELECT pg_advisory_lock(1)", True), (b"CREATE TEMP TABLE t (x int)", True),
    (b"SELECT 1", False), (b"SET work_mem = '8MB'", False),  # a plain SET is replayed
])
def test_pin_capped_refuses_only_statements_that_pin_and_only_at_the_cap(
        sql: bytes, pins: bool) -> None:
    asked: list[bool] = []

    def may_pin(answer: bool) -> bool:
        asked.append(answer)
        return answer

    guard = Guard()
    under = PinCapped(guard.check, lambda: may_pin(True), lambda: 2)
    at_cap = PinCapped(guard.check, lambda: may_pin(False), lambda: 2)
    assert under(sql) == guard.check(sql)
    verdict = at_cap(sql)
    if pins:
        assert isinstance(verdict, str) and "already keep 2 (max_pinned_servers)" in verdict
    else:
        assert verdict == guard.check(sql)
        assert not asked  # the tenant's count is looked up only for statements that pin


def test_pin_capped_passes_the_guards_refusal_through() -> None:
    guard = Guard()
    capped = PinCapped(guard.check, lambda: False, lambda: 1)
    assert capped(b"SET ROLE postgres") == guard.check(b"SET ROLE postgres")
    assert isinstance(capped(b"SET ROLE postgres"), str)
