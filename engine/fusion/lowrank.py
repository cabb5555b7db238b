"""Low-rank algebra for fusion (pure tensor math).

A weighted sum of LoRA deltas ``sum_i w_i B_i A_i`` is itself a LoRA of rank ``R = sum_i r_i``:
``[w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K]``. Its best rank-``k`` approximation comes from QR of
the stacked factors and an ``R x R`` SVD — never the dense ``d_out x d_in`` matrix.
"""

from __future__ import annotations

import torch

from engine.adapters.gauge import canonical_gauge


def stack_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: returns ``(A [R, d_in], B [d_out, R])`` with ``B @ A = sum w_i B_i A_i``.

    Args:
        factors: ``(A_i [r_i, d_in], B_i [d_out, r_i])`` with scaling already folded into ``B_i``.
        weights: one weight per factor pair.
    """
    A = torch.cat([a.float() for a, _ in factors], dim=0)
    B = torch.cat([b.float() * w for (_, b), w in zip(factors, weights, strict=True)], dim=1)
    return A, B


def truncate_lowrank(A: torch.Tensor, B: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``B @ A`` (Eckart–Young), without forming it.

    Args:
        A: ``[R, d_in]``.
        B: ``[d_out, R]``.
        rank: target rank; ``None`` keeps the exact product (rank ``R``, in the canonical gauge).

    Returns:
        ``(A_k [k, d_in], B_k [d_out, k])`` with ``k = min(rank, R)``, split as ``B = U sqrt(S)``,
        ``A = sqrt(S) V^T``.
    """
    a, b = canonical_gauge(A, B)
    k = a.shape[0] if rank is None else min(rank, a.shape[0])
    return a[:k].contiguous(), b[:, :k].contiguous()


def lowrank_weighted_sum(
    factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i B_i A_i`` truncated to ``rank`` (exact when ``rank`` is ``None``)."""
    return truncate_lowrank(*stack_factors(factors, weights), rank)


def dense_to_lowrank(
    delta: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense delta, split like PEFT (``B = U S``, ``A = V^T``).

    Args:
        delta: ``[d_out, d_in]``.
        rank: components to keep.
        clamp: optional quantile in (0, 1]; entries of ``B`` and ``A`` are clamped to
            ``±quantile(|entries|)`` as PEFT's ``svd_clamp`` does.

    Returns:
        ``(A [k, d_in], B [d_out, k])``.
    """
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, S.shape[0])
    B = U[:, :k] * S[:k]
    A = Vh[:k]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A.contiguous(), B.contiguous()
