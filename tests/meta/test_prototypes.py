"""Task prototypes for artifacts written before meta-training recorded them: computed from the
catalog the F-VAE was trained on, leaving out what meta-training left out (pure torch, no Ray)."""

from __future__ import annotations

import pytest
import torch

from engine.adapters.codec import to_canonical, to_flat
from engine.catalog import Catalog
from engine.catalog.synth import parse_layout, synthesize
from engine.errors import IcmfError
from engine.fvae import FVAE, FVAEConfig, SlotNormalizer
from engine.fvae.artifact import ArtifactMeta, FVAEArtifact, TaskVectorSource
from engine.meta.prototypes import catalog_task_latents, record_task_latents


def _trained_on(catalog: Catalog, exclude: list[str]) -> FVAEArtifact:
    layout = catalog.layout()
    torch.manual_seed(0)
    config = FVAEConfig(input_dim=layout.size, cond_dim=3, arch="mlp", hidden=8, latent_dim=4)
    normalizer = SlotNormalizer(0.01 * torch.randn(layout.size), 0.5 + torch.rand(layout.size))
    vectors = {t: torch.randn(3) for t in catalog.tasks()}
    meta = ArtifactMeta(
        catalog=catalog.uri,
        catalog_version=catalog.version(),
        config={"exclude_adapters": exclude, "train": {"seed": 3}},
        task_vector_source=TaskVectorSource(dim=3),
    )
    return FVAEArtifact(FVAE(config).eval(), normalizer, layout, vectors, meta)


def test_prototypes_are_the_mean_code_of_the_training_adapters_of_each_task(tmp_path):
    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 12, parse_layout("tiny"), num_tasks=2, seed=0)
    ids = {t: [e["id"] for e in catalog.entries(t)] for t in catalog.tasks()}
    task = max(ids, key=lambda t: len(ids[t]))
    kept_out = ids[task][:2]
    artifact = _trained_on(catalog, kept_out)
    latents = catalog_task_latents(artifact, catalog, per_task=100)
    assert set(latents) == set(ids)
    for name, adapter_ids in ids.items():
        used = [i for i in adapter_ids if i not in kept_out]
        rows = torch.stack(
            [to_flat(to_canonical(catalog.load_adapter(i), artifact.layout, gauge=True)) for i in used]
        )
        cond = artifact.trained_vectors[name].expand(len(used), -1)
        mu, _ = artifact.model.encode(artifact.normalizer.normalize(rows), cond)
        torch.testing.assert_close(latents[name], mu.mean(dim=0).detach(), rtol=1e-4, atol=1e-6)
    # At most per_task adapters of each task, chosen by the seed.
    few = catalog_task_latents(artifact, catalog, per_task=1, seed=0)
    assert set(few) == set(ids) and not torch.allclose(few[task], latents[task])
    # Written into the artifact (the training output or its fvae/ directory), once.
    artifact.save(str(tmp_path / "out"))
    assert FVAEArtifact.load(str(tmp_path / "out")).task_latents == {}
    assert record_task_latents(str(tmp_path / "out" / "fvae"))
    recorded = FVAEArtifact.load(str(tmp_path / "out"))
    assert set(recorded.task_latents) == set(ids)
    for name, latent in catalog_task_latents(artifact, catalog, seed=3).items():  # the training seed
        assert torch.equal(recorded.task_latents[name], latent)
    assert recorded.fingerprint != artifact.fingerprint  # the prototypes are part of what fusion reads
    assert not record_task_latents(str(tmp_path / "out"))
    assert FVAEArtifact.load(str(tmp_path / "out")).fingerprint == recorded.fingerprint


def test_a_training_task_without_adapters_left_is_named(tmp_path):
    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 4, parse_layout("tiny"), num_tasks=2, seed=0)
    task = next(iter(catalog.tasks()))
    artifact = _trained_on(catalog, [e["id"] for e in catalog.entries(task)])
    with pytest.raises(IcmfError, match=f"no adapters of training task '{task}'"):
        catalog_task_latents(artifact, catalog)
