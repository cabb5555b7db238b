"""Subspace algebra shared by the spectral merges (KnOTS, Iso-C/CTS, TSV, Core Space, STAR).

Pure tensor math. Every routine works on LoRA factors ``(A [r, d_in], B [d_out, r])`` or on small
dense matrices (a core space, a stack of right singular vectors); none forms a dense
``d_out x d_in`` update. Computations run in float64: the merges compare and re-weight singular
values, and float32 QR of nearly dependent factors loses the small ones.
"""

from __future__ import annotations

import torch

from engine.adapters.lora import LoraModule

# Singular values below this fraction of the largest are the numerical null space of a low-rank
# product: their singular vectors are arbitrary, so no merge may give them weight.
RELATIVE_TOL = 1e-6


def task_factors(
    modules: list[LoraModule], weights: list[float], count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each task's update as float64 factors ``(A_i, count * w_i * s_i * B_i)``.

    The 2025 merges take unweighted task vectors and one global scale ``alpha``; the fusion's
    weights enter as relative emphases: task ``i`` counts ``count * w_i`` times (``count`` = number
    of fused adapters), so the default uniform weights ``1/K`` give the papers' inputs exactly.
    """
    return [
        (m.A.double(), m.B.double() * (m.scaling * w * count)) for m, w in zip(modules, weights, strict=True)
    ]


def stacked(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [R, d_in], B [d_out, R])`` with ``B @ A = sum_i B_i A_i`` (float64 concatenation)."""
    return torch.cat([a.double() for a, _ in factors]), torch.cat([b.double() for _, b in factors], dim=1)


def zero_update(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-1 zero update of the factors' shapes: what a merge of all-zero updates returns."""
    a, b = factors[0]
    return torch.zeros(1, a.shape[1], dtype=torch.float64), torch.zeros(b.shape[0], 1, dtype=torch.float64)


def thin_svd(
    A: torch.Tensor, B: torch.Tensor, tol: float | None = RELATIVE_TOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``B @ A`` from QR factors of ``B`` and ``A^T`` and an ``r x r`` SVD.

    Args:
        A: ``[r, d_in]``.
        B: ``[d_out, r]``.
        tol: drop singular values ``<= tol * max``; ``None`` keeps all ``min(r, d_out, d_in)``.

    Returns:
        ``(U [d_out, k], s [k], Vh [k, d_in])`` in float64, ``s`` decreasing.
    """
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = s.shape[0] if tol is None else int((s > tol * s.max().clamp_min(1e-300)).sum())
    return q_b @ u[:, :keep], s[:keep], (q_a @ vh[:keep].T).T


def concat_svd(
    factors: list[tuple[torch.Tensor, torch.Tensor]], tol: float = RELATIVE_TOL
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """SVD of the column-concatenation ``[B_1 A_1 | ... | B_K A_K]`` (``d_out x K d_in``).

    ``[B_1 ... B_K] @ blockdiag(A_1, ..., A_K)``: QR of the stacked ``B``'s, QR of each ``A_i^T``,
    and an SVD of the ``R x R`` core (``R = sum r_i``).

    Returns:
        ``(U [d_out, k], s [k], [Vh_1, ..., Vh_K])`` with ``Vh_i [k, d_in]``: task ``i``'s block of
        the right singular vectors, so ``B_i A_i = U diag(s) Vh_i``.
    """
    q_b, r_b = torch.linalg.qr(torch.cat([b.double() for _, b in factors], dim=1))
    q_as, r_as = zip(*(torch.linalg.qr(a.double().T) for a, _ in factors), strict=True)
    core = r_b @ torch.block_diag(*(r.T for r in r_as))
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = int((s > tol * s.max().clamp_min(1e-300)).sum())
    blocks = torch.split(vh[:keep], [q.shape[1] for q in q_as], dim=1)
    return q_b @ u[:, :keep], s[:keep], [blk @ q.T for blk, q in zip(blocks, q_as, strict=True)]


def left_singular_vectors(M: torch.Tensor) -> torch.Tensor:
    """``U`` of the thin SVD of a tall ``M [d, k]`` from its QR and a ``k x k`` SVD (signs aside)."""
    q, r = torch.linalg.qr(M.double())
    return q @ torch.linalg.svd(r)[0]


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor ``P Q^T`` of ``X = P S Q^T`` (nearest matrix with orthonormal columns).

    TSV and Iso-CTS decorrelate stacked singular vectors this way; ``X`` is tall and thin
    (``[d, k]``, ``k`` at most the summed ranks), so this costs ``d k^2``.
    """
    p, _, qh = torch.linalg.svd(X, full_matrices=False)
    return p @ qh


def isotropic(M: torch.Tensor) -> torch.Tensor:
    """``mean(s) U V^T`` of a small dense ``M = U diag(s) V^T`` (Iso-C's flattened spectrum)."""
    u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    return s.mean() * (u @ vh)


def trim_rows(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each row's top ``density`` fraction of entries by magnitude (TIES' trim).

    Convention of the TIES/KnOTS reference code (``topk_values_mask``): the threshold is the
    ``(n - int(n * density))``-th smallest magnitude of the row and every entry at or above it stays.
    """
    if density >= 1:
        return stacked
    n = stacked.shape[1]
    kth = max(1, n - int(n * density))
    threshold = stacked.abs().kthvalue(kth, dim=1, keepdim=True).values
    return stacked * (stacked.abs() >= threshold)


def ties_rows(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on ``[K, n]`` rows: trim, elect the sign of the summed values, disjoint mean.

    A zero elected sign takes the sign of the sum of all elected signs (the reference's
    ``resolve_zero_signs(..., "majority")``); an entry no task keeps is 0.
    """
    trimmed = trim_rows(stacked, density)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    count = (selected != 0).sum(dim=0).clamp_min(1)
    return selected.sum(dim=0) / count


def dare_drop(tensor: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability ``drop`` and rescale the rest by ``1 / (1 - drop)`` (DARE)."""
    if drop <= 0:
        return tensor
    keep = torch.bernoulli(torch.full(tensor.shape, 1 - drop, dtype=torch.float64), generator=generator)
    return tensor * keep.to(tensor.dtype) / (1 - drop)


def tsv_dense(matrices: list[torch.Tensor], keep: int | None = None) -> torch.Tensor:
    """TSV-Merge of small dense matrices (e.g. Core Space's cores), as the reference does it.

    Each task keeps its top ``keep`` singular triplets (default ``int(min(shape) / K)``, the
    reference's ``sv_reduction = 1/K``); the concatenated left and right singular vectors are
    replaced by their polar factors and recombined with the kept singular values.
    """
    if keep is None:
        keep = int(min(matrices[0].shape) / len(matrices))
    us, ss, vhs = [], [], []
    for M in matrices:
        u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
        us.append(u[:, :keep]), ss.append(s[:keep]), vhs.append(vh[:keep])
    U, S, Vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return polar(U) @ torch.diag(S) @ polar(Vh.T).T
