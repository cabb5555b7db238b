"""Example files of both suites: one JSONL file per task and split, written atomically.

Encoder suite: ``{"text": str, "label": int}``. Generative suite: ``{"prompt": str,
"completion": str}``. Splits are ``train`` (adapters are trained on it or on subsets of it),
``support`` (a small labelled set for few-shot fusion, task vectors and latent refinement; never
trained on) and ``eval`` (held-out; every reported number). No input appears in two splits of a
task; in the generative suite the support and eval words are shared by every task (same inputs,
conflicting outputs) and no task trains on them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from benchmarks.lab import encoder_tasks, generative_tasks
from benchmarks.lab.config import EncoderSize, GenerativeSize, derive_seed

SPLITS = ("train", "support", "eval")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def example_paths(suite_dir: Path, task: str) -> dict[str, Path]:
    return {split: suite_dir / "examples" / task / f"{split}.jsonl" for split in SPLITS}


def _complete(paths: dict[str, Path]) -> bool:
    return all(p.is_file() for p in paths.values())


def prepare_encoder(suite_dir: Path, size: EncoderSize, seed: int) -> dict[str, dict[str, Path]]:
    """Write (or find) the example files of every encoder task; returns task -> split -> path."""
    out = {}
    for name in size.tasks:
        paths = example_paths(suite_dir, name)
        if not _complete(paths):
            task = encoder_tasks.TASKS[name]
            rng = random.Random(derive_seed(seed, "encoder", name, "examples"))
            splits = encoder_tasks.split_examples(task.pool(), task.num_classes, dict(size.splits), rng)
            for split in SPLITS:
                write_jsonl(paths[split], [{"text": t, "label": y} for t, y in splits[split]])
        out[name] = paths
    return out


def generative_words(size: GenerativeSize, seed: int) -> dict[str, list[str]]:
    """The word splits of the generative suite: ``support``/``eval`` shared by all tasks, and a
    ``train`` pool each task samples its training words from."""
    words = generative_tasks.word_pool()
    rng = random.Random(derive_seed(seed, "generative", "words"))
    held = {"support": size.splits["support"], "eval": size.splits["eval"]}
    split = generative_tasks.split_words(words, {**held, "train": len(words) - sum(held.values())}, rng)
    return split


def prepare_generative(suite_dir: Path, size: GenerativeSize, seed: int) -> dict[str, dict[str, Path]]:
    """Write (or find) the example files of every generative task; returns task -> split -> path."""
    out = {}
    words = None
    for name in size.tasks:
        paths = example_paths(suite_dir, name)
        if not _complete(paths):
            words = words or generative_words(size, seed)
            rng = random.Random(derive_seed(seed, "generative", name, "examples"))
            train = rng.sample(words["train"], min(size.splits["train"], len(words["train"])))
            chosen = {"train": train, "support": words["support"], "eval": words["eval"]}
            for split in SPLITS:
                write_jsonl(paths[split], [generative_tasks.example(name, w) for w in chosen[split]])
        out[name] = paths
    return out
