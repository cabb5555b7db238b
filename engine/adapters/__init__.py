"""PEFT LoRA adapters: reading, validation, layouts and the canonical flat codec."""

from engine.adapters.codec import CanonicalAdapter, from_flat, to_canonical, to_flat, to_lora
from engine.adapters.gauge import canonical_gauge
from engine.adapters.io import load_adapter, peft_state, save_adapter
from engine.adapters.layout import Layout, ModuleSpec
from engine.adapters.lora import LoraAdapter, LoraModule

__all__ = [
    "CanonicalAdapter",
    "Layout",
    "LoraAdapter",
    "LoraModule",
    "ModuleSpec",
    "canonical_gauge",
    "from_flat",
    "load_adapter",
    "peft_state",
    "save_adapter",
    "to_canonical",
    "to_flat",
    "to_lora",
]
