"""Adapter <-> canonical form <-> flat float32 vector (pure tensor math, no I/O).

Canonical form (docs/design.md §2.1): scaling folded into ``B`` (every canonical adapter has scaling 1),
ranks zero-padded to the layout's ``r_max``, modules the adapter does not target stored as zeros
with ``mask = False``, and optionally each module in the canonical SVD gauge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.adapters.gauge import canonical_gauge
from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.errors import AdapterError


@dataclass
class CanonicalAdapter:
    """An adapter in a layout's canonical form.

    Attributes:
        layout: the layout it lives in.
        A: per layout module, ``[r_max, d_in]`` float32.
        B: per layout module, ``[d_out, r_max]`` float32, scaling folded in.
        mask: ``[M]`` bool, True where the adapter targets the module.
    """

    layout: Layout
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    mask: torch.Tensor

    def delta(self, name: str) -> torch.Tensor:
        """Dense ``B @ A`` of one module, ``[d_out, d_in]`` (tests and small modules only)."""
        i = self.layout.index[name]
        return self.B[i].double() @ self.A[i].double()


def to_canonical(adapter: LoraAdapter, layout: Layout, gauge: bool = False) -> CanonicalAdapter:
    """Map ``adapter`` into ``layout``.

    Args:
        adapter: a validated adapter whose modules all fit ``layout``.
        layout: target layout.
        gauge: put every module in the canonical SVD gauge (see :mod:`engine.adapters.gauge`);
            a module already in it (``in_gauge``, e.g. read from a gauge catalog) is taken as it is.

    Raises:
        AdapterError: if a module is absent from the layout, has another shape, or a larger rank.
    """
    faults = layout.check_fits(adapter)
    if faults:
        raise AdapterError(adapter.source, "; ".join(faults))
    A_list, B_list, mask = [], [], torch.zeros(layout.num_modules, dtype=torch.bool)
    for i, spec in enumerate(layout.modules):
        A = torch.zeros(layout.r_max, spec.d_in, dtype=torch.float32)
        B = torch.zeros(spec.d_out, layout.r_max, dtype=torch.float32)
        module = adapter.modules.get(spec.name)
        if module is not None:
            a, b = module.A.float(), module.B.float() * module.scaling
            if gauge and not module.in_gauge:
                a, b = canonical_gauge(a, b)
            A[: module.rank] = a
            B[:, : module.rank] = b
            mask[i] = True
        A_list.append(A)
        B_list.append(B)
    return CanonicalAdapter(layout=layout, A=A_list, B=B_list, mask=mask)


def to_flat(canonical: CanonicalAdapter) -> torch.Tensor:
    """Flatten to the layout's vector: per module ``A`` then ``B^T``, shape ``[N]`` float32."""
    parts = []
    for A, B in zip(canonical.A, canonical.B, strict=True):
        parts.append(A.reshape(-1))
        parts.append(B.T.reshape(-1))
    return torch.cat(parts).to(torch.float32)


def from_flat(vector: torch.Tensor | np.ndarray, layout: Layout, mask=None) -> CanonicalAdapter:
    """Inverse of :func:`to_flat`.

    Args:
        vector: ``[N]`` flat vector of ``layout``.
        layout: the layout the vector belongs to.
        mask: ``[M]`` module mask; ``None`` marks every module present.
    """
    vector = torch.tensor(np.asarray(vector), dtype=torch.float32)  # copy: inputs may be read-only
    if vector.shape != (layout.size,):
        raise ValueError(
            f"flat vector has shape {tuple(vector.shape)}, layout {layout.layout_id} needs ({layout.size},)"
        )
    A_list, B_list = [], []
    for i, spec in enumerate(layout.modules):
        start = int(layout.offsets[i])
        split = start + layout.r_max * spec.d_in
        A_list.append(vector[start:split].reshape(layout.r_max, spec.d_in).clone())
        B_list.append(vector[split : int(layout.offsets[i + 1])].reshape(layout.r_max, spec.d_out).T.clone())
    if mask is None:
        mask = torch.ones(layout.num_modules, dtype=torch.bool)
    return CanonicalAdapter(layout, A_list, B_list, torch.as_tensor(np.asarray(mask), dtype=torch.bool))


def to_lora(
    canonical: CanonicalAdapter,
    config: dict | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    trim: bool = True,
    source: str = "<canonical>",
    in_gauge: bool = False,
) -> LoraAdapter:
    """Back to a :class:`LoraAdapter` with scaling 1, one module per present layout module.

    Args:
        canonical: the canonical adapter.
        config: PEFT config fields to keep (task type, base model, modules_to_save, ...); rank,
            alpha and target modules are set by :func:`engine.adapters.io.peft_state` on save.
        extras: ``modules_to_save`` tensors to carry along.
        trim: drop trailing rank components that are zero in both ``A`` and ``B`` (the padding),
            keeping at least rank 1.
        in_gauge: the canonical form is in the canonical gauge (a gauge catalog's row): the
            modules say so (:attr:`engine.adapters.lora.LoraModule.in_gauge`).
    """
    modules = {}
    for i, spec in enumerate(canonical.layout.modules):
        if not bool(canonical.mask[i]):
            continue
        A, B = canonical.A[i], canonical.B[i]
        rank = _used_rank(A, B) if trim else A.shape[0]
        modules[spec.name] = LoraModule(
            A=A[:rank].clone(), B=B[:, :rank].clone(), scaling=1.0, in_gauge=in_gauge
        )
    base = dict(config or {})
    base.setdefault("peft_type", "LORA")
    base.setdefault("base_model_name_or_path", canonical.layout.base_model)
    return LoraAdapter(modules=modules, config=base, extras=dict(extras or {}), source=source)


def _used_rank(A: torch.Tensor, B: torch.Tensor) -> int:
    used = (A.abs().sum(dim=1) > 0) | (B.abs().sum(dim=0) > 0)  # [r]
    nonzero = torch.nonzero(used).flatten()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 1


def unflatten(vector: torch.Tensor, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Differentiable inverse of :func:`to_flat`: ``[N]`` -> per module ``(A [r, d_in], B [d_out, r])``.

    Views, not copies: gradients of the factors flow back to ``vector``.
    """
    offsets = layout.offsets
    return [
        module_factors(vector[int(offsets[i]) : int(offsets[i + 1])], spec, layout.r_max)
        for i, spec in enumerate(layout.modules)
    ]


def module_factors(slots: torch.Tensor, spec, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's flat slots (``A`` then ``B^T``) -> views ``(A [r_max, d_in], B [d_out, r_max])``."""
    split = r_max * spec.d_in
    return slots[:split].view(r_max, spec.d_in), slots[split:].view(r_max, spec.d_out).T
