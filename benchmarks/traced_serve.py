"""``python -m benchmarks.traced_serve serve --config ...``: pgtenant's ``serve`` under
tracemalloc, for ``idle_memory.py --trace`` (issue 16: where an idle client's bytes go).

A thread polls ``$PGTENANT_TRACE_DIR`` for request files: ``NAME.req`` makes it write
``NAME.snap`` (a tracemalloc snapshot) and ``NAME.objs.json`` (live pgtenant objects by
class: count, shallow size, and the size of their ``__dict__`` and container attributes);
the first request starts tracing. A thread, not a signal handler: it works whatever the
event loop does with signals.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pgtenant.cli import main

FRAMES = 40  # deep enough to reach pgtenant's frame under asyncio/uvloop callbacks
_CONTAINERS = (dict, list, set, frozenset, tuple, bytearray, bytes, str)


def _objects() -> dict[str, dict[str, Any]]:
    """Live instances of pgtenant's classes: count, bytes of the object, of its __dict__
    and of the containers its attributes hold directly (shallow: what one level costs)."""
    out: dict[str, dict[str, Any]] = {}
    for obj in gc.get_objects():
        cls = type(obj)
        module = cls.__dict__.get("__module__")
        if not isinstance(module, str) or not module.startswith("pgtenant"):
            continue
        row = out.setdefault(f"{cls.__module__}.{cls.__qualname__}", {
            "count": 0, "object": 0, "dict": 0, "attributes": {}})
        row["count"] += 1
        row["object"] += sys.getsizeof(obj)
        attrs: dict[str, Any] = {}
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            row["dict"] += sys.getsizeof(obj.__dict__)
            attrs.update(obj.__dict__)
        for klass in cls.__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    attrs[slot] = getattr(obj, slot)
        for name, value in attrs.items():
            if isinstance(value, _CONTAINERS) or hasattr(value, "__self__"):
                sizes = row["attributes"]
                sizes[name] = sizes.get(name, 0) + sys.getsizeof(value)
    return out


def _watch(folder: Path) -> None:
    while True:
        for req in folder.glob("*.req"):
            name = req.stem
            try:
                # Tracing starts with the first request, not at start: the imports under
                # tracemalloc take minutes, and blocks allocated before it are in neither
                # snapshot of the difference anyway.
                if not tracemalloc.is_tracing():
                    tracemalloc.start(FRAMES)
                gc.collect()
                tracemalloc.take_snapshot().dump(str(folder / f"{name}.snap.tmp"))
                (folder / f"{name}.objs.json").write_text(json.dumps(_objects()))
                os.replace(folder / f"{name}.snap.tmp", folder / f"{name}.snap")
            except Exception as exc:  # the requester reads it instead of waiting in vain
                (folder / f"{name}.err").write_text(repr(exc))
            req.unlink()
        time.sleep(0.1)


if __name__ == "__main__":
    threading.Thread(target=_watch, args=(Path(os.environ["PGTENANT_TRACE_DIR"]),),
                     daemon=True).start()
    sys.exit(main(sys.argv[1:]))
