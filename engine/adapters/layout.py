"""Layouts: the ordered modules and shapes that map an adapter onto one flat vector."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from engine.adapters.lora import LoraAdapter
from engine.errors import AdapterError

LAYOUT_FORMAT = 1


@dataclass(frozen=True)
class ModuleSpec:
    """One target module of a layout: ``delta_W`` has shape ``[d_out, d_in]``."""

    name: str
    d_out: int
    d_in: int


def _natural_key(name: str) -> list[Any]:
    # 'layers.2' before 'layers.10', so flat vectors follow the model's depth order.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Layout:
    """Ordered modules and shapes for one base model, padded to a common rank ``r_max``.

    The flat vector of an adapter is, module after module, ``A`` (``[r_max, d_in]``, row-major)
    followed by ``B^T`` (``[r_max, d_out]``, row-major): each rank component's ``(a_i, b_i)`` pair
    sits at a fixed offset, and zero-padded components are exact (they add nothing to ``B A``).
    """

    base_model: str
    modules: tuple[ModuleSpec, ...]
    r_max: int

    def __post_init__(self) -> None:
        if self.r_max <= 0:
            raise ValueError(f"Layout.r_max must be positive, got {self.r_max}")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ValueError("Layout.modules has duplicate module names")
        if not self.modules:
            raise ValueError("Layout.modules is empty")

    @classmethod
    def from_adapters(
        cls, adapters: Iterable[LoraAdapter], base_model: str, r_max: int | None = None
    ) -> Layout:
        """The smallest layout holding every module of ``adapters`` (shapes must agree)."""
        shapes: dict[str, tuple[int, int]] = {}
        rank = r_max or 0
        for adapter in adapters:
            for name, module in adapter.modules.items():
                shape = (module.d_out, module.d_in)
                if shapes.setdefault(name, shape) != shape:
                    raise AdapterError(
                        adapter.source,
                        f"{name} has delta shape {shape} but another adapter of the batch has "
                        f"{shapes[name]}: they cannot share a base model",
                    )
                if r_max is None:
                    rank = max(rank, module.rank)
        specs = tuple(ModuleSpec(n, *shapes[n]) for n in cls.sort_names(shapes))
        return cls(base_model=base_model, modules=specs, r_max=rank)

    @staticmethod
    def name_key(name: str) -> list[Any]:
        """Natural sort key: ``layers.2`` before ``layers.10``, so vectors follow model depth."""
        return _natural_key(name)

    @staticmethod
    def sort_names(names: Iterable[str]) -> list[str]:
        return sorted(names, key=_natural_key)

    @cached_property
    def layout_id(self) -> str:
        """Content hash: two layouts with the same id map adapters to the same vector."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def index(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.modules)}

    @cached_property
    def module_sizes(self) -> np.ndarray:
        """Flat length of each module, shape ``[M]``."""
        return np.array([self.r_max * (m.d_in + m.d_out) for m in self.modules], dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Start of each module in the flat vector, shape ``[M + 1]`` (last = total size)."""
        return np.concatenate([[0], np.cumsum(self.module_sizes)])

    @property
    def size(self) -> int:
        """Length ``N`` of the flat vector."""
        return int(self.offsets[-1])

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def slot_mask(self, module_mask: np.ndarray) -> np.ndarray:
        """Expand a per-module mask ``[..., M]`` to a per-slot mask ``[..., N]``."""
        return np.repeat(np.asarray(module_mask, dtype=bool), self.module_sizes, axis=-1)

    def check_fits(self, adapter: LoraAdapter) -> list[str]:
        """Every reason ``adapter`` cannot be written in this layout (empty when it fits)."""
        faults = []
        unknown = [n for n in adapter.modules if n not in self.index]
        if unknown:
            faults.append(
                f"module(s) {', '.join(unknown)} not in layout {self.layout_id} of base model "
                f"{self.base_model!r} (a different base model or target modules?)"
            )
        for name, module in adapter.modules.items():
            spec = self.modules[self.index[name]] if name in self.index else None
            if spec is not None and (module.d_out, module.d_in) != (spec.d_out, spec.d_in):
                faults.append(
                    f"{name}: delta shape {(module.d_out, module.d_in)} differs from the layout's "
                    f"{(spec.d_out, spec.d_in)}: the adapter was trained on another base model"
                )
        too_big = [n for n, m in adapter.modules.items() if m.rank > self.r_max]
        if too_big:
            faults.append(
                f"rank {max(adapter.modules[n].rank for n in too_big)} ({len(too_big)} module(s)) exceeds "
                f"the layout's r_max {self.r_max} (layout {self.layout_id}; a catalog ingest grows its "
                "layout instead)"
            )
        return faults

    # ------------------------------------------------------------------ growth
    def contains(self, other: Layout) -> bool:
        """True when every adapter of ``other`` is exactly representable here: same base model,
        every module of ``other`` present with the same shape, and ``r_max`` at least as large."""
        if other.base_model != self.base_model or other.r_max > self.r_max:
            return False
        return all(m.name in self.index and self.modules[self.index[m.name]] == m for m in other.modules)

    def grown(self, shapes: dict[str, tuple[int, int]] | None = None, r_max: int | None = None) -> Layout:
        """The smallest superset of this layout that also holds ``shapes`` (module -> ``(d_out,
        d_in)``) and rank ``r_max``; ``self`` when nothing is new.

        Raises:
            ValueError: a module of ``shapes`` exists here with another shape.
        """
        merged = {m.name: (m.d_out, m.d_in) for m in self.modules}
        for name, shape in (shapes or {}).items():
            if merged.setdefault(name, tuple(shape)) != tuple(shape):
                raise ValueError(
                    f"{name} has delta shape {tuple(shape)} but layout {self.layout_id} of base model "
                    f"{self.base_model!r} has {merged[name]}: the adapter was trained on another base model"
                )
        rank = max(self.r_max, r_max or 0)
        if len(merged) == self.num_modules and rank == self.r_max:
            return self
        specs = tuple(ModuleSpec(n, *merged[n]) for n in self.sort_names(merged))
        return Layout(base_model=self.base_model, modules=specs, r_max=rank)

    @classmethod
    def union(cls, layouts: Iterable[Layout]) -> Layout:
        """The smallest layout containing every one of ``layouts`` (all of one base model)."""
        layouts = list(layouts)
        if not layouts:
            raise ValueError("Layout.union needs at least one layout")
        if len({lay.base_model for lay in layouts}) != 1:
            raise ValueError("Layout.union: the layouts belong to different base models")
        # One that holds all the others is the union as stored (its module order is kept).
        for candidate in sorted(layouts, key=lambda lay: -lay.size):
            if all(candidate.contains(other) for other in layouts):
                return candidate
        result = layouts[0]
        for other in layouts[1:]:
            result = result.grown({m.name: (m.d_out, m.d_in) for m in other.modules}, other.r_max)
        return result

    def segments_from(self, source: Layout) -> np.ndarray:
        """Where ``source``'s flat vector lands in this layout's, as contiguous copies.

        Returns:
            ``[S, 3]`` int64 rows ``(source start, target start, length)``: two per module of
            ``source`` (its ``A`` rows, then its ``B^T`` rows). A module's ``r`` rank components are
            the first ``r`` rows of each block, so a larger ``r_max`` only appends zero rows; every
            other slot of the target is zero and every module ``source`` lacks is masked off.

        Raises:
            ValueError: if this layout does not contain ``source``.
        """
        if not self.contains(source):
            raise ValueError(f"layout {self.layout_id} does not contain layout {source.layout_id}")
        rows = []
        for i, spec in enumerate(source.modules):
            j = self.index[spec.name]
            src, dst = int(source.offsets[i]), int(self.offsets[j])
            a_len, a_dst_len = source.r_max * spec.d_in, self.r_max * spec.d_in
            rows.append((src, dst, a_len))
            rows.append((src + a_len, dst + a_dst_len, source.r_max * spec.d_out))
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def module_positions(self, source: Layout) -> np.ndarray:
        """``[M_source]``: each of ``source``'s modules' index in this layout."""
        return np.asarray([self.index[m.name] for m in source.modules], dtype=np.int64)

    def embed(self, source: Layout, weights: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``source`` read exactly in this layout: zero padding, absent modules masked.

        Args:
            source: a layout this one contains.
            weights: ``[rows, N_source]`` (or ``[N_source]``).
            mask: ``[rows, M_source]`` (or ``[M_source]``).

        Returns:
            ``(weights [rows, N], mask [rows, M])`` (without the leading axis for 1-D inputs).
        """
        if source.layout_id == self.layout_id:
            return weights, mask
        weights, mask = np.asarray(weights), np.asarray(mask, dtype=bool)
        out = np.zeros((*weights.shape[:-1], self.size), dtype=weights.dtype)
        for src, dst, length in self.segments_from(source).tolist():
            out[..., dst : dst + length] = weights[..., src : src + length]
        out_mask = np.zeros((*mask.shape[:-1], self.num_modules), dtype=bool)
        out_mask[..., self.module_positions(source)] = mask
        return out, out_mask

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "base_model": self.base_model,
            "r_max": self.r_max,
            "modules": [[m.name, m.d_out, m.d_in] for m in self.modules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        if data.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"unsupported layout format {data.get('format')!r}")
        modules = tuple(ModuleSpec(str(n), int(o), int(i)) for n, o, i in data["modules"])
        return cls(base_model=data["base_model"], modules=modules, r_max=int(data["r_max"]))
