"""Canonical gauge of a LoRA module (pure tensor math).

``B A`` is unchanged by ``(B M, M^-1 A)`` for any invertible ``M``, so adapters trained apart live
in arbitrary bases. The thin SVD ``B A = U S V^T`` fixes one: ``B = U sqrt(S)``,
``A = sqrt(S) V^T``, components by decreasing singular value and each sign chosen so the
largest-magnitude entry of ``u_i`` is positive. It is computed from QR factors of ``B`` and
``A^T`` and an SVD of the small core, never from the dense ``d_out x d_in`` product.
"""

from __future__ import annotations

import torch


def canonical_gauge(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``(A, B)`` in the canonical gauge without forming ``B @ A``.

    Args:
        A: ``[r, d_in]``.
        B: ``[d_out, r]``.

    Returns:
        ``(A_c, B_c)`` with shapes ``[r, d_in]`` and ``[d_out, r]``, float32, ``B_c @ A_c == B @ A``
        up to rounding; components beyond ``min(r, d_in, d_out)`` are zero.
    """
    r = A.shape[0]
    a64, b64 = A.double(), B.double()
    q_b, r_b = torch.linalg.qr(b64)  # [d_out, k_b], [k_b, r]
    q_a, r_a = torch.linalg.qr(a64.T)  # [d_in, k_a], [k_a, r]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core [k_b, k_a]
    left = q_b @ u  # [d_out, k]
    right = q_a @ vh.T  # [d_in, k]
    # Sign convention: the largest-magnitude entry of each left singular vector is positive.
    pivot = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivot, torch.arange(left.shape[1])])
    signs[signs == 0] = 1.0
    root = s.sqrt() * signs
    b_c = left * root  # [d_out, k]
    a_c = (right * root).T  # [k, d_in]
    k = s.shape[0]
    A_out = torch.zeros(r, A.shape[1], dtype=torch.float32)
    B_out = torch.zeros(B.shape[0], r, dtype=torch.float32)
    A_out[:k] = a_c.float()
    B_out[:, :k] = b_c.float()
    return A_out, B_out
