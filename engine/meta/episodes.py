"""Episode sampling (docs/design.md §2.5): task subsets, long-tail aware, pure Python/numpy.

Tasks are drawn uniformly — not in proportion to how many adapters they have — so tail tasks are
not drowned by head tasks; then one adapter per drawn task, uniformly within the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Episode:
    """One episode: ``tasks[i]`` is fused from adapter ``adapter_index[i]`` of the pool."""

    tasks: tuple[str, ...]
    adapter_index: tuple[int, ...]


class TaskPool:
    """Adapters seen so far, grouped by task, with bounded memory per task (reservoir sampling).

    Holds indices into a caller-owned store; ``add`` returns the slot to (over)write or None.
    """

    def __init__(self, capacity_per_task: int, seed: int = 0):
        if capacity_per_task <= 0:
            raise ValueError("capacity_per_task must be positive")
        self.capacity = capacity_per_task
        self.rng = np.random.default_rng(seed)
        self.slots: dict[str, list[int]] = {}
        self.seen: dict[str, int] = {}
        self._next = 0

    def add(self, task: str) -> int | None:
        """Register one adapter of ``task``; return the store slot it goes to, or None (skipped)."""
        seen = self.seen.get(task, 0)
        self.seen[task] = seen + 1
        slots = self.slots.setdefault(task, [])
        if len(slots) < self.capacity:
            slots.append(self._next)
            self._next += 1
            return slots[-1]
        j = int(self.rng.integers(0, seen + 1))
        return slots[j] if j < self.capacity else None

    @property
    def size(self) -> int:
        return self._next

    def tasks(self) -> list[str]:
        return sorted(self.slots)

    def sample(self, max_tasks: int, rng: np.random.Generator, min_tasks: int = 1) -> Episode:
        """A task subset of size in ``[min_tasks, max_tasks]`` (capped by the tasks available),
        tasks uniform without replacement, one adapter uniform within each task."""
        tasks = self.tasks()
        if not tasks:
            raise ValueError("the pool is empty: no adapters were streamed to this worker")
        high = min(max_tasks, len(tasks))
        size = int(rng.integers(min(min_tasks, high), high + 1))
        chosen = sorted(rng.choice(len(tasks), size=size, replace=False).tolist())
        picked = tuple(tasks[i] for i in chosen)
        return Episode(picked, tuple(int(rng.choice(self.slots[t])) for t in picked))
