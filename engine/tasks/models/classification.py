"""Sequence classification with a transformers encoder; the task's head is the adapter's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.tasks.base import (
    BaseTaskModel,
    Batch,
    Example,
    model_device,
    pad_right,
    register_task_model,
    to_device,
)
from engine.tasks.errors import TaskError
from engine.tasks.metrics import (
    classification_example_sums,
    classification_nll,
    finalize_classification,
    masked_mean,
)
from engine.tasks.models._hf import TextTaskMixin, build_transformers_model, check_vocab


def label_tensor(examples: Sequence[Example], num_labels: int | None) -> torch.Tensor:
    """``[n]`` long class ids; :class:`TaskError` naming the example for a bad label."""
    labels = []
    for i, example in enumerate(examples):
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise TaskError(f"example {i}: label {label!r} is not an integer class id")
        if label < 0 or (num_labels is not None and label >= num_labels):
            raise TaskError(f"example {i}: label {label} is outside [0, {num_labels}) (num_labels)")
        labels.append(label)
    return torch.tensor(labels, dtype=torch.long)


@register_task_model("seq_cls")
class SequenceClassificationTask(TextTaskMixin, BaseTaskModel):
    """A transformers sequence classifier; examples ``{"text": str, "label": int}``.

    The base gets a freshly initialised head of ``num_labels`` classes (seeded by ``spec.seed``);
    the task's trained head travels in the adapter's ``modules_to_save``, which PEFT loads.
    Text is tokenised with the tokenizer's special tokens and cut to ``max_length``.

    Metrics: ``loss`` (mean cross-entropy), ``accuracy``. Hidden state: the last encoder layer,
    mean over non-pad tokens (``pooling: mean``) or the first token (``pooling: cls``),
    ``[n, hidden_size]``.
    """

    def _build(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = build_transformers_model(
            self.spec, AutoModelForSequenceClassification, num_labels=self.spec.num_labels
        )
        check_vocab(model, self.text)
        return model

    def _texts(self, examples: Sequence[Example]) -> Batch:
        rows = [self.text.sequence(e["text"])[: self.spec.max_length] for e in examples]
        for i, row in enumerate(rows):
            if not row:
                raise TaskError(f"example {i}: the text has no tokens")
        return {
            "input_ids": pad_right(rows, self.text.pad_token_id),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
        }

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Returns ``input_ids`` ``[n, T]``, ``attention_mask`` ``[n, T]``, ``labels`` ``[n]``."""
        return dict(self._texts(examples), labels=label_tensor(examples, self.spec.num_labels))

    def _forward(self, model: nn.Module, batch: Batch, **kwargs):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return classification_nll(self._forward(model, batch).logits, batch["labels"]).mean()

    def _example_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return classification_example_sums(self._forward(model, batch).logits, batch["labels"])

    def _finalize(self, sums):
        return finalize_classification(sums)

    def _hidden(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        batch = to_device(self._texts(examples), model_device(model))
        hidden = self._forward(model, batch, output_hidden_states=True).hidden_states[-1]  # [n, T, d]
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, batch["attention_mask"])
