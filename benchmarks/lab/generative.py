"""The generative suite's model: a small Llama-architecture causal LM over characters.

Built from a ``LlamaConfig`` with a seeded random init, pretrained in the lab on generic text
(:func:`pretrain`), saved with ``save_pretrained`` (safetensors) next to its
:class:`~engine.tasks.chartok.CharTokenizer`. Task adapters are PEFT LoRA on the attention
projections; a training sequence is ``<bos> prompt completion <eos>`` with the loss on
``completion <eos>`` only.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.lab.training import run_training
from engine.tasks.chartok import CharTokenizer

BASE_ID = "lab/tiny-llama-char"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE = -100


def llama_config(tokenizer: CharTokenizer, hidden: int, layers: int, heads: int, max_positions: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_model(config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.name_or_path = BASE_ID
    return model


def load_base(path: str | Path):
    """The saved base in eval mode, frozen, named ``BASE_ID`` for PEFT's adapter config."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path))
    model.name_or_path = BASE_ID
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lora_config(rank: int):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
    )


def pretrain(
    model,
    tokenizer: CharTokenizer,
    lines: list[str],
    steps: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step=None,
) -> list[float]:
    """Next-character pretraining on windows of the shuffled, newline-joined corpus.

    AdamW, linear warm-up over the first 5% of steps, cosine decay to 10% of ``lr``.
    Returns the loss of every step.
    """
    rng = random.Random(seed)
    lines = list(lines)
    rng.shuffle(lines)
    stream = torch.tensor(tokenizer.encode("\n".join(lines)))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    bos = torch.full((batch_size, 1), tokenizer.bos_token_id)
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        windows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        ids = torch.cat([bos, windows], dim=1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if on_step:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def encode_examples(
    tokenizer: CharTokenizer, examples: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, ``[n, L]`` right-padded; labels are -100 outside
    ``completion <eos>``."""
    rows, label_rows = [], []
    for ex in examples:
        p = tokenizer.encode(ex["prompt"], add_bos=True)
        c = tokenizer.encode(ex["completion"], add_eos=True)
        rows.append(p + c)
        label_rows.append([IGNORE] * len(p) + c)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def _batch_loss(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed answer-token cross-entropy and the number of answer tokens."""
    length = int(mask.sum(1).max())
    ids, mask, labels = ids[:, :length], mask[:, :length], labels[:, :length]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((target != IGNORE).sum())


def train_lora(
    peft_model,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    index: torch.Tensor,
    steps: int,
    checkpoints: list[int],
    seed: int,
    lr: float,
    batch_size: int,
    on_checkpoint,
    warmup: int = 0,
) -> None:
    """AdamW on rows ``index``, linear warm-up over ``warmup`` steps then a constant learning rate;
    ``on_checkpoint(step)`` at each listed step (eval mode)."""
    ids, mask, labels = data

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        total, count = _batch_loss(peft_model, ids[rows], mask[rows], labels[rows])
        return total / count

    run_training(
        peft_model, index, steps, checkpoints, seed, lr, batch_size, on_checkpoint, batch_loss, warmup=warmup
    )


@torch.no_grad()
def evaluate(
    model, tokenizer: CharTokenizer, examples: list[dict], batch_size: int = 256
) -> dict[str, float]:
    """Answer-token loss (teacher forced, per token incl. ``<eos>``) and greedy exact match."""
    model.eval()
    ids, mask, labels = encode_examples(tokenizer, examples)
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        t, c = _batch_loss(
            model, ids[i : i + batch_size], mask[i : i + batch_size], labels[i : i + batch_size]
        )
        total, count = total + float(t), count + c
    predictions = greedy_complete(model, tokenizer, [ex["prompt"] for ex in examples], batch_size=batch_size)
    exact = sum(p == ex["completion"] for p, ex in zip(predictions, examples, strict=True))
    return {"loss": total / count, "exact_match": exact / len(examples)}


@torch.no_grad()
def greedy_complete(
    model, tokenizer: CharTokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 256
) -> list[str]:
    """Greedy completions (up to ``<eos>``), prompts left-padded; a full forward per new token
    (the model is tiny, and this avoids depending on cache internals)."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        done = torch.zeros(len(ids), dtype=torch.bool)
        generated = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
            generated.append(nxt)
            done |= nxt == tokenizer.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done | (nxt == tokenizer.eos_token_id)).long()[:, None]], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            if done.all():
                break
        for row in torch.stack(generated, 1).tolist():
            text = []
            for t in row:
                if t in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    break
                text.append(t)
            out.append(tokenizer.decode(text))
    return out
