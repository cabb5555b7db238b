"""lru_speed: the byte-bounded LRU (``engine/lru.py``) against ``cachetools`` (issue 17 §4).

``cachetools.LRUCache`` (``getsizeof`` for the byte bound) is wrapped to ``ByteBoundedLRU``'s
contract: one lock (a replica's threads share the caches), hit and miss counters, a value larger
than the capacity not kept (cachetools raises), the first ``put`` of a key kept. Times ``get`` of
a present key and ``put`` of keys half of which fit (every put evicts); and, for the serving
cache with leases (``serve/cache.py``, which cachetools has no counterpart of), one lease of a
loaded adapter (acquire and release). Writes results/lru_speed.json.

``cachetools`` is not a dependency of the project: install it where this runs.

    .venv/bin/pip install cachetools && .venv/bin/python -m benchmarks.lru_speed [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import timeit
from collections.abc import Hashable
from typing import Any

from benchmarks._common import environment, write_json
from engine.lru import ByteBoundedLRU
from serve.cache import AdapterCache

KEYS = 1000
VALUE_BYTES = 1 << 20


class CachetoolsLRU:
    """``cachetools.LRUCache`` with :class:`ByteBoundedLRU`'s contract (``get``/``put`` only)."""

    def __init__(self, capacity: int):
        import cachetools

        self._cache = cachetools.LRUCache(maxsize=capacity, getsizeof=lambda item: item[1])
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._cache.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            if key in self._cache:
                return
            try:
                self._cache[key] = (value, nbytes)
            except ValueError:  # larger than the capacity: not kept
                pass


def time_cache(make, calls: int) -> dict[str, float]:
    """Best of 5 runs of ``calls`` calls, in µs per call."""
    cache = make(KEYS * VALUE_BYTES // 2)
    keys = [("fvae sha256", f"{i:064x}", "trained", "task") for i in range(KEYS)]
    value = object()
    for key in keys:
        cache.put(key, value, VALUE_BYTES)
    hot = keys[-1]
    get = min(timeit.repeat(lambda: cache.get(hot), number=calls, repeat=5)) / calls
    turn = iter(range(10**12))
    put = min(
        timeit.repeat(lambda: cache.put(keys[next(turn) % KEYS], value, VALUE_BYTES), number=calls, repeat=5)
    )
    return {"get_hit_us": get * 1e6, "put_evicting_us": put / calls * 1e6}


async def time_lease(calls: int) -> float:
    """µs per lease of a loaded adapter (acquire and release)."""

    async def loader(adapter_id: str) -> object:
        return object()

    async def unloader(adapter_id: str, value: object) -> None:
        return None

    cache = AdapterCache(loader, unloader, capacity=8)
    async with cache.lease("a"):
        pass
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(calls):
        async with cache.lease("a"):
            pass
    return (loop.time() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200_000, help="calls per timed run")
    args = parser.parse_args(argv)
    try:
        import cachetools
    except ImportError:
        raise SystemExit("lru_speed compares with cachetools: pip install cachetools") from None
    load_before = os.getloadavg()
    result = {
        "environment": dict(environment(), cachetools=cachetools.__version__),
        "calls": args.calls,
        "keys": KEYS,
        "value_bytes": VALUE_BYTES,
        "byte_bounded_lru": time_cache(ByteBoundedLRU, args.calls),
        "cachetools_lru": time_cache(CachetoolsLRU, args.calls),
        "adapter_cache_lease_us": asyncio.run(time_lease(args.calls // 4)),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    for name in ("byte_bounded_lru", "cachetools_lru"):
        times = result[name]
        print(
            f"{name}: get (hit) {times['get_hit_us']:.2f} µs, put (evicting) {times['put_evicting_us']:.2f} µs"
        )
    print(f"AdapterCache lease (hit): {result['adapter_cache_lease_us']:.2f} µs")
    print(f"wrote {write_json('lru_speed', result)}")


if __name__ == "__main__":
    main()
