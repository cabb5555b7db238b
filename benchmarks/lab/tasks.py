"""The lab's suites as engine task models: model specs and per-task example splits.

The lab writes its splits as files (``train``/``support``/``eval`` JSONL); these helpers give the
engine's :class:`~engine.tasks.spec.ModelSpec` of a suite's base model, so the engine's task
models (loss, metrics, hidden states) score lab adapters exactly as the lab trained them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.tasks.spec import ModelSpec

GENERATIVE_MAX_LENGTH = 128  # the lab Llama's max_position_embeddings


def suite_model_spec(suite: dict[str, Any]) -> ModelSpec:
    """The engine model spec of a lab suite (``load_lab(...)["suites"][name]``)."""
    base, tokenizer = suite["base_model"], suite.get("tokenizer")
    if suite["kind"] == "sequence-classification":
        return ModelSpec(
            kind="seq_cls",
            path=base["path"],
            tokenizer={"kind": "hf", "path": tokenizer["path"]},
            max_length=int(tokenizer["max_length"]),
            num_labels=int(base["num_labels"]),
            pooling="mean",
        )
    if suite["kind"] == "causal-lm":
        return ModelSpec(
            kind="causal_lm",
            path=base["path"],
            tokenizer={"kind": "char", "path": tokenizer["path"], "add_bos": True, "add_eos": True},
            max_length=GENERATIVE_MAX_LENGTH,
        )
    if suite["kind"] == "custom-classification":  # benchmarks.lab.features
        return ModelSpec(
            kind="custom",
            factory=base["factory"],
            factory_kwargs={"path": base["path"]},
            num_labels=int(suite["num_labels"]),
        )
    raise ValueError(f"unknown lab suite kind {suite['kind']!r}")


def read_split(suite: dict[str, Any], task: str, split: str) -> list[dict[str, Any]]:
    """The examples of ``task``'s ``split`` (``train``, ``support`` or ``eval``) as dicts."""
    path = Path(suite["tasks"][task]["examples"][split])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def register_tasks(suite: dict[str, Any], variant: str = "main") -> list[str]:
    """Define every kept task of ``suite`` in its ``variant`` catalog (idempotent, and safe when
    several processes register the same suite at once: the definitions are the same).

    Each task's three split files are joined into ``examples/<task>/all.jsonl`` with a ``split``
    column, so the engine uses exactly the lab's splits (:class:`~engine.tasks.spec.SplitSpec`
    ``column``). Returns the task names.
    """
    from engine.catalog import Catalog
    from engine.errors import CatalogError
    from engine.tasks.spec import TaskDefinition
    from engine.tasks.store import save_task, task_names

    catalog = Catalog(suite["catalogs"][variant]["uri"])
    spec = suite_model_spec(suite)
    defined = set(task_names(catalog))
    tasks = sorted(t for t, info in suite["tasks"].items() if info["kept"])
    for task in tasks:
        files = suite["tasks"][task]["examples"]
        joined = Path(files["eval"]).parent / "all.jsonl"
        if not joined.is_file():
            rows = [
                dict(row, split=split)
                for split in ("train", "support", "eval")
                for row in read_split(suite, task, split)
            ]
            tmp = joined.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(joined)
        definition = TaskDefinition(
            name=task,
            model=spec,
            examples=str(joined),
            split={"column": "split"},
            description=suite["tasks"][task].get("description", ""),
        )
        if task not in defined:
            try:
                save_task(catalog, definition)
            except CatalogError:
                if task not in task_names(catalog):  # not another process's identical definition
                    raise
    return tasks
