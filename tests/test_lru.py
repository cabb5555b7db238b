"""The byte-bounded LRU shared by the catalog's read cache and the icm inputs cache."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.lru import ByteBoundedLRU


def test_evicts_least_recently_used_past_the_byte_bound():
    lru = ByteBoundedLRU(10)
    lru.put("a", 1, 4)
    lru.put("b", 2, 4)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3, 4)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.nbytes == 8 and len(lru) == 2
    lru.put("huge", 4, 11)  # larger than the bound: not kept, nothing evicted
    assert lru.get("huge") is None and len(lru) == 2
    lru.put("a", "other", 4)  # keys are content addressed: the first value stays
    assert lru.get("a") == 1
    assert lru.describe() == {"entries": 2, "bytes": 8, "capacity": 10, "hits": 4, "misses": 2}
    assert pickle.loads(pickle.dumps(lru)).describe()["entries"] == 0  # pickles empty
    with pytest.raises(ValueError, match=">= 0"):
        ByteBoundedLRU(-1)


def test_concurrent_use_keeps_the_byte_count_exact():
    lru = ByteBoundedLRU(100)

    def work(i: int) -> None:
        for j in range(200):
            lru.put((i, j % 30), j, 1 + j % 7)
            lru.get((i, (j * 7) % 30))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    sizes = [size for _, size in lru._items.values()]
    assert lru.nbytes == sum(sizes) <= 100
