"""Layouts of real base models, computed from their published transformers configs (no download).

A preset names a model family's published shape (hidden size, MLP width, layers, attention and
key/value heads), the LoRA target modules and the rank; :func:`model_layout` builds the
transformers config object from those values and derives every target module's
``[d_out, d_in]`` from it — grouped-query attention included (Llama-3-8B: ``k_proj``/``v_proj``
4096 -> 1024, ``gate_proj``/``up_proj`` 4096 -> 14336, ``down_proj`` back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.adapters.layout import Layout, ModuleSpec

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelPreset:
    """A published base-model shape plus the LoRA targets and rank of a preset.

    Attributes:
        config_class: the transformers config class name (``LlamaConfig``, ...).
        base_model: the model's hub id (a label only: nothing is downloaded).
        config: the published config values the module shapes depend on.
        targets: LoRA target module names (``q_proj``, ..., ``down_proj``).
        r: LoRA rank (the layout's ``r_max``).
    """

    config_class: str
    base_model: str
    config: dict[str, Any]
    targets: tuple[str, ...]
    r: int


_LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
_MISTRAL_7B = dict(_LLAMA3_8B)  # Mistral-7B-v0.1 has Llama-3-8B's shapes (vocabulary aside)
_QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}

MODEL_PRESETS: dict[str, ModelPreset] = {
    "llama3-8b-qv-r16": ModelPreset(
        "LlamaConfig", "meta-llama/Meta-Llama-3-8B", _LLAMA3_8B, ("q_proj", "v_proj"), 16
    ),
    "llama3-8b-all-r16": ModelPreset(
        "LlamaConfig", "meta-llama/Meta-Llama-3-8B", _LLAMA3_8B, ATTENTION + MLP, 16
    ),
    "mistral-7b-all-r16": ModelPreset(
        "MistralConfig", "mistralai/Mistral-7B-v0.1", _MISTRAL_7B, ATTENTION + MLP, 16
    ),
    "qwen2.5-0.5b-all-r16": ModelPreset("Qwen2Config", "Qwen/Qwen2.5-0.5B", _QWEN25_05B, ATTENTION + MLP, 16),
}


def preset_config(name: str):
    """The transformers config object of preset ``name`` (built from its published values)."""
    import transformers

    preset = _preset(name)
    return getattr(transformers, preset.config_class)(**preset.config)


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` of one decoder layer's linear projections, from a transformers
    config of the Llama family (Llama, Mistral, Qwen2): query heads and key/value heads may
    differ (GQA), and ``head_dim`` defaults to ``hidden_size / num_attention_heads``."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def layout_from_config(config, targets: tuple[str, ...], r: int, base_model: str) -> Layout:
    """The layout of a LoRA on ``targets`` at rank ``r`` over every layer of ``config``'s model,
    with the module names PEFT gives them (``model.layers.{i}.self_attn.q_proj``, ``...mlp.up_proj``)."""
    shapes = module_shapes(config)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; known: {sorted(shapes)}")
    specs = tuple(
        ModuleSpec(f"model.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}", *shapes[t])
        for i in range(config.num_hidden_layers)
        for t in targets
    )
    return Layout(base_model=base_model, modules=specs, r_max=r)


def model_layout(name: str, base_model: str | None = None) -> Layout:
    """The layout of preset ``name`` (see :data:`MODEL_PRESETS`); ``base_model`` overrides the
    preset's hub id as the layout's label."""
    preset = _preset(name)
    return layout_from_config(preset_config(name), preset.targets, preset.r, base_model or preset.base_model)


def _preset(name: str) -> ModelPreset:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
