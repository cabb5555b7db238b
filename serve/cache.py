"""A bounded, per-replica adapter cache with the semantics Serve's own multiplexer lacks.

Ray Serve's ``@serve.multiplexed`` LRU evicts *before* it loads (a failed load still costs a good
model), loads one model at a time under one lock, caches no failures and may unload a model that
an in-flight request is using. This cache fixes each of those and is pure asyncio (no Ray, no
torch), so its tests run in milliseconds:

* a load that fails never evicts anything: eviction happens only after a successful load;
* a failure is remembered for ``negative_ttl_s`` (negative cache) and re-raised without retrying
  when ``remember_failure`` says it is deterministic (a bad request); a transient one (a server
  fault) is not remembered, so the next request tries again;
* concurrent requests for the same missing id share one load, and the loaded entry arrives
  already leased to all of them (so another load finishing first cannot evict it before they run);
* an entry leased by an in-flight request is never evicted (entries are immutable: ids are content
  addressed, so an entry is never changed either). When every entry is leased the cache may hold
  more than ``capacity`` until leases end; it shrinks back on release.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")
Loader = Callable[[str], Awaitable[V]]
Unloader = Callable[[str, V], Awaitable[None]]
# Event hook: (event name, adapter id, seconds or None); names are listed in CacheStats.
EventHook = Callable[[str, str, float | None], None]


@dataclass
class CacheStats:
    """Counters since start-up (what the metrics export)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    negative_hits: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0


@dataclass
class _Entry(Generic[V]):
    value: V
    leases: int = 0


@dataclass
class _Pending:
    task: asyncio.Future
    waiters: int = 0  # requests the entry is leased to when the load succeeds


@dataclass
class _Failure:
    error: BaseException
    until: float


@dataclass
class AdapterCache(Generic[V]):
    """LRU cache of loaded adapters keyed by id.

    Args:
        loader: ``async (id) -> value``; raises to signal a failed load.
        unloader: ``async (id, value)``; frees what ``loader`` allocated.
        capacity: entries kept when none is leased (>= 1).
        negative_ttl_s: how long a failed load is remembered (0 disables the negative cache).
        clock: monotonic seconds (injectable for tests).
        on_event: optional hook called with ``(event, id, seconds)`` for metrics.
        remember_failure: which load failures the negative cache keeps (default: every one).
    """

    loader: Loader
    unloader: Unloader
    capacity: int
    negative_ttl_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    on_event: EventHook | None = None
    remember_failure: Callable[[BaseException], bool] | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict[str, _Entry[V]] = field(default_factory=OrderedDict)
    _loading: dict[str, _Pending] = field(default_factory=dict)
    _failures: dict[str, _Failure] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {self.capacity}")

    # ------------------------------------------------------------------ queries
    def cached_ids(self) -> list[str]:
        """Ids currently loaded, least recently used first."""
        return list(self._entries)

    def leases(self, adapter_id: str) -> int:
        entry = self._entries.get(adapter_id)
        return entry.leases if entry else 0

    def in_flight(self) -> dict[str, int]:
        """Id -> number of requests holding it (only ids with at least one)."""
        return {k: e.leases for k, e in self._entries.items() if e.leases}

    # ------------------------------------------------------------------ leasing
    @asynccontextmanager
    async def lease(self, adapter_id: str) -> AsyncIterator[V]:
        """Hold ``adapter_id`` loaded for the duration of the ``async with`` block.

        Raises:
            Exception: whatever the loader raised (now, or within ``negative_ttl_s`` before).
        """
        value = await self._acquire(adapter_id)
        try:
            yield value
        finally:
            await self._release(adapter_id)

    async def _acquire(self, adapter_id: str) -> V:
        entry = self._entries.get(adapter_id)
        if entry is not None:
            self.stats.hits += 1
            self._emit("hit", adapter_id)
            return self._pin(adapter_id, entry)
        failure = self._failures.get(adapter_id)
        if failure is not None:
            if self.clock() < failure.until:
                self.stats.negative_hits += 1
                self._emit("negative_hit", adapter_id)
                raise failure.error
            del self._failures[adapter_id]
        pending = self._loading.get(adapter_id)
        if pending is not None:
            self.stats.coalesced += 1
            self._emit("coalesced", adapter_id)
        else:
            self.stats.misses += 1
            self._emit("miss", adapter_id)
            # Its own task: a requester that goes away (client timeout) must not cancel a load
            # that others wait for, nor leave the weights attached but uncached.
            pending = _Pending(asyncio.ensure_future(self._load(adapter_id)))
            self._loading[adapter_id] = pending
        pending.waiters += 1
        try:
            await asyncio.shield(pending.task)
        except asyncio.CancelledError:
            if _succeeded(pending.task):
                await self._release(adapter_id)  # the entry was leased to us: give it back
            else:
                pending.waiters -= 1
            raise
        # The load inserted the entry leased to every waiter: nothing could evict it since.
        entry = self._entries[adapter_id]
        self._entries.move_to_end(adapter_id)
        return entry.value

    def _pin(self, adapter_id: str, entry: _Entry[V]) -> V:
        entry.leases += 1
        self._entries.move_to_end(adapter_id)
        return entry.value

    async def _load(self, adapter_id: str) -> None:
        start = self.clock()
        try:
            value = await self.loader(adapter_id)
        except BaseException as exc:
            self.stats.load_failures += 1
            self._emit("load_failure", adapter_id, self.clock() - start)
            remember = self.remember_failure is None or self.remember_failure(exc)
            if self.negative_ttl_s > 0 and isinstance(exc, Exception) and remember:
                self._failures[adapter_id] = _Failure(exc, self.clock() + self.negative_ttl_s)
            raise
        finally:
            pending = self._loading.pop(adapter_id)
        self.stats.loads += 1
        self._emit("load", adapter_id, self.clock() - start)
        # Leased to its waiters in the same step as inserted: evictions (ours below, or another
        # load's that is awaiting its unloader) skip it until they have used it.
        self._entries[adapter_id] = _Entry(value, leases=pending.waiters)
        await self._evict_over_capacity()

    async def _release(self, adapter_id: str) -> None:
        entry = self._entries.get(adapter_id)
        if entry is not None:
            entry.leases -= 1
        await self._evict_over_capacity()

    async def _evict_over_capacity(self) -> None:
        while len(self._entries) > self.capacity:
            victim = next((k for k, e in self._entries.items() if not e.leases), None)
            if victim is None:
                return  # everything is leased: shrink when leases end
            entry = self._entries.pop(victim)
            self.stats.evictions += 1
            self._emit("eviction", victim)
            await self.unloader(victim, entry.value)

    def _emit(self, event: str, adapter_id: str, seconds: float | None = None) -> None:
        if self.on_event is not None:
            self.on_event(event, adapter_id, seconds)


def _succeeded(task: asyncio.Future) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def describe(cache: AdapterCache[Any]) -> dict[str, Any]:
    """A JSON-able snapshot of ``cache`` (for /status and debugging)."""
    return {
        "capacity": cache.capacity,
        "cached": cache.cached_ids(),
        "in_flight": cache.in_flight(),
        "stats": vars(cache.stats),
    }
