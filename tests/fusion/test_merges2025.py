"""The 2025 merges against dense re-implementations of their references' formulas.

Each ``ref_*`` below is the reference code's computation written densely (full ``d_out x d_in``
updates, ``torch.linalg.svd``), from reading gstoica27/KnOTS, danielm1405/iso-merging,
AntoAndGar/task_singular_vectors, apanariello4/core-space-merging and IBM/STAR; the registry
methods compute the same merges from LoRA factors without forming those matrices.
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters import LoraAdapter, LoraModule
from engine.fusion import FusionConfigError, FusionContext, fuse_adapters

TOL = 1e-4


def adapters_for(shapes: list[int], d_out: int, d_in: int, seed: int = 0) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(shapes):
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64).float()
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64).float()
        config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "task_type": "CAUSAL_LM"}
        out.append(LoraAdapter({"m": LoraModule(A, B, scaling=0.5 + 0.25 * i)}, config))
    return out


def dense_tasks(adapters: list[LoraAdapter], weights: list[float]) -> list[torch.Tensor]:
    """The task vectors the methods see: ``K w_i dW_i``."""
    K = len(adapters)
    return [K * w * a.modules["m"].delta() for a, w in zip(adapters, weights, strict=True)]


def fused_delta(adapters, method, params, weights=None, seed=0) -> torch.Tensor:
    return fuse_adapters(adapters, method, weights, params, seed).adapter.modules["m"].delta()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- dense references ---------------------------------------------------------------------------


def ref_isotropize(M: torch.Tensor) -> torch.Tensor:  # iso-merging iso_c, core-space isotropize_matrix
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ torch.diag(torch.ones_like(S) * S.mean()) @ Vh


def ref_iso_cts(tvs: list[torch.Tensor], fraction: float, dim: int | None = None) -> torch.Tensor:
    """iso-merging ``iso_cts`` for one 2-D key; ``dim`` replaces ``min(shape)`` (LoRA convention)."""
    K = len(tvs)
    size = min(tvs[0].shape) if dim is None else dim
    combined = sum(tvs)
    common = int(size * fraction)
    total_ts = round((size - common) / K) * K
    common = size - total_ts
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common]
    n = (size - common) // K
    us, ss, vs = [], [], []
    for w in tvs:
        w_ts = w - cu @ cu.T @ w
        ut, st, vt = torch.linalg.svd(w_ts, full_matrices=False)
        us.append(ut[:, :n]), ss.append(st[:n]), vs.append(vt[:n])
    U, S, V = torch.cat([*us, cu], 1), torch.cat([*ss, cs]), torch.cat([*vs, cv], 0)
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    return (pu @ qu) @ torch.diag(torch.ones_like(S) * S.mean()) @ (pv @ qv)


def ref_tsv(tvs: list[torch.Tensor], keep: list[int]) -> torch.Tensor:
    """task_singular_vectors ``compute_and_sum_svd_mem_reduction`` with ``keep[i]`` triplets per task."""
    us, ss, vs = [], [], []
    for w, k in zip(tvs, keep, strict=True):
        u, s, v = torch.linalg.svd(w, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:k])
    u_u, _, v_u = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(torch.cat(ss)), u_v, v_v))


def ref_topk_mask(M: torch.Tensor, density: float) -> torch.Tensor:  # KnOTS/TIES topk_values_mask
    if density >= 1:
        return torch.ones_like(M, dtype=torch.bool)
    n = M.shape[1]
    kth = M.abs().kthvalue(n - int(n * density), dim=1, keepdim=True).values
    return M.abs() >= kth


def ref_ties_mean(rows: torch.Tensor, density: float) -> torch.Tensor:
    pruned = rows * ref_topk_mask(rows, density)
    sign = torch.sign(pruned.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, pruned > 0, pruned < 0)
    selected = pruned * keep
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1).float()


def ref_knots_ties(tvs: list[torch.Tensor], density: float, alpha: float) -> torch.Tensor:
    """KnOTS ``SVDMerger`` (concat_across_output, ties masking, merging_type='mean') for one layer."""
    U, s, V = torch.linalg.svd(torch.cat(tvs, dim=1), full_matrices=False)
    U, V, s = U[:, s > 1e-5], V[s > 1e-5], s[s > 1e-5]
    blocks = torch.split(V, tvs[0].shape[1], dim=1)
    reps = torch.stack([(torch.diag(s) @ blk).flatten() for blk in blocks])
    merged = alpha * ref_ties_mean(reps, density)
    return U @ merged.view(len(s), -1)


def ref_core(As: list[torch.Tensor], Bs: list[torch.Tensor]):
    """core-space-merging ``get_core_matrices`` (the non-optimised form, via SVDs of A_i and B_i)."""
    Vh_ref = torch.linalg.svd(torch.cat(As, 0), full_matrices=False)[2]
    U_ref = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False)[0]
    cores = []
    for A, B in zip(As, Bs, strict=True):
        U_A, S_A, Vh_A = torch.linalg.svd(A, full_matrices=False)
        U_B, S_B, Vh_B = torch.linalg.svd(B, full_matrices=False)
        M = torch.diag(S_B) @ (Vh_B @ U_A) @ torch.diag(S_A)
        cores.append((U_ref.T @ U_B) @ M @ (Vh_A @ Vh_ref.T))
    return cores, U_ref, Vh_ref


def ref_core_tsv(cores: list[torch.Tensor]) -> torch.Tensor:  # core-space get_tsv_delta_w
    keep = int(cores[0].shape[0] / len(cores))
    return ref_tsv(cores, [keep] * len(cores))


def ref_star(w: torch.Tensor, eta: float) -> torch.Tensor:  # IBM/STAR merger/STAR.py star()
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    cumulative = torch.cumsum(s, 0)
    k = torch.searchsorted(cumulative, s.sum() * eta / 100).item() + 1
    return u[:, :k] @ torch.diag((s.sum() / s[:k].sum()) * s[:k]) @ vt[:k]


def folded_factors(adapters, weights):
    K = len(adapters)
    As = [a.modules["m"].A.double() for a in adapters]
    Bs = [
        a.modules["m"].B.double() * (a.modules["m"].scaling * w * K)
        for a, w in zip(adapters, weights, strict=True)
    ]
    return As, Bs


# ---- parity -------------------------------------------------------------------------------------

WEIGHTS = [0.5, 0.2, 0.3]


def test_iso_c_equals_the_reference_when_the_sum_is_full_rank_and_core_space_iso_otherwise():
    full = adapters_for([4, 4, 4], d_out=14, d_in=10)  # R = 12 >= min(d): the reference verbatim
    expected = 1.5 * ref_isotropize(sum(dense_tasks(full, WEIGHTS)))
    assert rel(fused_delta(full, "iso_c", {"alpha": 1.5}, WEIGHTS), expected) < TOL
    low = adapters_for([3, 2, 4], d_out=40, d_in=30, seed=1)  # R = 9 < 30: spectrum of the support
    cores, U_ref, Vh_ref = ref_core(*folded_factors(low, WEIGHTS))
    expected = U_ref @ ref_isotropize(sum(cores)) @ Vh_ref
    assert rel(fused_delta(low, "iso_c", {"alpha": 1.0}, WEIGHTS), expected) < TOL
    assert rel(fused_delta(low, "core_space", {"inner": "iso_c", "alpha": 1.0}, WEIGHTS), expected) < TOL


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_the_reference(fraction):
    full = adapters_for([4, 4, 4], d_out=14, d_in=10)
    expected = 0.7 * ref_iso_cts(dense_tasks(full, WEIGHTS), fraction)
    params = {"alpha": 0.7, "common_fraction": fraction}
    assert rel(fused_delta(full, "iso_cts", params, WEIGHTS), expected) < TOL
    low = adapters_for([4, 3, 5], d_out=40, d_in=30, seed=2)  # R = 12: min(shape) -> R
    expected = ref_iso_cts(dense_tasks(low, WEIGHTS), fraction, dim=12)
    assert (
        rel(fused_delta(low, "iso_cts", {"alpha": 1.0, "common_fraction": fraction}, WEIGHTS), expected) < TOL
    )


def test_tsv_matches_the_reference_and_core_space_tsv():
    adapters = adapters_for([4, 4, 4], d_out=40, d_in=30)
    tvs = dense_tasks(adapters, WEIGHTS)
    assert rel(fused_delta(adapters, "tsv", {"alpha": 1.0}, WEIGHTS), ref_tsv(tvs, [4, 4, 4])) < TOL
    cores, U_ref, Vh_ref = ref_core(*folded_factors(adapters, WEIGHTS))
    core_tsv = U_ref @ ref_core_tsv(cores) @ Vh_ref  # int(R/K) = r: the LoRA's nonzero triplets
    assert rel(ref_tsv(tvs, [4, 4, 4]), core_tsv) < TOL
    assert rel(fused_delta(adapters, "core_space", {"inner": "tsv", "alpha": 1.0}, WEIGHTS), core_tsv) < TOL
    truncated = fused_delta(adapters, "tsv", {"alpha": 2.0, "rank_per_task": 2}, WEIGHTS)
    assert rel(truncated, 2.0 * ref_tsv(tvs, [2, 2, 2])) < TOL


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_knots_ties_matches_the_reference(density):
    adapters = adapters_for([4, 2, 3], d_out=24, d_in=18)
    expected = ref_knots_ties(dense_tasks(adapters, WEIGHTS), density, alpha=0.6)
    got = fused_delta(adapters, "knots", {"density": density, "alpha": 0.6}, WEIGHTS)
    assert rel(got, expected) < TOL


def test_knots_dare_drops_in_the_aligned_basis_and_is_seeded():
    adapters = adapters_for([4, 4, 4], d_out=24, d_in=18)
    no_drop = fused_delta(adapters, "knots", {"inner": "dare", "drop": 0.0, "density": 1.0, "alpha": 0.7})
    expected = ref_knots_ties(dense_tasks(adapters, [1 / 3] * 3), 1.0, alpha=0.7)
    assert rel(no_drop, expected) < TOL
    run = lambda seed: fused_delta(adapters, "knots", {"inner": "dare", "alpha": 0.7}, seed=seed)  # noqa: E731
    torch.testing.assert_close(run(3), run(3))
    assert rel(run(3), run(4)) > 1e-3 and rel(run(3), no_drop) > 1e-3
    with pytest.raises(FusionConfigError, match="inner='dare'"):
        fuse_adapters(adapters, "knots", params={"drop": 0.2})


@pytest.mark.parametrize("density", [0.1, 0.4])
def test_core_space_matches_the_reference(density):
    adapters = adapters_for([4, 4, 4], d_out=30, d_in=26, seed=3)
    cores, U_ref, Vh_ref = ref_core(*folded_factors(adapters, WEIGHTS))
    for (A, B), M in zip(zip(*folded_factors(adapters, WEIGHTS), strict=True), cores, strict=True):
        assert rel(U_ref @ M @ Vh_ref, B @ A) < 1e-9  # the core space is exact
    ties = U_ref @ ref_ties_mean(torch.stack([c.flatten() for c in cores]), density).view(12, 12) @ Vh_ref
    got = fused_delta(adapters, "core_space", {"inner": "ties", "density": density, "alpha": 1.0}, WEIGHTS)
    assert rel(got, ties) < TOL
    ta = fused_delta(adapters, "task_arithmetic", {}, [3 * w for w in WEIGHTS])
    assert rel(fused_delta(adapters, "core_space", {"inner": "ta", "alpha": 1.0}, WEIGHTS), ta) < TOL
    assert (
        rel(fused_delta(adapters, "core_space", {"inner": "dare", "drop": 0.0, "alpha": 1.0}, WEIGHTS), ta)
        < TOL
    )


@pytest.mark.parametrize("eta", [40.0, 75.0, 100.0])
def test_star_matches_the_reference(eta):
    adapters = adapters_for([5, 3, 4], d_out=22, d_in=16, seed=4)
    expected = sum(
        w * ref_star(a.modules["m"].delta(), eta) for a, w in zip(adapters, [0.5, -0.2, 0.3], strict=True)
    )
    assert rel(fused_delta(adapters, "star", {"eta": eta}, [0.5, -0.2, 0.3]), expected) < TOL
    if eta == 100.0:  # keeping the whole spectrum is the plain weighted sum
        ta = fused_delta(adapters, "task_arithmetic", {}, [0.5, -0.2, 0.3])
        assert rel(fused_delta(adapters, "star", {"eta": eta}, [0.5, -0.2, 0.3]), ta) < TOL


# ---- hyperparameters on support examples --------------------------------------------------------


def test_alpha_is_picked_on_support_examples_and_recorded():
    adapters = adapters_for([3, 3], d_out=12, d_in=10)
    unit = fused_delta(adapters, "iso_c", {"alpha": 1.0})
    target = 1.75 * unit  # the support loss is smallest at alpha = 1.75, a grid point

    def loss_fn(candidate: LoraAdapter) -> float:
        return float(((candidate.modules["m"].delta() - target) ** 2).sum())

    result = fuse_adapters(adapters, "iso_c", context=FusionContext(loss_fn=loss_fn))
    details = result.provenance["details"]
    assert details["hyperparameters"] == {"alpha": 1.75} and details["source"] == {"alpha": "support"}
    assert len(details["candidates"]) == 12 and details["support_loss"] < 1e-8
    assert rel(result.adapter.modules["m"].delta(), target) < TOL
    given = fuse_adapters(adapters, "iso_c", params={"alpha": 0.5}, context=FusionContext(loss_fn=loss_fn))
    assert given.provenance["details"] == {"hyperparameters": {"alpha": 0.5}, "source": {"alpha": "given"}}
    default = fuse_adapters(adapters, "iso_c").provenance["details"]
    assert default == {"hyperparameters": {"alpha": 1.0}, "source": {"alpha": "default"}}


def test_knots_searches_density_and_alpha_together():
    adapters = adapters_for([3, 3, 3], d_out=12, d_in=10)
    target = fused_delta(adapters, "knots", {"density": 0.4, "alpha": 0.3})
    calls = []

    def loss_fn(candidate: LoraAdapter) -> float:
        calls.append(1)
        return float(((candidate.modules["m"].delta() - target) ** 2).sum())

    details = fuse_adapters(adapters, "knots", context=FusionContext(loss_fn=loss_fn)).provenance["details"]
    assert details["hyperparameters"] == {"density": 0.4, "alpha": 0.3}
    assert len(calls) == len(details["candidates"]) == 5 * 10


def test_zero_updates_merge_to_zero_not_nan():
    adapters = adapters_for([2, 2], d_out=8, d_in=6)
    for method in ("iso_c", "iso_cts", "tsv", "knots", "core_space", "star"):
        delta = fused_delta(adapters, method, {}, [0.0, 0.0])
        assert torch.isfinite(delta).all() and delta.abs().max() == 0, method


# ---- RegMean ------------------------------------------------------------------------------------


def ref_reduce_non_diag(G: torch.Tensor, a: float) -> torch.Tensor:  # RegMean reference
    weight = torch.diag(torch.ones(G.shape[0], dtype=G.dtype) - a) + torch.full_like(G, a)
    return G * weight


def ref_regmean(weights: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """bloomberg/dataless-model-merging ``regmean_merge`` for one ``y = W x`` layer."""
    sum_gram_m_ws = sum(G @ W.T for W, G in zip(weights, grams, strict=True))
    return (torch.inverse(sum(grams)) @ sum_gram_m_ws).T


def random_grams(
    tasks: list[str], modules: dict[str, int], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for task in tasks:
        out[task] = {}
        for name, d_in in modules.items():
            X = torch.randn(50, d_in, generator=g, dtype=torch.float64) * torch.rand(
                d_in, generator=g, dtype=torch.float64
            )
            out[task][name] = X.T @ X / 50
    return out


@pytest.mark.parametrize("shrink", [1.0, 0.4])
def test_regmean_matches_the_reference_with_a_module_one_adapter_lacks(shrink):
    g = torch.Generator().manual_seed(5)
    adapters = adapters_for([3, 2, 4], d_out=12, d_in=10, seed=5)
    extra = LoraModule(torch.randn(2, 10, generator=g), torch.randn(12, 2, generator=g), scaling=0.5)
    adapters[1].modules["n"] = extra  # only the second adapter targets "n"
    tasks = ["a", "b", "c"]
    grams = random_grams(tasks, {"m": 10, "n": 10})
    result = fuse_adapters(
        adapters, "regmean", params={"shrink": shrink}, tasks=tasks, context=FusionContext(grams=grams)
    )
    W0 = torch.randn(12, 10, generator=g, dtype=torch.float64)  # the base cancels
    for name in ("m", "n"):
        task_weights = [W0 + (a.modules[name].delta() if name in a.modules else 0) for a in adapters]
        shrunk = [ref_reduce_non_diag(grams[t][name], shrink) for t in tasks]
        expected = ref_regmean(task_weights, shrunk) - W0
        assert rel(result.adapter.modules[name].delta(), expected) < TOL, name
    assert result.provenance["details"]["source"] == {"shrink": "given"}


def test_regmean_refuses_missing_inputs_before_any_work():
    adapters = adapters_for([2, 2], d_out=8, d_in=6)
    with pytest.raises(FusionConfigError, match="Gram matrices"):
        fuse_adapters(adapters, "regmean", tasks=["a", "b"])
    with pytest.raises(FusionConfigError, match="task of each adapter"):
        fuse_adapters(adapters, "regmean", context=FusionContext(grams={}))
    with pytest.raises(FusionConfigError, match="no Gram matrices for task"):
        fuse_adapters(
            adapters, "regmean", tasks=["a", "b"], context=FusionContext(grams=random_grams(["a"], {"m": 6}))
        )
    with pytest.raises(FusionConfigError, match="positive"):
        fuse_adapters(
            adapters,
            "regmean",
            [1.0, -1.0],
            tasks=["a", "b"],
            context=FusionContext(grams=random_grams(["a", "b"], {"m": 6})),
        )
