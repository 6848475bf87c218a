"""The audit's output formats: text for people, a JSON array for scripts, SARIF for code
scanning; and the exit status.

Every format takes the report and the baseline (or None) so that accepted findings are
shown as accepted everywhere (listed with their reason in text, ``"accepted": true`` in
JSON, a SARIF suppression) instead of vanishing: a reviewer must be able to see what the
baseline hides. Only ``exit_status`` treats them differently, which is the point of a
baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, Final, TextIO

from .baseline import Baseline, Entry
from .findings import CHECKS, Finding, Severity
from .runner import AuditReport

__all__ = ["exit_status", "fingerprint", "json_findings", "render_json", "render_sarif",
           "render_text", "sarif_log", "use_color"]

WIDTH: Final = 100
SARIF_SCHEMA: Final = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT: Final = "pgtenantAudit/v1"
_SARIF_LEVEL: Final = {Severity.ERROR: "error", Severity.WARNING: "warning",
                       Severity.INFO: "note"}
_COLOR: Final = {Severity.ERROR: "\033[1;31m", Severity.WARNING: "\033[1;33m",
                 Severity.INFO: "\033[1;36m"}
_DIM: Final = "\033[2m"
_RESET: Final = "\033[0m"
_HEADINGS: Final = {Severity.ERROR: "ERRORS", Severity.WARNING: "WARNINGS",
                    Severity.INFO: "INFO"}


def _accepted(report: AuditReport, baseline: Baseline | None) -> dict[int, Entry]:
    """Returns: index in ``report.findings`` -> the baseline entry accepting it."""
    if baseline is None:
        return {}
    found = {i: baseline.match(f) for i, f in enumerate(report.findings)}
    return {i: e for i, e in found.items() if e is not None}


def exit_status(report: AuditReport, baseline: Baseline | None) -> int:
    """Returns: 1 when an error finding is not accepted by the baseline, else 0 (warnings
    and info never fail the audit: they are for people to weigh, not for CI to block)."""
    return int(any(f.severity is Severity.ERROR
                   and (baseline is None or baseline.match(f) is None)
                   for f in report.findings))


def use_color(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Returns: whether to color text for ``stream``: a terminal, and NO_COLOR unset or
    empty (https://no-color.org)."""
    env = os.environ if environ is None else environ
    return not env.get("NO_COLOR") and env.get("TERM") != "dumb" and stream.isatty()


# ---------------------------------------------------------------------- text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 or word == "info" else f"{n} {word}s"


def _stats(stats: Mapping[str, int]) -> str:
    """Returns: "3 tenant roles, 5 schemas" from {"tenant_roles": 3, "schemas": 5}."""
    return ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in stats.items())


def _wrap(text: str, indent: str, first: str = "") -> list[str]:
    """Returns: ``text`` wrapped at WIDTH, each paragraph (line of ``text``) on its own."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, WIDTH, initial_indent=indent + first,
                                   subsequent_indent=indent + " " * len(first),
                                   break_long_words=False, break_on_hyphens=False)
                     or [indent + first.rstrip()])
        first = " " * len(first)
    return lines


def _target(f: Finding) -> str:
    return f"{f.object} ({f.subject})" if f.subject else f.object


def _finding_lines(f: Finding, paint: Callable[[str, Severity | None], str]) -> list[str]:
    lines = [paint(f"  {CHECKS[f.check].title}", f.severity) + f"  [{f.check}]"]
    lines.append(f"    object:  {f.object}")
    if f.subject:
        lines.append(f"    subject: {f.subject}")
    lines.extend(_wrap(f.message, "    "))
    lines.extend(_wrap(f.why, "    ", "why: "))
    if f.fix:
        lines.append("    fix:")
        lines.extend(f"      {line}".rstrip() for line in f.fix.strip("\n").splitlines())
    return lines


def render_text(report: AuditReport, baseline: Baseline | None, *,
                min_severity: Severity = Severity.INFO, color: bool = False) -> str:
    """Returns: the report for a person: a header, the findings grouped by severity (errors
    first) with why and the fixing SQL, the accepted ones briefly with their reasons, a
    summary line and the stale baseline entries. ``min_severity`` hides lesser findings
    (the summary still counts them, and says how many were hidden)."""

    def paint(text: str, severity: Severity | None) -> str:
        if not color:
            return text
        return (_COLOR[severity] if severity is not None else _DIM) + text + _RESET

    accepted = _accepted(report, baseline)
    open_ = [f for i, f in enumerate(report.findings) if i not in accepted]
    out = [f"pgtenant audit of database {report.database!r}: "
           + (_stats(report.stats) + " " if report.stats else "")
           + f"({report.seconds:.2f} s)"]
    for severity in sorted(Severity, reverse=True):
        if severity < min_severity:
            continue
        group = [f for f in open_ if f.severity is severity]
        if not group:
            continue
        out.append("")
        out.append(paint(f"{_HEADINGS[severity]} ({len(group)})", severity))
        for f in group:
            out.extend(_finding_lines(f, paint))
            out.append("")
        out.pop()
    if accepted:
        out.append("")
        out.append(paint(f"ACCEPTED BY THE BASELINE ({len(accepted)})", None))
        for i, entry in sorted(accepted.items()):
            f = report.findings[i]
            out.append(f"  {f.severity.label:<7} {f.check}  {_target(f)}")
            out.extend(_wrap(entry.reason, "          ", "reason: "))
    counts = {s: sum(1 for f in open_ if f.severity is s) for s in Severity}
    hidden = sum(1 for f in open_ if f.severity < min_severity)
    out.append("")
    out.append(", ".join((_plural(counts[Severity.ERROR], "error"),
                          _plural(counts[Severity.WARNING], "warning"),
                          _plural(counts[Severity.INFO], "info")))
               + f" ({len(accepted)} accepted by the baseline)"
               + (f"; {hidden} below --min-severity {min_severity.label} not shown"
                  if hidden else ""))
    if baseline is not None:
        for entry in baseline.unused(report.findings):
            out.extend(_wrap(f"{baseline.path} entry {entry.number} ({entry.describe()}) "
                             "matches no finding: remove it", "", "note: stale baseline: "))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- JSON


def json_findings(report: AuditReport, baseline: Baseline | None) -> list[dict[str, Any]]:
    """Returns: each finding's JSON object plus ``accepted`` (and ``reason`` when true)."""
    accepted = _accepted(report, baseline)
    out = []
    for i, f in enumerate(report.findings):
        item = f.to_json()
        item["accepted"] = i in accepted
        if i in accepted:
            item["reason"] = accepted[i].reason
        out.append(item)
    return out


def render_json(report: AuditReport, baseline: Baseline | None) -> str:
    """Returns: a JSON array of findings (one array, so ``jq '.[]'`` and friends need no
    envelope knowledge); each has check, severity, object, subject, kind, message, why,
    fix and accepted."""
    return json.dumps(json_findings(report, baseline), indent=2)


# ---------------------------------------------------------------------- SARIF


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgtenant")
    except PackageNotFoundError:
        return "0"


def fingerprint(f: Finding) -> str:
    """Returns: the stable identity of ``f`` across runs (what code scanning tracks a
    result by): sha256 of check|object|subject, the same key a baseline entry matches."""
    return hashlib.sha256("|".join(f.key).encode()).hexdigest()


def _rules(report: AuditReport) -> list[dict[str, Any]]:
    """Returns: one rule per check. A check has no severity of its own (the same check may
    find an error in one object and a warning in another), so a rule's default level is
    the worst this run found for it, else SARIF's own default, warning."""
    worst: dict[str, Severity] = {}
    for f in report.findings:
        worst[f.check] = max(worst.get(f.check, f.severity), f.severity)
    return [{"id": c.name, "name": c.name,
             "shortDescription": {"text": c.title},
             "fullDescription": {"text": c.why},
             "help": {"text": c.why},
             "defaultConfiguration": {"level": _SARIF_LEVEL[worst.get(c.name,
                                                                      Severity.WARNING)]}}
            for c in CHECKS.values()]


def sarif_log(report: AuditReport, baseline: Baseline | None) -> dict[str, Any]:
    """Returns: the SARIF 2.1.0 log: one run, every check a rule, every finding a result
    located by its database object (a logical location: it has no file), accepted ones
    carrying an external suppression with the baseline's reason."""
    accepted = _accepted(report, baseline)
    index = {name: i for i, name in enumerate(CHECKS)}
    results = []
    for i, f in enumerate(report.findings):
        result: dict[str, Any] = {
            "ruleId": f.check,
            "ruleIndex": index[f.check],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": f.message + (f" (subject: {f.subject})" if f.subject else "")},
            "locations": [{"logicalLocations": [
                {"fullyQualifiedName": f.object, "kind": f.kind or "object"}]}],
            "partialFingerprints": {FINGERPRINT: fingerprint(f)},
            "properties": {"subject": f.subject, "fix": f.fix},
        }
        if i in accepted:
            result["suppressions"] = [{"kind": "external",
                                       "justification": accepted[i].reason}]
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "pgtenant-audit", "version": _version(),
                                "rules": _rules(report)}},
            "results": results,
            "properties": {"database": report.database, "stats": dict(report.stats),
                           "seconds": round(report.seconds, 3)},
        }],
    }


def render_sarif(report: AuditReport, baseline: Baseline | None) -> str:
    """Returns: ``sarif_log`` as JSON text."""
    return json.dumps(sarif_log(report, baseline), indent=2)
