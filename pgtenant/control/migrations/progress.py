"""How a migration run is shown: a rich progress bar on a terminal, JSON lines otherwise.

Owns presentation of the runner's events only; the runner decides what happens.
``JsonLines`` writes one object per event (``{"event": ..., "ts": ..., ...}``) so a CI log
or a script can follow a rollout; ``RichProgress`` shows the wave, done/failed counts and the
ETA, and prints every failure (tenant, file, statement, SQLSTATE) above the bar.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["JsonLines", "RichProgress", "make_reporter"]


class JsonLines:
    """One JSON object per event, flushed at once (a killed runner loses no line)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout

    def event(self, kind: str, **fields: Any) -> None:
        """Write the event as one line."""
        self._out.write(json.dumps({"event": kind, "ts": round(time.time(), 3), **fields},
                                   default=str) + "\n")
        self._out.flush()


class RichProgress:
    """A progress bar over all targets; the description names the wave and the counts."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self._console,
        )
        self._task: TaskID | None = None
        self._done = self._failed = 0
        self._waves = 0

    def event(self, kind: str, **f: Any) -> None:
        """Advance the bar or print a line."""
        if kind == "run_started":
            self._waves = f["waves"]
            self._console.print(f"run {f['run_id']}: {f['targets']} target(s) in "
                                f"{f['waves']} wave(s)")
            if f["targets"]:
                self._progress.start()
                self._task = self._progress.add_task("starting", total=f["targets"],
                                                     done=0, failed=0)
        elif kind == "wave_started" and self._task is not None:
            self._progress.update(self._task, description=f"{f['wave']} "
                                  f"({f['index']}/{self._waves}, {f['size']} tenants)")
        elif kind in ("target_done", "target_failed") and self._task is not None:
            if kind == "target_done":
                self._done += 1
            else:
                self._failed += 1
                self._console.print(f"[red]FAILED[/] {f['message']}", markup=True,
                                    highlight=False)
            self._progress.update(self._task, advance=1, done=self._done, failed=self._failed)
        elif kind == "retry":
            self._console.print(f"retry {f['tenant']} #{f['attempt']} in {f['delay']} s: "
                                f"{f['reason']}", highlight=False)
        elif kind in ("stopped", "skipped"):
            self._console.print(f"[yellow]{kind}[/]: {f.get('tenant', '')} {f['reason']}")
        elif kind == "run_finished":
            self._progress.stop()
            self._console.print(
                f"run {f['run_id']} {f['status']}: {f['done']} done, {f['failed']} failed, "
                f"{f['not_started']} not started, {f['seconds']} s")


def make_reporter(json_lines: bool) -> JsonLines | RichProgress:
    """Returns: JSON lines when asked or when stdout is not a terminal, else the bar."""
    if json_lines or not sys.stdout.isatty():
        return JsonLines()
    return RichProgress()
