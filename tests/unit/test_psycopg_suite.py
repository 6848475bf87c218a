"""benchmarks/psycopg_suite.py: the skip path and the junit summary. No cluster, no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.psycopg_suite import group_failures, parse_junit

ROOT = Path(__file__).resolve().parents[2]

JUNIT = """\
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="3" skipped="1" tests="7">
  <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
  <testcase classname="tests.test_a" name="test_ok2" time="0.1"/>
  <testcase classname="tests.test_a" name="test_listen" time="0.1">
    <failure message="psycopg.errors.FeatureNotSupported: LISTEN is not supported&#10;more">
      traceback</failure>
  </testcase>
  <testcase classname="tests.test_b" name="test_listen2" time="0.1">
    <failure message="psycopg.errors.FeatureNotSupported: LISTEN is not supported">x</failure>
  </testcase>
  <testcase classname="tests.test_b" name="test_prepare" time="0.1">
    <failure>AssertionError: assert 1 == 2
second line</failure>
  </testcase>
  <testcase classname="tests.test_c" name="test_setup" time="0.1">
    <error message="failed on setup with &quot;OperationalError: boom&quot;">tb</error>
  </testcase>
  <testcase classname="tests.test_c" name="test_skip" time="0.0">
    <skipped type="pytest.skip" message="needs superuser">why</skipped>
  </testcase>
</testsuite></testsuites>
"""


def test_missing_sources_skip_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.psycopg_suite", "--psycopg", "/nonexistent"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1


def test_junit_summary_groups_failures(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    summary = parse_junit(path)
    assert (summary["tests"], summary["passed"], summary["failed"], summary["errors"],
            summary["skipped"]) == (7, 2, 3, 1, 1)
    assert summary["groups"][0] == [
        "[failure] psycopg.errors.FeatureNotSupported: LISTEN is not supported", 2]
    assert sorted(map(tuple, summary["groups"][1:])) == [
        ("[error] failed on setup with \"OperationalError: boom\"", 1),
        ("[failure] AssertionError: assert 1 == 2", 1),
    ]
    assert "tests.test_c::test_setup" in summary["failures"]
    assert "tests.test_c::test_skip" not in summary["failures"]


def test_group_failures_top_n() -> None:
    messages = ["a\nx", "a\ny", "b", "c", "c", "c"]
    assert group_failures(messages, top=2) == [("c", 3), ("a", 2)]
