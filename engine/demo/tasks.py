"""The demo's tiny Llama (:mod:`engine.demo.tiny`) as a task model, and its tasks as text examples.

The whitespace vocabulary below reproduces the demo's token ids exactly, so a demo adapter
evaluated through :class:`~engine.tasks.models.CausalLMTask` sees the same tokens it was trained on:
``"<copy> 3 1 4 1 5 9 <sep>"`` -> ``[3, 13, 11, 14, 11, 15, 19, 2]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.demo import tiny
from engine.tasks.spec import ModelSpec

DEMO_VOCAB = [
    "<pad>",
    "<bos>",
    "<sep>",
    *(f"<{name}>" for name in tiny.TASKS),
    *(f"<unused{i}>" for i in range(3 + len(tiny.TASKS), tiny.DIGIT0)),
    *(str(d) for d in range(tiny.NUM_DIGITS)),
]


def demo_model_spec(seed: int = 0) -> ModelSpec:
    """Spec of the demo's tiny Llama (built from its config) with its whitespace tokenizer."""
    config = tiny.tiny_llama_config().to_dict()
    keep = {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    }
    return ModelSpec(
        kind="causal_lm",
        config={k: v for k, v in config.items() if k in keep},
        tokenizer={
            "kind": "whitespace",
            "vocab": DEMO_VOCAB,
            "pad_token": "<pad>",
            "bos_token": "<bos>",
            "add_bos": False,
        },
        max_length=tiny.SEQ_LEN * 2 + 2,
        seed=seed,
    )


def demo_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` examples of a demo task: ``{"prompt": "<task> x1 .. xL <sep>", "completion": "y1 .. yL"}``."""
    if task not in tiny.TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose one of {list(tiny.TASKS)}")
    input_ids, _ = tiny.task_batch(task, n, torch.Generator().manual_seed(seed))
    split = tiny.SEQ_LEN + 2
    return [
        {
            "prompt": " ".join(DEMO_VOCAB[i] for i in row[:split]),
            "completion": " ".join(DEMO_VOCAB[i] for i in row[split:]),
        }
        for row in input_ids.tolist()
    ]


def write_demo_examples(path: str | Path, task: str, n: int, seed: int = 0) -> Path:
    """Write :func:`demo_examples` as JSON Lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in demo_examples(task, n, seed)))
    return path


def save_demo_tokenizer(path: str | Path) -> Path:
    """Save :data:`DEMO_VOCAB` as a transformers tokenizer (``AutoTokenizer.from_pretrained(path)``).

    One token per whitespace-separated word, the same ids as :func:`demo_model_spec`'s tokenizer, no
    BOS added; ``<sep>`` ends a sequence. A server (``tokenizer_kind: hf``) or any transformers
    code can then talk to the tiny Llama in text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unknown = next(token for token in DEMO_VOCAB if token.startswith("<unused"))
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(DEMO_VOCAB)}, unk_token=unknown))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<sep>", unk_token=unknown
    )
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path
