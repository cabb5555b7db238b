"""A tiny Llama-architecture causal LM and token-level sequence tasks, for the demo and tests.

Inputs share one format and a task-prefix token selects the output, so tasks genuinely conflict:
``[task, x_1..x_L, SEP, y_1..y_L]`` where ``y`` is ``x`` copied, reversed, sorted or shifted.
Everything is built from a config with a fixed seed: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, SEP = 0, 1, 2
DIGIT0, NUM_DIGITS = 10, 10
SEQ_LEN = 6
TASKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "copy": lambda x: x,
    "reverse": lambda x: x.flip(-1),
    "sort": lambda x: x.sort(dim=-1).values,
    "shift": lambda x: (x + 1) % NUM_DIGITS,
}
TASK_TOKEN = {name: 3 + i for i, name in enumerate(TASKS)}


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=DIGIT0 + NUM_DIGITS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=SEP,
    )


def build_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    build_tiny_llama(seed).save_pretrained(path, safe_serialization=True)
    return path


def task_batch(task: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[n, 2 * SEQ_LEN + 2]``; labels are -100 outside the answer."""
    digits = torch.randint(0, NUM_DIGITS, (n, SEQ_LEN), generator=generator)
    answer = TASKS[task](digits)
    prefix = torch.tensor([TASK_TOKEN[task]]).expand(n, 1)
    sep = torch.full((n, 1), SEP)
    input_ids = torch.cat([prefix, digits + DIGIT0, sep, answer + DIGIT0], dim=1)
    labels = input_ids.clone()
    labels[:, : SEQ_LEN + 2] = -100
    return input_ids, labels


@torch.no_grad()
def task_loss(model, task: str, n: int = 256, seed: int = 1234) -> float:
    """Mean answer-token cross-entropy of ``model`` on ``n`` fresh examples of ``task``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, labels = task_batch(task, n, generator)
    return float(model(input_ids=input_ids, labels=labels).loss)


def train_lora(model, task: str, seed: int, steps: int = 60, batch_size: int = 32, lr: float = 5e-3) -> None:
    """Train the LoRA parameters of a PEFT ``model`` in place on ``task``."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        input_ids, labels = task_batch(task, batch_size, generator)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
