"""A thread-safe, byte-bounded LRU of values with known sizes (no torch, no I/O).

Used where values are content addressed (a key never names two different values), so an entry
is never stale: the catalog's read cache of adapters and the ``icm`` per-input encodings.
Not ``cachetools``: wrapped to this contract (lock, counters, size guard, first put kept) it
saves no code and was no faster (benchmarks/README.md, "The byte-bounded LRU vs cachetools").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class ByteBoundedLRU:
    """Least recently used values go once the held bytes pass ``capacity``; a value larger than
    ``capacity`` is not kept (``capacity`` 0 keeps nothing).

    Thread-safe: every method holds one lock for a few dictionary operations only, so a value is
    computed outside it (two threads may compute the same value; the first ``put`` is kept).
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large) under ``key``, evicting least recently used values."""
        with self._lock:
            if nbytes > self.capacity or key in self._items:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.capacity:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def describe(self) -> dict[str, int]:
        """A JSON-able snapshot: entries, bytes, capacity, hits, misses."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "capacity": self.capacity,
                "hits": self.hits,
                "misses": self.misses,
            }

    def __getstate__(self) -> dict[str, Any]:  # a pickled owner (Ray tasks) starts empty
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])
