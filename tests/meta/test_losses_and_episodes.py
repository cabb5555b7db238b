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


def test_anchored_episode_fusion_cannot_be_met_by_a_decoder_that_ignores_its_inputs():
    """The episode's fused adapter is anchored on its inputs (as icm fuses): a decoder emitting one
    fixed adapter whatever its code scores the inputs' task arithmetic, so the fusion loss gives it
    nothing to memorise; unanchored, the fused adapter is that fixed output."""
    from engine.fvae.config import FVAEConfig
    from engine.fvae.model import FVAE
    from engine.fvae.normalize import SlotNormalizer
    from engine.meta.step import EpisodeBatch, EpisodeSettings, episode_loss

    (v1, m1), (v2, m2) = random_vector(1), random_vector(2)
    batch = EpisodeBatch(torch.stack([v1, v2]), torch.stack([m1, m2]), torch.randn(2, 4), ("t1", "t2"))
    model = FVAE(
        FVAEConfig(input_dim=LAYOUT.size, cond_dim=4, arch="conv", depth=2, channels=2, latent_dim=4)
    )
    memorised = torch.randn(LAYOUT.size)
    model.decode = lambda z, cond: memorised.expand(z.shape[0], -1) + 0 * z.sum()
    seen = []

    def data_loss(fused, tasks, ids):
        factors = unflatten(fused, LAYOUT) if isinstance(fused, torch.Tensor) else fused
        seen.append([B @ A for A, B in factors])
        return sum(d.sum() for d in seen[-1]) * 0

    normalizer = SlotNormalizer.identity(LAYOUT.size)
    episode_loss(model, normalizer, batch, LAYOUT, EpisodeSettings(), data_loss)
    episode_loss(model, normalizer, batch, LAYOUT, EpisodeSettings(anchor=False), data_loss)
    inputs = [[B @ A for A, B in unflatten(v, LAYOUT)] for v in (v1, v2)]
    for m, (anchored, absolute) in enumerate(zip(*seen, strict=True)):
        torch.testing.assert_close(anchored, 0.5 * (inputs[0][m] + inputs[1][m]), rtol=1e-4, atol=1e-4)
        A, B = unflatten(memorised, LAYOUT)[m]
        torch.testing.assert_close(absolute, B @ A)
    assert float(subspace_proxy_loss(unflatten(v1, LAYOUT), batch.x[:1], batch.mask[:1], LAYOUT)) < 1e-10


def test_proxy_loss_of_anchored_terms_equals_that_of_concatenated_factors():
    """Meta-training scores the anchored decode term by term (no concatenated copies at 8 B-class
    layouts); the loss and every gradient must be those of the concatenated factors."""
    from engine.fusion.icm.latent import anchored_factors, anchored_terms

    (v1, m1), (v2, m2) = random_vector(3), random_vector(4, modules=("a",))
    targets, masks = torch.stack([v1, v2]), torch.stack([m1, m2])
    weights = torch.tensor([0.7, 0.3])
    results = []
    for build in (anchored_terms, anchored_factors):
        fused = torch.randn(LAYOUT.size, generator=torch.Generator().manual_seed(5)).requires_grad_()
        decoded = torch.randn(2, LAYOUT.size, generator=torch.Generator().manual_seed(6)).requires_grad_()
        inputs = [unflatten(v, LAYOUT) for v in targets]
        loss = subspace_proxy_loss(
            build(fused, decoded, inputs, masks, weights, LAYOUT), targets, masks, LAYOUT
        )
        loss.backward()
        results.append((loss.detach(), fused.grad, decoded.grad))
    (loss_terms, *grads_terms), (loss_cat, *grads_cat) = results
    assert float(loss_cat) > 0.1
    torch.testing.assert_close(loss_terms, loss_cat)
    for got, expected in zip(grads_terms, grads_cat, strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected)
