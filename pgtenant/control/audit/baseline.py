"""The audit baseline: findings a team accepted on purpose, each with its written reason.

A database that has grown for years rarely passes a new audit on the first day; without a
way to say "this one is known and fine" a team either never adopts the audit or learns to
ignore its exit status. The baseline is that way, kept honest by three rules: every entry
names a real check and object, every entry carries a reason a reviewer can read (an empty
one is refused, so ``write_baseline`` cannot be committed unread), and entries that no
longer match anything are reported as stale so the file does not rot into a blanket pass.

The file is TOML, one ``[[accept]]`` table per accepted finding::

    [[accept]]
    check = "cross_type_access"
    object = "tenant_b.entity_data"
    subject = "tenant_sme"     # optional; absent = any subject
    reason = "read-only and RLS-scoped: the unified view reads it"
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .findings import CHECKS, Finding, sort_findings

__all__ = ["Baseline", "BaselineError", "Entry", "load_baseline", "write_baseline"]

_KEYS: Final = ("check", "object", "subject", "reason")
_HEADER: Final = (
    "# pgtenant audit baseline: findings accepted on purpose; every entry needs a reason.\n"
)


class BaselineError(ValueError):
    """A baseline file that cannot be trusted: unreadable, or an entry that is incomplete
    or names a check that does not exist. The message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted finding. ``subject`` None matches any subject (the file left it out);
    "" matches only findings about the object alone. ``number`` is the entry's position in
    the file (1-based), so messages about it can point there."""

    check: str
    object: str
    subject: str | None
    reason: str
    number: int = 0

    def matches(self, finding: Finding) -> bool:
        return (finding.check == self.check and finding.object == self.object
                and (self.subject is None or finding.subject == self.subject))

    def describe(self) -> str:
        """Returns: "check object" (and "subject ..." when it names one), for messages."""
        subject = f" subject {self.subject!r}" if self.subject is not None else ""
        return f"{self.check} {self.object}{subject}"


@dataclass(frozen=True, slots=True)
class Baseline:
    """The entries of one baseline file, in file order."""

    path: str
    entries: tuple[Entry, ...]

    def match(self, finding: Finding) -> Entry | None:
        """Returns: the entry accepting ``finding``, or None. An entry naming the finding's
        subject wins over one that accepts any subject (its reason is the specific one)."""
        loose: Entry | None = None
        for entry in self.entries:
            if entry.matches(finding):
                if entry.subject is not None:
                    return entry
                loose = loose or entry
        return loose

    def unused(self, findings: Iterable[Finding]) -> list[Entry]:
        """Returns: the entries no finding matches (stale: the hole was fixed or the object
        renamed). They accept nothing today but would silently accept a hole tomorrow."""
        found = list(findings)
        return [e for e in self.entries if not any(e.matches(f) for f in found)]


def _where(path: str | Path, number: int) -> str:
    return f"{path}: [[accept]] entry {number}"


def _text(raw: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise BaselineError(f"{where}: {key!r} is missing")
        return None
    if not isinstance(value, str):
        raise BaselineError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _entry(raw: Any, path: str | Path, number: int) -> Entry:
    where = _where(path, number)
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: expected a table of check, object, subject, reason")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise BaselineError(f"{where}: unknown key {unknown[0]!r} (allowed: "
                            f"{', '.join(_KEYS)})")
    check = _text(raw, "check", where) or ""
    if check not in CHECKS:
        close = difflib.get_close_matches(check, CHECKS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "the SARIF rules list every name"
        raise BaselineError(f"{where}: unknown check {check!r} ({hint})")
    obj = _text(raw, "object", where) or ""
    if not obj.strip():
        raise BaselineError(f"{where}: 'object' is empty")
    reason = (_text(raw, "reason", where) or "").strip()
    if not reason:
        raise BaselineError(f"{where}: 'reason' is empty for {check} {obj}: write why this "
                            "finding is accepted")
    subject = _text(raw, "subject", where, required=False)
    return Entry(check=check, object=obj, subject=subject, reason=reason, number=number)


def load_baseline(path: str | Path) -> Baseline:
    """Returns: the baseline at ``path``.
    Raises: BaselineError naming the file (and the entry) for an unreadable file, TOML that
    does not parse, an unknown key, an unknown check, or a missing check, object or reason."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read the baseline: {exc.strerror or exc}") \
            from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"accept"})
    if unknown:
        raise BaselineError(f"{path}: unknown key {unknown[0]!r} (a baseline holds only "
                            "[[accept]] entries)")
    raw = data.get("accept", [])
    if not isinstance(raw, list):
        raise BaselineError(f"{path}: 'accept' must be a list of [[accept]] tables")
    return Baseline(str(path), tuple(_entry(r, path, n) for n, r in enumerate(raw, 1)))


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                   "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """Returns: ``text`` as a TOML basic string: backslash, quote and every control
    character escaped (object names are identifiers a user chose, and may hold any)."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    """Returns: ``text`` as '# ' lines (a message may span lines; none may end the comment)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def write_baseline(path: str | Path, findings: Iterable[Finding], *,
                   keep: Baseline | None = None) -> int:
    """Write every finding to ``path`` as an ``[[accept]]`` entry with an empty reason.

    The adoption workflow: the team reads each entry (its message is the comment above it),
    writes why it is accepted or fixes the hole and deletes the entry; until then the file
    does not load, so it cannot be committed as a blanket pass. Each entry names the
    finding's exact subject ("" included), so it accepts that finding and no other.
    ``keep``: a baseline whose reasons are carried over for findings it still accepts, so a
    re-run after new findings appear only leaves the new ones to write.
    Returns: the number of entries written.
    """
    unique = sort_findings(list(findings))
    parts = [_HEADER,
             "# Written by `pgtenant audit --write-baseline`: fill in every reason (an empty\n"
             "# one is refused), or fix the finding and delete its entry.\n"]
    for f in unique:
        kept = keep.match(f) if keep is not None else None
        parts.append("\n" + _comment(f"{f.severity.label}: {f.message}"))
        parts.append("[[accept]]\n"
                     f"check = {toml_string(f.check)}\n"
                     f"object = {toml_string(f.object)}\n"
                     f"subject = {toml_string(f.subject)}\n"
                     f"reason = {toml_string(kept.reason if kept else '')}\n")
    Path(path).write_text("".join(parts), encoding="utf-8")
    return len(unique)
