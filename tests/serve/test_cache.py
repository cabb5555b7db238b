"""AdapterCache semantics (pure asyncio, no Ray): each fault Serve's multiplexer has, tested."""

from __future__ import annotations

import asyncio

import pytest

from serve.cache import AdapterCache


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Store:
    """A loader that counts calls, can be told to fail, and can be held mid-load."""

    def __init__(self):
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.failing: set[str] = set()
        self.gate: asyncio.Event | None = None

    async def load(self, adapter_id: str) -> str:
        self.loads.append(adapter_id)
        if self.gate is not None:
            await self.gate.wait()
        if adapter_id in self.failing:
            raise LookupError(f"no {adapter_id}")
        return f"weights:{adapter_id}"

    async def unload(self, adapter_id: str, _value: str) -> None:
        self.unloads.append(adapter_id)


def make(capacity=2, ttl=5.0):
    store, clock = Store(), FakeClock()
    cache = AdapterCache(store.load, store.unload, capacity=capacity, negative_ttl_s=ttl, clock=clock)
    return cache, store, clock


async def use(cache, adapter_id):
    async with cache.lease(adapter_id) as value:
        return value


def test_hit_after_miss_and_lru_eviction():
    async def main():
        cache, store, _ = make(capacity=2)
        assert await use(cache, "a") == "weights:a"
        await use(cache, "a")
        await use(cache, "b")
        await use(cache, "a")  # a is now most recent
        await use(cache, "c")  # evicts b, the least recently used
        assert store.loads == ["a", "b", "c"]
        assert store.unloads == ["b"]
        assert cache.cached_ids() == ["a", "c"]
        assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 3, 1)

    asyncio.run(main())


def test_failed_load_never_evicts_a_good_entry():
    async def main():
        cache, store, _ = make(capacity=2)
        await use(cache, "a")
        await use(cache, "b")  # full
        store.failing.add("bad")
        with pytest.raises(LookupError):
            await use(cache, "bad")
        assert cache.cached_ids() == ["a", "b"]
        assert store.unloads == []

    asyncio.run(main())


def test_failures_are_cached_until_the_ttl_passes():
    async def main():
        cache, store, clock = make(ttl=5.0)
        store.failing.add("x")
        for _ in range(3):
            with pytest.raises(LookupError):
                await use(cache, "x")
        assert store.loads == ["x"]  # one try, then the remembered failure
        assert cache.stats.negative_hits == 2
        store.failing.clear()
        clock.now = 5.1
        assert await use(cache, "x") == "weights:x"
        assert store.loads == ["x", "x"]

    asyncio.run(main())


def test_concurrent_requests_for_one_missing_id_load_it_once():
    async def main():
        cache, store, _ = make()
        store.gate = asyncio.Event()
        tasks = [asyncio.create_task(use(cache, "a")) for _ in range(5)]
        await asyncio.sleep(0)
        store.gate.set()
        assert await asyncio.gather(*tasks) == ["weights:a"] * 5
        assert store.loads == ["a"]
        assert cache.stats.coalesced == 4

    asyncio.run(main())


def test_concurrent_waiters_all_see_a_failed_load():
    async def main():
        cache, store, _ = make()
        store.gate = asyncio.Event()
        store.failing.add("a")
        tasks = [asyncio.create_task(use(cache, "a")) for _ in range(3)]
        await asyncio.sleep(0)
        store.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LookupError) for r in results)
        assert store.loads == ["a"]

    asyncio.run(main())


def test_leased_entry_is_never_evicted_and_cache_shrinks_after_release():
    async def main():
        cache, store, _ = make(capacity=1)
        async with cache.lease("a") as a:
            await use(cache, "b")  # a is leased: it stays; the cache is over capacity for now
            assert "a" in cache.cached_ids()
            assert a == "weights:a" and cache.leases("a") == 1
            assert "a" not in store.unloads
            # b's request ended while a was still leased: b is the only entry that may go
            assert store.unloads == ["b"] and cache.cached_ids() == ["a"]
        assert cache.cached_ids() == ["a"]
        assert cache.in_flight() == {}

    asyncio.run(main())


def test_new_entry_is_kept_when_everything_else_is_leased():
    async def main():
        cache, _, _ = make(capacity=1)
        async with cache.lease("a"), cache.lease("b") as b:
            assert b == "weights:b"
            assert set(cache.cached_ids()) == {"a", "b"}
            assert cache.in_flight() == {"a": 1, "b": 1}
        assert len(cache.cached_ids()) == 1

    asyncio.run(main())


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        make(capacity=0)


def test_a_requester_that_goes_away_does_not_cancel_the_load():
    async def main():
        cache, store, _ = make()
        store.gate = asyncio.Event()
        first = asyncio.create_task(use(cache, "a"))
        await asyncio.sleep(0)
        second = asyncio.create_task(use(cache, "a"))
        await asyncio.sleep(0)
        first.cancel()  # e.g. the client timed out
        store.gate.set()
        assert await second == "weights:a"
        assert store.loads == ["a"] and cache.cached_ids() == ["a"]
        assert await use(cache, "a") == "weights:a" and store.loads == ["a"]

    asyncio.run(main())


def test_a_fresh_load_is_not_evicted_before_its_waiters_get_it():
    """Loads finishing while another load's eviction awaits its unloader must not evict each
    other's fresh, not-yet-pinned entries (a livelock under load: every waiter reloads)."""

    async def main():
        cache, store, _ = make(capacity=1)

        async def slow_unload(adapter_id, _value):
            store.unloads.append(adapter_id)
            await asyncio.sleep(0.001)  # the model thread's unload takes time

        cache.unloader = slow_unload
        ids = [f"a{i}" for i in range(8)]
        values = await asyncio.wait_for(asyncio.gather(*(use(cache, i) for i in ids * 3)), timeout=5)
        assert values == [f"weights:{i}" for i in ids * 3]
        # all three requests of an id share its one load; no entry is reloaded for its own waiters
        assert store.loads == ids and cache.stats.coalesced == 2 * len(ids)
        assert len(cache.cached_ids()) == 1

    asyncio.run(main())


def test_a_waiter_cancelled_after_the_load_finished_gives_its_lease_back():
    async def main():
        cache, store, _ = make(capacity=1)
        store.gate = asyncio.Event()
        waiter = asyncio.create_task(use(cache, "a"))
        await asyncio.sleep(0)
        store.gate.set()
        await asyncio.sleep(0)  # the load task finishes; the waiter has not resumed yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert cache.in_flight() == {}
        assert await use(cache, "b") == "weights:b" and cache.cached_ids() == ["b"]

    asyncio.run(main())
