"""The ceiling reference of a task set: one LoRA trained jointly on all its tasks' full training data.

No fusion method sees this much data (they see the tasks' adapters and at most their support
examples); the row says how close to the own adapters a single adapter of the same rank can get
at all (docs/design.md §4, the ceiling row). Generative suite only: the encoder's tasks each
need their own head, which a joint LoRA would have to share.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.lab import generative
from benchmarks.lab.tasks import read_split
from benchmarks.lab.training import run_training
from engine.adapters import load_adapter
from engine.adapters.lora import LoraAdapter
from engine.tasks.chartok import CharTokenizer

RANK = 8
STEPS_PER_TASK = 160  # ~5 epochs of each task's 1,024 training examples at batch 32
LR = 3e-3
BATCH = 32


def joint_lora(suite: dict[str, Any], tasks: list[str], seed: int) -> LoraAdapter:
    """Train a rank-8 LoRA on the union of ``tasks``' training splits (the lab's recipe)."""
    from peft import get_peft_model

    tokenizer = CharTokenizer.load(suite["tokenizer"]["path"])
    examples = [row for task in tasks for row in read_split(suite, task, "train")]
    data = generative.encode_examples(tokenizer, examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = get_peft_model(
            generative.load_base(suite["base_model"]["path"]), generative.lora_config(RANK)
        )

        def batch_loss(rows: torch.Tensor) -> torch.Tensor:
            total, count = generative._batch_loss(model, *(t[rows] for t in data))
            return total / count

        index = torch.arange(len(examples))
        run_training(
            model, index, STEPS_PER_TASK * len(tasks), [], seed, LR, BATCH, lambda _s: None, batch_loss
        )
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory, save_embedding_layers=False)
            return load_adapter(Path(directory))
