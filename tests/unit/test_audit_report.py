"""The audit's baseline, report formats, exit status and CLI: pure, no database.

Findings are built by hand; the CLI tests replace ``run_audit`` (and ``run_probe``) with
stand-ins, so they exercise argument handling, output and exit codes only.
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from pgtenant import cli
from pgtenant.config import Config
from pgtenant.control.audit import probe as probe_module
from pgtenant.control.audit import runner as runner_module
from pgtenant.control.audit.baseline import (
    Baseline,
    BaselineError,
    Entry,
    load_baseline,
    toml_string,
    write_baseline,
)
from pgtenant.control.audit.findings import CHECKS, Finding, Severity, sort_findings
from pgtenant.control.audit.report import (
    exit_status,
    render_json,
    render_sarif,
    render_text,
    sarif_log,
    use_color,
)
from pgtenant.control.audit.runner import AuditReport

RLS = Finding("rls_disabled", Severity.ERROR, "tenant_a.orders",
              "tenant_a.orders has no row-level security; tenant_sme can read and write it",
              "ALTER TABLE tenant_a.orders ENABLE ROW LEVEL SECURITY;\n"
              "ALTER TABLE tenant_a.orders FORCE ROW LEVEL SECURITY;",
              subject="tenant_sme", kind="table")
CROSS = Finding("cross_type_access", Severity.ERROR, "tenant_b.entity_data",
                "tenant_sme can SELECT tenant_b.entity_data (type agency)",
                "REVOKE SELECT ON tenant_b.entity_data FROM tenant_sme;",
                subject="tenant_sme", kind="table")
INDEX = Finding("tenant_index_missing", Severity.WARNING, "tenant_a.orders",
                "no index starts with tenant_id", "CREATE INDEX ON tenant_a.orders (tenant_id);",
                kind="table")
TEMP = Finding("tenant_temp", Severity.INFO, "tenant_sme", "tenant_sme may create temp tables",
               "REVOKE TEMP ON DATABASE app FROM tenant_sme;", kind="role")
ALL = [RLS, CROSS, INDEX, TEMP]


def report(*findings: Finding) -> AuditReport:
    return AuditReport("app", sort_findings(list(findings)),
                       {"tenant_roles": 3, "schemas": 5, "tables": 12}, 0.25)


def baseline_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "baseline.toml"
    path.write_text(text)
    return path


def accept(check: str = "cross_type_access", obj: str = "tenant_b.entity_data",
           subject: str | None = "tenant_sme", reason: str = "read-only, RLS-scoped") -> str:
    lines = ["[[accept]]", f"check = {toml_string(check)}", f"object = {toml_string(obj)}"]
    if subject is not None:
        lines.append(f"subject = {toml_string(subject)}")
    lines.append(f"reason = {toml_string(reason)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- baseline: loading


def test_baseline_loads_entries_in_file_order(tmp_path: Path) -> None:
    path = baseline_file(tmp_path, "# comment\n" + accept() + accept("rls_disabled",
                                                                     "tenant_a.orders", None))
    b = load_baseline(path)
    assert b.path == str(path)
    assert b.entries == (
        Entry("cross_type_access", "tenant_b.entity_data", "tenant_sme",
              "read-only, RLS-scoped", 1),
        Entry("rls_disabled", "tenant_a.orders", None, "read-only, RLS-scoped", 2),
    )


def test_empty_baseline_file_has_no_entries(tmp_path: Path) -> None:
    assert load_baseline(baseline_file(tmp_path, "# nothing accepted\n")).entries == ()


@pytest.mark.parametrize(("text", "expected"), [
    (accept() + "[[accept]]\ncheck = \"rls_disabled\"\nobject = \"a.b\"\nreason = \"x\"\n"
     "resaon = \"typo\"\n", r"entry 2: unknown key 'resaon'"),
    (accept(check="rls_disbled"), r"entry 1: unknown check 'rls_disbled' \(did you mean "
                                  r"'rls_disabled'\?\)"),
    (accept(check="no_such_thing_at_all"), r"entry 1: unknown check 'no_such_thing_at_all'"),
    (accept(reason=""), r"entry 1: 'reason' is empty for cross_type_access "
                        r"tenant_b\.entity_data"),
    (accept(reason="   "), r"entry 1: 'reason' is empty"),
    ("[[accept]]\ncheck = \"rls_disabled\"\nobject = \"a.b\"\n", r"entry 1: 'reason' is missing"),
    ("[[accept]]\ncheck = \"rls_disabled\"\nreason = \"x\"\n", r"entry 1: 'object' is missing"),
    ("[[accept]]\nobject = \"a.b\"\nreason = \"x\"\n", r"entry 1: 'check' is missing"),
    (accept(obj=""), r"entry 1: 'object' is empty"),
    ("[[accept]]\ncheck = \"rls_disabled\"\nobject = 3\nreason = \"x\"\n",
     r"entry 1: 'object' must be a string"),
    ("[accept]\ncheck = \"rls_disabled\"\n", r"'accept' must be a list"),
    ("[[except]]\ncheck = \"rls_disabled\"\n", r"unknown key 'except'"),
    ("[[accept]\n", r"not valid TOML"),
])
def test_bad_baseline_is_refused_naming_file_and_entry(tmp_path: Path, text: str,
                                                       expected: str) -> None:
    path = baseline_file(tmp_path, text)
    with pytest.raises(BaselineError, match=expected) as info:
        load_baseline(path)
    assert str(info.value).startswith(str(path))


def test_missing_baseline_file_is_a_baseline_error(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="cannot read the baseline"):
        load_baseline(tmp_path / "absent.toml")


# ---------------------------------------------------------------------- baseline: matching


def test_match_with_subject_accepts_only_that_subject() -> None:
    entry = Entry("cross_type_access", "tenant_b.entity_data", "tenant_sme", "ok", 1)
    b = Baseline("b.toml", (entry,))
    assert b.match(CROSS) is entry
    other = Finding("cross_type_access", Severity.ERROR, "tenant_b.entity_data", "m", "f",
                    subject="tenant_other")
    assert b.match(other) is None
    assert b.match(RLS) is None


def test_match_without_subject_accepts_any_subject_but_exact_subject_wins() -> None:
    loose = Entry("cross_type_access", "tenant_b.entity_data", None, "any role", 1)
    exact = Entry("cross_type_access", "tenant_b.entity_data", "tenant_sme", "this role", 2)
    other = Finding("cross_type_access", Severity.ERROR, "tenant_b.entity_data", "m", "f",
                    subject="tenant_other")
    b = Baseline("b.toml", (loose, exact))
    assert b.match(other) is loose
    assert b.match(CROSS) is exact


def test_empty_subject_matches_only_findings_about_the_object_alone() -> None:
    entry = Entry("tenant_index_missing", "tenant_a.orders", "", "small table", 1)
    b = Baseline("b.toml", (entry,))
    assert b.match(INDEX) is entry
    assert b.match(Finding("tenant_index_missing", Severity.WARNING, "tenant_a.orders", "m",
                           "f", subject="x")) is None


def test_unused_entries_are_the_stale_ones() -> None:
    used = Entry("cross_type_access", "tenant_b.entity_data", None, "ok", 1)
    stale = Entry("rls_disabled", "tenant_gone.orders", None, "was fine", 2)
    assert Baseline("b.toml", (used, stale)).unused(ALL) == [stale]
    assert Baseline("b.toml", (used, stale)).unused([]) == [used, stale]


# ---------------------------------------------------------------------- baseline: writing


def test_toml_string_escapes_quotes_backslashes_and_control_characters() -> None:
    nasty = 'a"b\\c\nd\te\x01f\x7fg é'
    assert toml_string(nasty) == '"a\\"b\\\\c\\nd\\te\\u0001f\\u007Fg é"'
    assert tomllib.loads(f"x = {toml_string(nasty)}")["x"] == nasty


def test_written_baseline_is_refused_until_every_reason_is_written(tmp_path: Path) -> None:
    weird = Finding("rls_disabled", Severity.ERROR, 'odd"schema.ta\\ble\nx',
                    "a message\nover two lines", "fix", subject="role\tname")
    findings = [*ALL, weird, RLS]  # RLS twice: written once
    path = tmp_path / "baseline.toml"
    assert write_baseline(path, findings) == 5
    text = path.read_text()
    assert text.startswith("# pgtenant audit baseline:")
    assert "# error: a message\n# over two lines\n[[accept]]" in text
    assert f"# error: {RLS.message}\n[[accept]]" in text
    with pytest.raises(BaselineError, match="entry 1: 'reason' is empty"):
        load_baseline(path)

    path.write_text(text.replace('reason = ""', 'reason = "reviewed"'))
    b = load_baseline(path)
    assert len(b.entries) == 5
    assert all(b.match(f) is not None for f in findings)
    matched = b.match(weird)
    assert matched is not None and (matched.object, matched.subject) == (weird.object,
                                                                         weird.subject)
    assert b.unused(findings) == []
    # Each entry is exact: it names the finding's subject, "" included.
    assert b.match(Finding("tenant_index_missing", Severity.WARNING, "tenant_a.orders", "m",
                           "f", subject="someone")) is None


def test_write_baseline_keeps_reasons_of_a_previous_baseline(tmp_path: Path) -> None:
    keep = Baseline("old.toml", (Entry("cross_type_access", "tenant_b.entity_data", None,
                                       "the unified view reads it", 1),))
    path = tmp_path / "new.toml"
    write_baseline(path, ALL, keep=keep)
    data = tomllib.loads(path.read_text())
    reasons = {e["check"]: e["reason"] for e in data["accept"]}
    assert reasons["cross_type_access"] == "the unified view reads it"
    assert reasons["rls_disabled"] == ""


# ---------------------------------------------------------------------- JSON


def test_json_is_an_array_of_findings_with_the_required_keys() -> None:
    b = Baseline("b.toml", (Entry("cross_type_access", "tenant_b.entity_data", None,
                                  "read-only", 1),))
    data = json.loads(render_json(report(*ALL), b))
    assert isinstance(data, list) and len(data) == 4
    for item in data:
        assert {"check", "severity", "object", "message", "fix", "subject", "why",
                "accepted"} <= set(item)
    by_check = {item["check"]: item for item in data}
    assert by_check["cross_type_access"]["accepted"] is True
    assert by_check["cross_type_access"]["reason"] == "read-only"
    assert by_check["rls_disabled"]["accepted"] is False
    assert "reason" not in by_check["rls_disabled"]
    assert [item["severity"] for item in data] == ["error", "error", "warning", "info"]
    assert json.loads(render_json(report(), None)) == []


# ---------------------------------------------------------------------- SARIF


def test_sarif_log_has_the_required_structure() -> None:
    b = Baseline("b.toml", (Entry("cross_type_access", "tenant_b.entity_data", "tenant_sme",
                                  "read-only", 1),))
    log = json.loads(render_sarif(report(*ALL), b))
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert log["version"] == "2.1.0"
    assert len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "pgtenant-audit" and isinstance(driver["version"], str)
    rules = driver["rules"]
    assert [r["id"] for r in rules] == list(CHECKS)
    for rule in rules:
        check = CHECKS[rule["id"]]
        assert rule["shortDescription"]["text"] == check.title
        assert rule["fullDescription"]["text"] == check.why == rule["help"]["text"]
        assert rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
    levels = {r["id"]: r["defaultConfiguration"]["level"] for r in rules}
    assert levels["rls_disabled"] == "error" and levels["tenant_temp"] == "note"
    assert levels["probe_read"] == "warning"  # nothing found: SARIF's default

    results = run["results"]
    assert len(results) == 4
    by_rule = {r["ruleId"]: r for r in results}
    assert {r: by_rule[r]["level"] for r in by_rule} == {
        "rls_disabled": "error", "cross_type_access": "error",
        "tenant_index_missing": "warning", "tenant_temp": "note"}
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["message"]["text"]
        (location,) = result["locations"]
        (logical,) = location["logicalLocations"]
        assert logical["fullyQualifiedName"]
    rls = by_rule["rls_disabled"]
    assert rls["message"]["text"] == f"{RLS.message} (subject: tenant_sme)"
    assert rls["locations"][0]["logicalLocations"][0] == {
        "fullyQualifiedName": "tenant_a.orders", "kind": "table"}
    assert rls["partialFingerprints"]["pgtenantAudit/v1"] == hashlib.sha256(
        b"rls_disabled|tenant_a.orders|tenant_sme").hexdigest()
    assert "suppressions" not in rls
    assert by_rule["cross_type_access"]["suppressions"] == [
        {"kind": "external", "justification": "read-only"}]
    assert by_rule["tenant_temp"]["locations"][0]["logicalLocations"][0]["kind"] == "role"


def test_sarif_kind_defaults_to_object_and_fingerprints_differ_by_subject() -> None:
    a = Finding("tenant_temp", Severity.INFO, "x", "m", "f", subject="r1")
    b = Finding("tenant_temp", Severity.INFO, "x", "m", "f", subject="r2")
    results = sarif_log(report(a, b), None)["runs"][0]["results"]
    assert {r["locations"][0]["logicalLocations"][0]["kind"] for r in results} == {"object"}
    assert len({r["partialFingerprints"]["pgtenantAudit/v1"] for r in results}) == 2


# ---------------------------------------------------------------------- text


def test_text_groups_by_severity_errors_first_and_shows_fix_sql() -> None:
    text = render_text(report(TEMP, INDEX, RLS), None)
    lines = text.splitlines()
    assert lines[0] == ("pgtenant audit of database 'app': 3 tenant roles, 5 schemas, "
                        "12 tables (0.25 s)")
    assert text.index("ERRORS (1)") < text.index("WARNINGS (1)") < text.index("INFO (1)")
    assert text.index(CHECKS["rls_disabled"].title) < text.index("WARNINGS (1)")
    assert "    subject: tenant_sme" in lines
    assert "    fix:" in lines
    assert "      ALTER TABLE tenant_a.orders ENABLE ROW LEVEL SECURITY;" in lines
    assert "      ALTER TABLE tenant_a.orders FORCE ROW LEVEL SECURITY;" in lines
    assert any(line.startswith("    why: A tenant role can read or write it") for line in lines)
    assert lines[-1] == "1 error, 1 warning, 1 info (0 accepted by the baseline)"
    assert all(len(line) <= 100 for line in lines)
    assert "\033[" not in text


def test_text_lists_accepted_findings_with_their_reason_and_stale_entries() -> None:
    b = Baseline("b.toml", (
        Entry("cross_type_access", "tenant_b.entity_data", None, "the unified view reads it", 1),
        Entry("rls_disabled", "tenant_gone.t", None, "gone", 2)))
    text = render_text(report(*ALL), b)
    accepted = text.index("ACCEPTED BY THE BASELINE (1)")
    assert text.index("ERRORS (1)") < accepted
    assert "error   cross_type_access  tenant_b.entity_data (tenant_sme)" in text[accepted:]
    assert "reason: the unified view reads it" in text[accepted:]
    assert CHECKS["cross_type_access"].title not in text  # not listed among the open ones
    assert "1 error, 1 warning, 1 info (1 accepted by the baseline)" in text
    assert "note: stale baseline: b.toml entry 2 (rls_disabled tenant_gone.t) matches no " \
           "finding" in text


def test_min_severity_hides_lesser_findings_but_counts_them() -> None:
    text = render_text(report(*ALL), None, min_severity=Severity.ERROR)
    assert "ERRORS (2)" in text and "WARNINGS" not in text and "INFO (" not in text
    assert text.splitlines()[-1] == ("2 errors, 1 warning, 1 info (0 accepted by the "
                                     "baseline); 2 below --min-severity error not shown")


def test_color_only_on_a_terminal_without_no_color() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_color(Tty(), {}) is True
    assert use_color(Tty(), {"NO_COLOR": "1"}) is False
    assert use_color(Tty(), {"NO_COLOR": ""}) is True  # no-color.org: empty means unset
    assert use_color(io.StringIO(), {}) is False
    assert "\033[1;31mERRORS (2)" in render_text(report(*ALL), None, color=True)


# ---------------------------------------------------------------------- exit status


def test_exit_status() -> None:
    assert exit_status(report(), None) == 0
    assert exit_status(report(INDEX, TEMP), None) == 0
    assert exit_status(report(RLS, INDEX), None) == 1
    only_cross = Baseline("b.toml", (Entry("cross_type_access", "tenant_b.entity_data", None,
                                           "ok", 1),))
    assert exit_status(report(CROSS, INDEX), only_cross) == 0
    assert exit_status(report(CROSS, RLS), only_cross) == 1
    assert exit_status(report(RLS), Baseline("b.toml", ())) == 1


# ---------------------------------------------------------------------- CLI


def test_audit_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--dsn", "--config", "--json", "--sarif", "--baseline", "--write-baseline",
                   "--probe", "--proxy", "--min-severity"):
        assert option in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "pgtenant audit --dsn URL" in capsys.readouterr().out


def test_json_and_sarif_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", "--dsn", "postgresql://u@h/app", "--json", "--sarif"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


DSN = "postgresql://admin:s3cret@127.0.0.1:1/app"


@pytest.fixture
def config_path(tmp_path: Path) -> str:
    path = tmp_path / "pgtenant.toml"
    path.write_text('listen = "0.0.0.0:7432"\n[databases.app]\n'
                    'dsn = "postgresql://proxy:pw@127.0.0.1:5432/app"\n'
                    '[tenant_types.sme]\nrole = "tenant_sme"\n')
    return str(path)


@pytest.fixture
def fake_audit(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """run_audit returns ALL; run_probe returns one probe finding. Returns: the calls."""
    calls: list[Any] = []

    async def run_audit(admin_dsn: str, config: Config, *,
                        schemas: Collection[str] | None = None) -> AuditReport:
        calls.append(("audit", admin_dsn))
        return report(INDEX, TEMP, RLS, CROSS)

    async def run_probe(admin_dsn: str, config: Config, *, host: str, port: int,
                        tenant_columns: tuple[str, ...] = ()) -> list[Finding]:
        calls.append(("probe", host, port))
        return [Finding("probe_read", Severity.ERROR, "tenant_b.entity_data", "read 3 rows",
                        "see cross_type_access", subject="acme")]

    monkeypatch.setattr(runner_module, "run_audit", run_audit)
    monkeypatch.setattr(probe_module, "run_probe", run_probe)
    return calls


def test_cli_text_exit_1_on_errors(config_path: str, fake_audit: list[Any],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--dsn", DSN, "--config", config_path]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (2)" in out and out.endswith("(0 accepted by the baseline)\n")
    assert fake_audit == [("audit", DSN)]


def test_cli_json_with_baseline_and_probe(config_path: str, fake_audit: list[Any],
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = baseline_file(tmp_path, accept() + accept("rls_disabled", "tenant_a.orders", None)
                         + accept("probe_read", "tenant_b.entity_data", None)
                         + accept("tenant_temp", "tenant_gone", None))
    argv = ["audit", "--dsn", DSN, "--config", config_path, "--json", "--baseline", str(path),
            "--probe"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [d["severity"] for d in data] == ["error", "error", "error", "warning", "info"]
    assert {d["check"] for d in data if d["accepted"]} == {"cross_type_access", "probe_read",
                                                           "rls_disabled"}
    assert "stale baseline" in captured.err and "entry 4" in captured.err
    assert fake_audit == [("audit", DSN), ("probe", "127.0.0.1", 7432)]

    assert cli.main([*argv, "--proxy", "db.local:6000"]) == 0
    assert fake_audit[-1] == ("probe", "db.local", 6000)


def test_cli_write_baseline(config_path: str, fake_audit: list[Any], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "new.toml"
    assert cli.main(["audit", "--dsn", DSN, "--config", config_path,
                     "--write-baseline", str(path)]) == 0
    assert "wrote 4 [[accept]] entries" in capsys.readouterr().out
    assert len(tomllib.loads(path.read_text())["accept"]) == 4
    assert cli.main(["audit", "--dsn", DSN, "--config", config_path,
                     "--baseline", str(path)]) == 2
    assert "'reason' is empty" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expected"), [
    (["--baseline", "/nonexistent/b.toml"], "pgtenant audit: /nonexistent/b.toml: cannot read"),
    (["--proxy", "h:1"], "add --probe"),
    (["--probe", "--proxy", "nonsense"], "--proxy: expected 'host:port'"),
])
def test_cli_refusals_exit_2_with_one_line(config_path: str, fake_audit: list[Any],
                                           capsys: pytest.CaptureFixture[str],
                                           extra: list[str], expected: str) -> None:
    assert cli.main(["audit", "--dsn", DSN, "--config", config_path, *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert fake_audit == []


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--dsn", DSN, "--config", str(tmp_path / "none.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = 3\n")
    assert cli.main(["audit", "--dsn", DSN, "--config", str(bad)]) == 2
    assert "config error" in capsys.readouterr().err


def test_cli_unreachable_database_exits_2_without_the_password(
        config_path: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    async def refused(admin_dsn: str, config: Config, *,
                      schemas: Collection[str] | None = None) -> AuditReport:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")

    monkeypatch.setattr(runner_module, "run_audit", refused)
    assert cli.main(["audit", "--dsn", DSN, "--config", config_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgtenant audit: cannot connect to PostgreSQL at 127.0.0.1:1 "
                          "(connection refused")
    assert "s3cret" not in err and err.count("\n") == 1


def test_sort_findings_keeps_one_per_key_the_worst_and_orders_worst_first() -> None:
    latent = Finding("cross_tenant_access", Severity.WARNING, "t_b.x", "latent", "fix",
                     subject="t_a")
    live = Finding("cross_tenant_access", Severity.ERROR, "t_b.x", "live", "fix",
                   subject="t_a")
    index = Finding("tenant_index_missing", Severity.WARNING, "public.a", "m", "fix")
    for order in ([latent, live, index], [live, latent, index], [index, live, latent]):
        assert sort_findings(order) == [live, index]
