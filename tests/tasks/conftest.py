"""Fixtures of the task tests: specs of the three model kinds, examples files, adapters."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine.demo.tasks import lab_model_spec
from engine.tasks import ModelSpec, task_model

WORDS = ["good", "bad", "fine", "awful", "great", "meh", "film", "book", "very", "not"]
BERT_VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", *WORDS]


def bert_spec_dict() -> dict:
    return {
        "kind": "seq_cls",
        "config": {
            "model_type": "bert",
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "num_labels": 3,
        "tokenizer": {
            "kind": "whitespace",
            "vocab": BERT_VOCAB,
            "pad_token": "[PAD]",
            "bos_token": "[CLS]",
            "eos_token": "[SEP]",
            "unk_token": "[UNK]",
            "add_eos": True,
        },
        "max_length": 16,
    }


def custom_spec_dict() -> dict:
    return {
        "kind": "custom",
        "factory": "tests.tasks.custom_models:tiny_mlp",
        "factory_kwargs": {"d_in": 4},
        "num_labels": 3,
    }


@pytest.fixture(scope="session")
def lab_spec() -> ModelSpec:
    return lab_model_spec()


@pytest.fixture(scope="session")
def bert_spec() -> ModelSpec:
    return ModelSpec.model_validate(bert_spec_dict())


@pytest.fixture(scope="session")
def custom_spec() -> ModelSpec:
    return ModelSpec.model_validate(custom_spec_dict())


def save_lora(base: torch.nn.Module, path: Path, seed: int = 0, train=None, **config) -> Path:
    """Save a LoRA for ``base`` (random non-zero init, optionally trained); ``base`` is untouched."""
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        if train is not None:
            train(model)
        model.save_pretrained(path, save_embedding_layers=False)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Classification examples over the BERT vocab: label = which of good/bad/other words leads."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        picks = torch.randint(0, len(WORDS), (4,), generator=generator).tolist()
        words = [WORDS[i] for i in picks]
        rows.append({"text": " ".join(words), "label": picks[0] % 3})
    return rows


@pytest.fixture(scope="session")
def bert_task(bert_spec):
    return task_model(bert_spec)


# ---------------------------------------------------------------------------------- a lab catalog
LAB_BASE_ID = "tests/lab-tiny-llama"
LAB_SPLIT = {"eval": 24, "support": 8, "seed": 0}


def train_briefly(task: str, seed: int, steps: int = 12):
    from engine.demo.tiny import train_lora

    return lambda model: train_lora(model, task, seed=seed, steps=steps, batch_size=16, lr=1e-2)


@pytest.fixture(scope="session")
def lab_catalog(tmp_path_factory, lab_spec):
    """A catalog with tasks ``copy`` and ``reverse`` (lab model), a briefly trained adapter per
    task (ingested first) and a random one for ``copy``; returns a namespace of paths and ids."""
    from types import SimpleNamespace

    from engine.catalog import Catalog
    from engine.demo.tasks import write_lab_examples
    from engine.tasks import TaskDefinition, save_task

    root = tmp_path_factory.mktemp("lab")
    catalog = Catalog(root / "catalog")
    base = task_model(lab_spec).build_base()
    dirs, ids = {}, {}
    for i, task in enumerate(("copy", "reverse")):
        dirs[task] = save_lora(
            base,
            root / f"{task}-trained",
            seed=i,
            train=train_briefly(task, seed=i),
            target_modules=["q_proj", "v_proj"],
        )
        report = catalog.ingest([dirs[task]], task=task, base_model=LAB_BASE_ID)
        ids[task] = report.added[0]
        examples = write_lab_examples(root / f"{task}.jsonl", task, 40, seed=100 + i)
        save_task(catalog, TaskDefinition(name=task, model=lab_spec, examples=str(examples), split=LAB_SPLIT))
    random_dir = save_lora(base, root / "copy-random", seed=9, target_modules=["q_proj", "v_proj"])
    ids["copy-random"] = catalog.ingest([random_dir], task="copy", base_model=LAB_BASE_ID).added[0]
    return SimpleNamespace(root=root, catalog=catalog, dirs=dirs, ids=ids)
