"""A catalog of tasks sharing one body with one head per task (tests.tasks.custom_models)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from engine.tasks import task_model
from tests.helpers import save_lora, write_jsonl
from tests.tasks.custom_models import TASK_CLASSES, multi_head_label

BASE_ID = "tests/multi-head-mlp"
SPLIT = {"eval": 16, "support": 8, "seed": 0}


def heads_spec(task: str, seed: int = 0) -> dict:
    """The model spec of ``task``: the shared factory, the task as its argument."""
    return {
        "kind": "custom",
        "factory": "tests.tasks.custom_models:multi_head_mlp",
        "factory_kwargs": {"task": task},
        "num_labels": TASK_CLASSES[task],
        "seed": seed,
    }


def heads_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.rand(n, 4, generator=generator) * 2 - 1).tolist()
    return [{"input": [round(v, 4) for v in x], "label": multi_head_label(task, x)} for x in inputs]


def write_task_files(
    root: Path, task: str, n: int = 64, seed: int = 0, spec_seed: int = 0
) -> tuple[Path, Path]:
    """``(spec.yaml, examples.jsonl)`` of a task under ``root``."""
    spec = root / f"{task}-spec.yaml"
    spec.write_text(yaml.safe_dump(heads_spec(task, spec_seed)))
    return spec, write_jsonl(root / f"{task}.jsonl", heads_rows(task, n, seed))


def heads_adapter(
    root: Path, task: str, seed: int, steps: int = 0, rows: list[dict] | None = None, spec_seed: int = 0
) -> Path:
    """A LoRA on the body (``fc1``, ``fc2``) of ``task``'s model, trained ``steps`` Adam steps
    on ``rows`` with the task's head (random and fixed: the base's)."""
    model = task_model(heads_spec(task, spec_seed))

    def fit(peft_model) -> None:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=3e-2)
        batch = model.encode(rows)
        for _ in range(steps):
            loss = model.loss(peft_model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return save_lora(
        model.build_base(),
        root / f"{task}-lora-{seed}",
        seed=seed,
        train=fit if steps else None,
        target_modules=["fc1", "fc2"],
        r=2,
        lora_alpha=4,
    )
