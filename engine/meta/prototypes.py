"""Task prototypes for F-VAE artifacts written before meta-training recorded them.

``icmf train`` records each training task's prototype code (the mean posterior mean of its
training adapters, :attr:`engine.fvae.artifact.FVAEArtifact.task_latents`) with its familiarity
measurement. An older artifact has none, so ``icm`` cannot use them (docs/design.md §2.7).
:func:`record_task_latents` computes them from the catalog the F-VAE was trained on, as training
would: the same stored rows, normalised and encoded under each task's training vector.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.catalog import fs as cfs
from engine.catalog.catalog import Catalog
from engine.errors import IcmfError
from engine.fvae.artifact import TASK_LATENTS_FILE, FVAEArtifact
from engine.fvae.recon import reconstruction_errors
from engine.meta.train import FAMILIARITY_PER_TASK


def catalog_task_latents(
    artifact: FVAEArtifact, catalog: Catalog, per_task: int = FAMILIARITY_PER_TASK, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Each training task's prototype code ``[latent]``: the mean posterior mean of up to
    ``per_task`` of its adapters in ``catalog`` (at the version the F-VAE was trained on), chosen
    by ``seed``, leaving out the adapters meta-training excluded (``exclude_adapters``).

    Raises:
        IcmfError: a training task without adapters in the catalog (another catalog, or one
            whose adapters were removed).
    """
    if artifact.meta.catalog_version is not None:
        catalog = catalog.at(artifact.meta.catalog_version)
    excluded = set(artifact.meta.config.get("exclude_adapters") or [])
    rng = np.random.default_rng(seed)
    model, normalizer, layout = artifact.model.eval(), artifact.normalizer, artifact.layout
    latents: dict[str, torch.Tensor] = {}
    for task, vector in sorted(artifact.trained_vectors.items()):
        ids = sorted(e["id"] for e in catalog.entries(task) if e["id"] not in excluded)
        if not ids:
            raise IcmfError(
                f"{catalog.uri}: no adapters of training task {task!r} to take its prototype from"
            )
        chosen = rng.choice(ids, size=min(per_task, len(ids)), replace=False)
        rows = [catalog.read_vector(str(i), layout) for i in chosen]
        x = normalizer.normalize(torch.from_numpy(np.stack([weights for weights, _, _ in rows])))
        present = torch.from_numpy(np.stack([layout.slot_mask(mask) for _, mask, _ in rows]))
        cond = vector.expand(len(rows), -1)
        latents[task] = reconstruction_errors(model, x, cond, present).mu.mean(dim=0)
    return latents


def record_task_latents(uri: str, catalog_uri: str | None = None) -> bool:
    """Add task prototypes to the artifact at ``uri`` (the training output or its ``fvae/``
    directory), computed from ``catalog_uri`` (by default the catalog it was trained on). An
    artifact that has them is left as it is, without loading it. Returns whether they were
    written."""
    fs, base = FVAEArtifact.locate(uri)
    if cfs.exists(fs, cfs.join(base, TASK_LATENTS_FILE)):
        return False
    artifact = FVAEArtifact.load(uri)
    seed = int((artifact.meta.config.get("train") or {}).get("seed", 0))
    catalog = Catalog(catalog_uri or artifact.meta.catalog)
    artifact.task_latents = catalog_task_latents(artifact, catalog, seed=seed)
    artifact.save_task_latents(uri)
    return True
