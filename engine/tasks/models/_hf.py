"""Building transformers models from a local directory or a config dict (never from the hub)."""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.tasks.errors import TaskError
from engine.tasks.spec import ModelSpec
from engine.tasks.tokenizers import TextEncoder, build_text_encoder


def build_transformers_model(spec: ModelSpec, auto_class: Any, **overrides: Any) -> nn.Module:
    """``auto_class`` (e.g. ``AutoModelForCausalLM``) from ``spec.path`` or ``spec.config``.

    Args:
        spec: a ``causal_lm`` or ``seq_cls`` spec.
        auto_class: the transformers auto class to build with.
        overrides: config attributes to set (e.g. ``num_labels``).

    Raises:
        TaskError: naming ``path`` or ``config`` when the model cannot be built.
    """
    from transformers import AutoConfig

    if spec.path is not None:
        try:
            return auto_class.from_pretrained(spec.path, local_files_only=True, **overrides)
        except (OSError, ValueError) as exc:
            raise TaskError(
                f"model path {spec.path!r}: cannot load a transformers model ({exc}); give a local "
                "directory written by save_pretrained (nothing is downloaded)"
            ) from None
    config_args = dict(spec.config)
    model_type = config_args.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **config_args)
        for key, value in overrides.items():
            setattr(config, key, value)
        return auto_class.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise TaskError(
            f"model config (model_type {model_type!r}): cannot build a model from it ({exc})"
        ) from None


def check_vocab(model: nn.Module, text: TextEncoder) -> None:
    """Raise :class:`TaskError` if the tokenizer can produce ids the model has no embedding for."""
    rows = model.get_input_embeddings().num_embeddings
    if text.vocab_size > rows:
        raise TaskError(
            f"tokenizer has {text.vocab_size} tokens but the model embeds only {rows}; "
            "use a matching tokenizer or raise the model's vocab_size"
        )


class TextTaskMixin:
    """The task's text encoder (tokenizer), built on first use from ``spec.tokenizer``."""

    _text: TextEncoder | None = None

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = build_text_encoder(self.spec.tokenizer)
        return self._text
