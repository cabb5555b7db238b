"""Latent-space fusion operator."""

from __future__ import annotations

import pytest
import torch

from engine.fusion.icm.latent import fuse_latents, project_conflicts, slerp


def test_conflicting_components_are_removed():
    v = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = project_conflicts(v)
    assert out[0] @ v[1] >= -1e-6 and out[1] @ v[0] >= -1e-6
    aligned = torch.tensor([[1.0, 0.2], [0.5, 1.0]])
    torch.testing.assert_close(project_conflicts(aligned), aligned)  # no conflict: unchanged


def test_weighted_combination_and_ablations():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    cond = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    z, v = fuse_latents(mu, cond, alpha=torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(z, torch.tensor([0.25, 1.5]))
    assert float(v.norm()) == pytest.approx(3.0)  # mean task-vector norm restored
    z_mean, _ = fuse_latents(mu, cond, combine="mean")
    z_sum, _ = fuse_latents(mu, cond, combine="sum")
    torch.testing.assert_close(z_sum, 2 * z_mean)
    z_slerp, _ = fuse_latents(mu, cond, combine="slerp")
    assert z_slerp.shape == (2,)
    with pytest.raises(ValueError, match="combine must be"):
        fuse_latents(mu, cond, combine="max")


def test_single_task_is_identity_and_gradients_flow():
    mu = torch.randn(1, 4, requires_grad=True)
    cond = torch.randn(1, 3)
    alpha = torch.ones(1, requires_grad=True)
    z, v = fuse_latents(mu, cond, alpha)
    torch.testing.assert_close(z, mu[0])
    torch.testing.assert_close(v, cond[0])
    z.sum().backward()
    assert mu.grad is not None and alpha.grad is not None


def test_slerp_endpoints():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    assert float(slerp(a, b, 0.5).norm()) == pytest.approx(1.5)
