"""Task vectors, the pure part: the record, averaging, example selection and ids (no I/O, no Ray).

A task vector ``v_t [d]`` is the mean over k in-context examples of the base model's last-layer
hidden state (causal LM: at the last token; encoder: pooled), optionally with the task's adapter
applied (the ICM-LoRA reference does so). See docs/design.md §2.3.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.tasks.errors import TaskError


@dataclass
class TaskVector:
    """One task's in-context vector and how it was made.

    Attributes:
        task: task name.
        vector: ``[d]`` float32, the mean last-layer hidden state.
        k: number of in-context examples averaged.
        example_ids: ``[k]`` ids of those examples (:func:`example_id`, a content hash).
        model: hash of the model spec (:func:`spec_hash`); vectors of one model share it.
        with_adapter: whether the task's adapter(s) were applied (else the base alone).
        adapters: catalog ids of the applied adapters (their vectors are averaged); empty when
            ``with_adapter`` is false.
        examples_source: where the examples came from (``task:<name>`` support split, or a file).
        seed: seed of the shuffle that picked the examples.
        created: ISO timestamp.
    """

    task: str
    vector: torch.Tensor
    k: int
    example_ids: list[str]
    model: str
    with_adapter: bool
    adapters: list[str] = field(default_factory=list)
    examples_source: str = ""
    seed: int = 0
    created: str = ""

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (the vector as a list of floats, exact for float32)."""
        return {
            "format": 1,
            "task": self.task,
            "dim": self.dim,
            "vector": [float(x) for x in self.vector.tolist()],
            "k": self.k,
            "example_ids": list(self.example_ids),
            "model": self.model,
            "with_adapter": self.with_adapter,
            "adapters": list(self.adapters),
            "examples_source": self.examples_source,
            "seed": self.seed,
            "created": self.created,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str = "<record>") -> TaskVector:
        """Inverse of :meth:`to_record`.

        Raises:
            TaskError: naming ``source`` if fields are missing or ``dim`` disagrees with the vector.
        """
        required = ("task", "vector", "k", "example_ids", "model", "with_adapter")
        missing = [name for name in required if name not in record]
        if missing:
            raise TaskError(
                f"task vector {source}: missing field(s) {missing}; recompute it with `icmf taskvec`"
            )
        vector = torch.tensor(record["vector"], dtype=torch.float32)
        if vector.dim() != 1 or vector.shape[0] != record.get("dim", vector.shape[0]):
            raise TaskError(
                f"task vector {source}: dim is {record.get('dim')} but the vector has shape "
                f"{tuple(vector.shape)}; the file is damaged, recompute it with `icmf taskvec`"
            )
        return cls(
            task=record["task"],
            vector=vector,
            k=int(record["k"]),
            example_ids=list(record["example_ids"]),
            model=record["model"],
            with_adapter=bool(record["with_adapter"]),
            adapters=list(record.get("adapters", [])),
            examples_source=record.get("examples_source", ""),
            seed=int(record.get("seed", 0)),
            created=record.get("created", ""),
        )


def mean_vector(hidden: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` hidden states (or ``[a, d]`` per-adapter means) -> ``[d]`` float32 mean.

    Raises:
        ValueError: if ``hidden`` is not 2-D with at least one row.
        TaskError: if it holds non-finite values (a model spec's dtype or adapter at fault).
    """
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        raise ValueError(f"expected hidden states [n, d] with n >= 1, got shape {tuple(hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise TaskError("hidden states hold NaN or inf; check the model spec's dtype and the adapter")
    # float64 accumulation: the mean does not depend on how rows were batched or ordered
    return hidden.double().mean(dim=0).float()


def example_id(example: Mapping[str, Any]) -> str:
    """A stable id of one example: the first 16 hex digits of sha256 of its canonical JSON."""
    text = json.dumps(dict(example), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def select_examples(
    examples: Sequence[Mapping[str, Any]], k: int, seed: int, what: str = "the examples"
) -> list[dict[str, Any]]:
    """The first ``k`` of ``examples`` after a shuffle seeded with ``seed``.

    Raises:
        TaskError: if ``k < 1`` or there are fewer than ``k`` examples (saying how many).
    """
    if k < 1:
        raise TaskError(f"k must be >= 1, got {k}")
    if len(examples) < k:
        raise TaskError(
            f"{what} hold {len(examples)} example(s), fewer than k={k}; lower --k, give more "
            "examples (--examples FILE) or a larger support split"
        )
    order = np.random.default_rng(seed).permutation(len(examples))[:k]
    return [dict(examples[int(i)]) for i in order]


def spec_hash(spec: Any) -> str:
    """``sha256:<16 hex>`` of a model spec's canonical JSON (a pydantic model or a dict)."""
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def check_dims(vectors: Mapping[str, TaskVector]) -> None:
    """Vectors of one model must share their dimension.

    Raises:
        TaskError: naming the tasks and dimensions that disagree.
    """
    by_model: dict[str, dict[int, list[str]]] = {}
    for name, vec in vectors.items():
        by_model.setdefault(vec.model, {}).setdefault(vec.dim, []).append(name)
    for model, dims in by_model.items():
        if len(dims) > 1:
            shown = "; ".join(f"d={d}: {sorted(tasks)}" for d, tasks in sorted(dims.items()))
            raise TaskError(
                f"task vectors of model {model} disagree in dimension ({shown}); recompute them "
                "together with the same model spec"
            )
