"""A cache keyed by SQL text, bounded by the bytes of its keys (ARCHITECTURE.md §5:
untrusted input has bounded cost).

The statement guard and the classifier cache verdicts by query text; a count bound alone let
a tenant park 10,000 texts of up to 64 MB each (and their parse trees) in the proxy. This
one bounds the total size of the texts it keeps, never keeps a text above ``max_item``
bytes, and evicts the oldest entries first (insertion order: a hit costs one dict lookup,
nothing more). No I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar, overload

__all__ = ["TextCache"]

V = TypeVar("V")
D = TypeVar("D")
# Per entry besides the text: dict slot, bytes object header, the value (roughly).
_OVERHEAD = 100


class TextCache(Generic[V]):
    """``text -> value``, at most ``max_bytes`` of texts (plus a small per-entry charge)."""

    def __init__(self, max_bytes: int, max_item: int):
        self.max_bytes = max_bytes
        self.max_item = min(max_item, max_bytes)
        self.size = 0  # bytes charged for the entries held
        # OrderedDict: popping the oldest is O(1) (a plain dict's next(iter()) walks the
        # holes earlier deletions left at its front).
        self._data: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def __getitem__(self, key: bytes) -> V:
        return self._data[key]

    @overload
    def get(self, key: bytes) -> V | None: ...
    @overload
    def get(self, key: bytes, default: D) -> V | D: ...

    def get(self, key: bytes, default: object = None) -> object:
        return self._data.get(key, default)

    def put(self, key: bytes, value: V) -> None:
        """Keep ``value`` for ``key`` unless the text is too big to keep at all."""
        if len(key) > self.max_item:
            return
        cost = len(key) + _OVERHEAD
        data = self._data
        if key in data:
            data[key] = value
            return
        while data and self.size + cost > self.max_bytes:
            oldest, _ = data.popitem(last=False)
            self.size -= len(oldest) + _OVERHEAD
        data[key] = value
        self.size += cost

    def clear(self) -> None:
        self._data.clear()
        self.size = 0
