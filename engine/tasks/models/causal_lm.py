"""Causal language models (transformers): loss on completion tokens only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    IGNORE_INDEX,
    completion_loss,
    finalize_lm,
    gather_positions,
    lm_example_sums,
)
from engine.tasks.models._hf import TextTaskMixin, build_transformers_model, check_vocab


@register_task_model("causal_lm")
class CausalLMTask(TextTaskMixin, BaseTaskModel):
    """A transformers causal LM; examples ``{"prompt": str, "completion": str}``.

    Each example is ``[BOS] prompt completion [EOS]`` (BOS/EOS per the tokenizer spec); the loss
    is the mean next-token NLL over completion tokens only — prompt and padding positions carry
    label ``-100`` and contribute nothing. Over ``max_length``, the prompt is cut from the left
    (keeping at least its last token), then the completion from the right.

    Metrics: ``loss`` (token-weighted mean over all completion tokens), ``perplexity`` =
    ``exp(loss)``, ``exact_match`` (greedy decoding reproduces the completion's tokens).
    Hidden state: the last layer's (post final norm, what the LM head reads) at the last prompt
    token, ``[n, hidden_size]``.
    """

    def _build(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = build_transformers_model(self.spec, AutoModelForCausalLM)
        check_vocab(model, self.text)
        return model

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Tokenise ``prompt + completion``.

        Returns:
            ``input_ids`` ``[n, T]``, ``attention_mask`` ``[n, T]``, ``labels`` ``[n, T]``
            (``-100`` on prompt and padding), ``prompt_len`` ``[n]``.
        """
        rows, labels, prompt_lens = [], [], []
        for i, example in enumerate(examples):
            prompt, completion = self._tokens(i, example)
            rows.append(prompt + completion)
            labels.append([IGNORE_INDEX] * len(prompt) + completion)
            prompt_lens.append(len(prompt))
        return {
            "input_ids": pad_right(rows, self.text.pad_token_id),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
            "labels": pad_right(labels, IGNORE_INDEX),
            "prompt_len": torch.tensor(prompt_lens, dtype=torch.long),
        }

    def _tokens(self, index: int, example: Mapping) -> tuple[list[int], list[int]]:
        prompt = self.text.prompt(example["prompt"])
        completion = self.text.completion(example["completion"])
        if not completion:
            raise TaskError(f"example {index}: the completion has no tokens; nothing to score")
        if not prompt:
            raise TaskError(
                f"example {index}: empty prompt and no BOS, so the first completion token cannot be "
                "scored; give a prompt or set tokenizer.add_bos"
            )
        limit = self.spec.max_length
        completion = completion[: limit - 1]
        prompt = prompt[-(limit - len(completion)) :]
        return prompt, completion

    def _forward(self, model: nn.Module, batch: Batch, **kwargs):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return completion_loss(self._forward(model, batch).logits, batch["labels"])

    def _example_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return lm_example_sums(self._forward(model, batch).logits, batch["labels"])

    def _finalize(self, sums):
        return finalize_lm(sums)

    def _hidden(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        rows = [self.text.prompt(e["prompt"])[-self.spec.max_length :] for e in examples]
        if not all(rows):
            raise TaskError("an example has an empty prompt and no BOS: it has no last prompt token")
        batch = {
            "input_ids": pad_right(rows, self.text.pad_token_id),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
        }
        batch = to_device(batch, model_device(model))
        hidden = self._forward(model, batch, output_hidden_states=True).hidden_states[-1]  # [n, T, d]
        last = torch.tensor([len(r) - 1 for r in rows])
        return gather_positions(hidden, last)
