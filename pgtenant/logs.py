"""Log output: text lines or one JSON object per line (``log_format``, issue #5).

Connection lines (login, disconnect, refused transaction) carry structured fields through
``extra={"fields": {...}}``: client, user, database, tenant, tenant_type, reason, sqlstate.
The text format shows them in the message already; the JSON format adds them as keys, so a
log pipeline can filter by tenant without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "escape", "fields", "setup_logging"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape(text: str) -> str:
    """Returns: ``text`` with every non-printable character (newlines, other controls, line
    separators, bidi overrides...) written as a Python escape, so text a client chose (user,
    database, application_name, error text) cannot start a forged log line."""
    if text.isprintable():  # the common case, one C-level scan
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class TextFormatter(logging.Formatter):
    """Text lines, one per record: the message is escaped (see ``escape``); a traceback,
    which the formatter appends after it, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update({k: v for k, v in extra.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text", worker: str | None = None) -> None:
    """Route every logger to stderr at ``level``, as text lines or JSON objects; with
    ``serve --workers``, each line names its process (``worker``: an index or supervisor)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        if worker is not None:
            handler.addFilter(_WorkerTag(worker))
    else:
        text = _TEXT_FORMAT if worker is None else _TEXT_FORMAT.replace(
            "%(name)s", f"%(name)s[{worker}]")
        handler.setFormatter(TextFormatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


class _WorkerTag(logging.Filter):
    """Adds ``worker`` to every JSON record's fields."""

    def __init__(self, worker: str):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        extra = getattr(record, "fields", None)
        record.fields = {**(extra if isinstance(extra, dict) else {}), "worker": self.worker}
        return True


def fields(**values: object) -> dict[str, dict[str, object]]:
    """Returns: ``extra=`` for a log call carrying structured ``values``."""
    return {"fields": values}
