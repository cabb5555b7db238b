"""Synthetic catalogs for scale tests: N adapters of a layout, random low-rank weights, several
tasks with long-tailed adapter counts.

Adapters of one task share low-rank factors plus per-adapter noise, ranks vary up to the
layout's ``r_max`` and some adapters skip a module, so catalogs exercise clustering, padding and
masks the way real ones do.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.adapters.codec import to_canonical, to_flat
from engine.adapters.layout import Layout, ModuleSpec
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.adapters.presets import MODEL_PRESETS, model_layout
from engine.catalog.catalog import AdapterRecord, Catalog, adapter_id
from engine.errors import CatalogError

# name -> (layers, module names, hidden size, r_max)
PRESETS: dict[str, tuple[int, tuple[str, ...], int, int]] = {
    "tiny": (2, ("q_proj", "v_proj"), 32, 4),
    "small": (4, ("q_proj", "v_proj"), 128, 8),
    "base": (12, ("q_proj", "v_proj"), 768, 8),
}
_SPEC_KEYS = {"layers", "modules", "d", "r"}


def build_layout(layers: int, modules: tuple[str, ...], d: int, r: int, base_model: str) -> Layout:
    specs = tuple(ModuleSpec(f"model.layers.{i}.self_attn.{m}", d, d) for i in range(layers) for m in modules)
    return Layout(base_model=base_model, modules=specs, r_max=r)


def parse_layout(spec: str, base_model: str = "synthetic/llama") -> Layout:
    """A layout from a preset name (``tiny``, ``small``, ``base``, or a real model's:
    ``llama3-8b-all-r16``, ... see :data:`engine.adapters.presets.MODEL_PRESETS`), a spec such as
    ``layers=4,d=256,r=8,modules=q_proj+v_proj``, or a layout JSON file."""
    if spec in PRESETS:
        return build_layout(*PRESETS[spec], base_model=base_model)
    if spec in MODEL_PRESETS:
        return model_layout(spec, base_model=base_model)
    if Path(spec).is_file():
        try:
            return Layout.from_dict(json.loads(Path(spec).read_text()))
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON or not a layout's fields
            raise CatalogError(f"{spec}: not a layout JSON file ({exc!r})") from None
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    unknown = set(fields) - _SPEC_KEYS
    if not fields or unknown or not re.fullmatch(r"[\w=,+.]+", spec):
        raise CatalogError(
            f"invalid layout {spec!r}: use a preset ({', '.join([*PRESETS, *MODEL_PRESETS])}), a layout JSON "
            "file, or "
            "'layers=4,d=256,r=8,modules=q_proj+v_proj'"
        )
    layers, modules, d, r = PRESETS["small"]
    try:
        return build_layout(
            int(fields.get("layers", layers)),
            tuple(fields["modules"].split("+")) if "modules" in fields else modules,
            int(fields.get("d", d)),
            int(fields.get("r", r)),
            base_model=base_model,
        )
    except ValueError as exc:
        raise CatalogError(f"invalid layout {spec!r}: {exc}") from None


def long_tail_counts(n: int, num_tasks: int, exponent: float = 1.0) -> list[int]:
    """Split ``n`` adapters over ``num_tasks`` tasks with Zipf-like counts (each task >= 1)."""
    if n < num_tasks:
        raise CatalogError(f"need at least one adapter per task: n={n} < tasks={num_tasks}")
    weights = 1.0 / np.arange(1, num_tasks + 1) ** exponent
    counts = np.maximum(1, np.floor(weights / weights.sum() * n)).astype(int)
    counts[0] += n - counts.sum()
    return counts.tolist()


def _task_factors(layout: Layout, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (
            rng.standard_normal((layout.r_max, m.d_in)).astype(np.float32) / np.sqrt(m.d_in),
            rng.standard_normal((m.d_out, layout.r_max)).astype(np.float32) * 0.05,
        )
        for m in layout.modules
    ]


def synthetic_records(
    layout: Layout, n: int, num_tasks: int = 8, seed: int = 0, gauge: bool = True, noise: float = 0.3
) -> Iterator[tuple[Layout, AdapterRecord]]:
    """Generate ``n`` synthetic adapters lazily (memory: one adapter at a time)."""
    rng = np.random.default_rng(seed)
    tasks = [f"synth-{t:02d}" for t in range(num_tasks)]
    factors = [_task_factors(layout, rng) for _ in tasks]
    for task_index, count in enumerate(long_tail_counts(n, num_tasks)):
        for _ in range(count):
            rank = int(rng.integers(max(1, layout.r_max // 2), layout.r_max + 1))
            present = rng.random(layout.num_modules) > 0.1
            present[rng.integers(layout.num_modules)] = True
            modules = {}
            for m, (A, B), keep in zip(layout.modules, factors[task_index], present, strict=True):
                if keep:
                    a = A[:rank] + noise * rng.standard_normal(A[:rank].shape).astype(np.float32) / np.sqrt(
                        m.d_in
                    )
                    b = B[:, :rank] * (1 + noise * rng.standard_normal(B[:, :rank].shape).astype(np.float32))
                    modules[m.name] = LoraModule(torch.from_numpy(a), torch.from_numpy(b), scaling=2.0)
            adapter = LoraAdapter(modules, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank})
            canonical = to_canonical(adapter, layout, gauge=gauge)
            weights = to_flat(canonical).numpy()
            sha = hashlib.sha256(weights.tobytes() + tasks[task_index].encode()).hexdigest()
            meta = {
                "id": adapter_id(tasks[task_index], sha),
                "task": tasks[task_index],
                "base_model": layout.base_model,
                "layout_id": layout.layout_id,
                "rank": rank,
                "alpha": float(2 * rank),
                "target_modules": [m.name for m, keep in zip(layout.modules, present, strict=True) if keep],
                "num_params": adapter.num_lora_params(),
                "sha256": sha,
                "source": f"synthetic:seed={seed}",
                "tags": ["synthetic"],
                "peft_config": json.dumps(
                    {
                        "peft_type": "LORA",
                        "r": rank,
                        "lora_alpha": 2 * rank,
                        "base_model_name_or_path": layout.base_model,
                    }
                ),
                "extras": [],
            }
            yield layout, AdapterRecord(meta, weights, canonical.mask.numpy())


def synthesize(
    catalog: Catalog, n: int, layout: Layout, num_tasks: int = 8, seed: int = 0, progress=None
) -> tuple[int, int]:
    """Add ``n`` synthetic adapters to ``catalog`` (skipping any already there).

    Returns:
        ``(catalog version, adapters added)``.
    """
    settings = catalog._ensure_settings(None)
    known = set(catalog.manifest()["sha256"].to_pylist())
    existing = catalog.layout_for_base_model(layout.base_model)
    if existing is not None and existing.layout_id != layout.layout_id:
        raise CatalogError(
            f"catalog already holds base model {layout.base_model!r} with another layout "
            f"({existing.layout_id}); use another catalog or base model"
        )
    added = 0

    def fresh():
        nonlocal added
        for layout_, record in synthetic_records(layout, n, num_tasks, seed, settings["gauge"]):
            if progress:
                progress(1)
            if record.meta["sha256"] not in known:
                added += 1
                yield layout_, record

    version = catalog.add_records(fresh())
    return version, added
