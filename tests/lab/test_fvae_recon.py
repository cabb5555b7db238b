"""``benchmarks/fvae_recon.py``'s linear reference for the updates: the Gram form equals a PCA of
the dense updates (what it replaced) on a layout small enough to form them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.fvae_recon import module_delta_grams, pca_delta_reference
from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout, ModuleSpec


def _dense_reference(layout, x, masks, split, ks):
    """PCA of the concatenated dense updates of the training rows, centred on their mean; each
    module's residual over its (uncentred) update norm, averaged over present modules."""
    parts = []
    for m in range(layout.num_modules):
        parts.append(torch.stack([(f[m][1] @ f[m][0]).flatten() for f in (unflatten(v, layout) for v in x)]))
    train = torch.as_tensor(split == "train")
    centres = [p[train].mean(0) for p in parts]
    flat = torch.cat([p - c for p, c in zip(parts, centres, strict=True)], dim=1)
    _, _, vt = torch.linalg.svd(flat[train], full_matrices=False)
    out = {}
    for k in ks:
        residual = flat - (flat @ vt[:k].T) @ vt[:k]
        row = {}
        for part in ("train", "heldout", "unseen"):
            rows = np.flatnonzero(split == part)
            errors, lo = [], 0
            for p in parts:
                width = p.shape[1]
                errors.append(residual[rows, lo : lo + width].pow(2).sum(1) / p[rows].pow(2).sum(1))
                lo += width
            present = masks[rows].double()
            row[part] = float(((torch.stack(errors, 1) * present).sum(1) / present.sum(1)).mean())
        out[f"pca{k}"] = row
    return out


@pytest.fixture
def adapters():
    # Non-square modules (a GQA-like v_proj, an MLP up_proj) so the Gram's index order is checked.
    layout = Layout(
        base_model="test/model",
        modules=(ModuleSpec("q_proj", 12, 12), ModuleSpec("v_proj", 4, 12), ModuleSpec("up_proj", 20, 12)),
        r_max=3,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(14, layout.size, generator=generator, dtype=torch.float64)
    masks = torch.ones(14, layout.num_modules, dtype=torch.bool)
    masks[10, 2] = False  # an adapter without up_proj
    split = np.array(["train"] * 8 + ["heldout"] * 3 + ["unseen"] * 3)
    return layout, x, masks, split


def test_gram_pca_of_updates_equals_the_dense_pca(adapters):
    layout, x, masks, split = adapters
    # 8 training rows centred span 7 components: every k up to that is the same basis both ways.
    got = pca_delta_reference(module_delta_grams(layout, x), masks, split, ks=(1, 3, 7))
    expected = _dense_reference(layout, x, masks, split, ks=(1, 3, 7))
    assert got.keys() == expected.keys()
    for name, row in expected.items():
        for part, value in row.items():
            assert got[name][part] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, part)
    # All components reconstruct the training rows exactly; a held-out one keeps a residual.
    assert got["pca7"]["train"] == pytest.approx(0.0, abs=1e-9)
    assert got["pca7"]["heldout"] > 0.1


def test_gram_of_updates_is_the_frobenius_product_of_the_dense_updates(adapters):
    layout, x, _, _ = adapters
    grams = module_delta_grams(layout, x[:4])
    for m in range(layout.num_modules):
        dense = torch.stack([(f[m][1] @ f[m][0]).flatten() for f in (unflatten(v, layout) for v in x[:4])])
        torch.testing.assert_close(grams[m], dense @ dense.T)
