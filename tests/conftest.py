"""Shared fixtures: one local Ray cluster per session, tiny models, real PEFT adapters."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

BASE_ID = "tests/tiny-llama"
HIDDEN = 32


def tiny_llama(seed: int = 0, hidden: int = HIDDEN) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = BASE_ID
    return model


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    model.name_or_path = "tests/tiny-bert"
    return model


def make_adapter(
    path: Path,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    target_modules=("q_proj", "v_proj"),
    base=None,
    **lora_kwargs,
) -> Path:
    """Save a real PEFT LoRA adapter with random (non-zero) A and B."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = base if base is not None else tiny_llama()
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False, **lora_kwargs
        )
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(path, save_embedding_layers=False)
    return path


def rewrite_weights(path: Path, edit) -> None:
    """Apply ``edit(dict of tensors) -> dict of tensors`` to an adapter's safetensors file."""
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(str(file))), str(file))


def rewrite_config(path: Path, **changes) -> None:
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.fixture
def adapter_factory(tmp_path):
    counter = iter(range(10_000))

    def factory(**kwargs) -> Path:
        return make_adapter(tmp_path / f"adapter{next(counter)}", **kwargs)

    return factory


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session."""
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
