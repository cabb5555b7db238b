"""Meta-training building blocks: the data-free proxy loss and episode sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from engine.adapters import Layout, LoraAdapter, LoraModule, ModuleSpec, from_flat, to_canonical, to_flat
from engine.meta.episodes import TaskPool
from engine.meta.losses import subspace_proxy_loss, unflatten

LAYOUT = Layout("m", (ModuleSpec("a", 6, 5), ModuleSpec("b", 4, 7)), r_max=3)


def random_vector(seed: int, modules=("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    specs = {m.name: m for m in LAYOUT.modules}
    adapter = LoraAdapter(
        {
            n: LoraModule(
                torch.randn(2, specs[n].d_in, generator=g), torch.randn(specs[n].d_out, 2, generator=g)
            )
            for n in modules
        },
        {},
    )
    canonical = to_canonical(adapter, LAYOUT)
    return to_flat(canonical), canonical.mask


def test_unflatten_matches_codec():
    vec, mask = random_vector(0)
    canonical = from_flat(vec, LAYOUT, mask)
    for (A, B), A_ref, B_ref in zip(unflatten(vec, LAYOUT), canonical.A, canonical.B, strict=True):
        torch.testing.assert_close(A, A_ref)
        torch.testing.assert_close(B, B_ref)


def test_proxy_loss_is_zero_for_the_task_itself_and_positive_otherwise():
    v1, m1 = random_vector(1)
    v2, m2 = random_vector(2, modules=("a",))
    targets, masks = torch.stack([v1, v2]), torch.stack([m1, m2])
    assert float(subspace_proxy_loss(v1, targets[:1], masks[:1], LAYOUT)) < 1e-10
    assert float(subspace_proxy_loss(torch.zeros_like(v1), targets, masks, LAYOUT)) == pytest.approx(1.0)
    fused = (v1 + v2).requires_grad_(True)
    loss = subspace_proxy_loss(fused, targets, masks, LAYOUT)
    loss.backward()
    assert float(loss) > 0 and fused.grad is not None and torch.isfinite(fused.grad).all()


def test_episodes_are_task_balanced_on_a_long_tail():
    pool = TaskPool(capacity_per_task=50, seed=0)
    for task, count in (("head", 500), ("mid", 50), ("tail", 2)):
        for _ in range(count):
            pool.add(task)
    assert len(pool.slots["head"]) == 50 and pool.seen["head"] == 500 and len(pool.slots["tail"]) == 2
    rng = np.random.default_rng(0)
    draws = Counter(t for _ in range(3000) for t in pool.sample(1, rng).tasks)
    assert min(draws.values()) > 0.28 * 3000  # ~1/3 each, whatever the adapter counts
    sizes = Counter(len(pool.sample(3, rng).tasks) for _ in range(600))
    assert set(sizes) == {1, 2, 3}
    episode = pool.sample(3, rng, min_tasks=3)
    assert len(set(episode.tasks)) == 3
    for task, slot in zip(episode.tasks, episode.adapter_index, strict=True):
        assert slot in pool.slots[task]


def test_empty_pool_is_a_clear_error():
    with pytest.raises(ValueError, match="pool is empty"):
        TaskPool(3).sample(2, np.random.default_rng(0))
