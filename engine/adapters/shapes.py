"""Module shapes of a base model from its ``config.json`` alone (no weights are downloaded or read).

The model is built on PyTorch's ``meta`` device with ``transformers``' auto classes, so shapes are
exactly the library's: grouped-query ``k_proj``/``v_proj`` (``hidden -> kv_heads * head_dim``),
MLP ``gate_proj``/``up_proj``/``down_proj``, GPT-2's ``Conv1D`` (weight stored ``[d_in, d_out]``:
PEFT's ``fan_in_fan_out``; the LoRA factors are ``A [r, d_in]``, ``B [d_out, r]`` all the same),
and ``lm_head``. Embedding layers are left out: LoRA on them (``lora_embedding_A/B``) is refused
by :func:`engine.adapters.io.load_adapter`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from engine.adapters.layout import Layout, ModuleSpec


def load_base_config(source: str | os.PathLike | Mapping[str, Any]):
    """A ``transformers`` config from a ``config.json`` path, a directory holding one, or a dict.

    Never touches the network: a hub id is refused (pass the file).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, Mapping):
        data = dict(source)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError("base model config has no model_type")
        return AutoConfig.for_model(model_type, **data)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ValueError(f"base model config {path!r} not found (give a config.json or its directory)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` / ``Conv1D`` of the base model as ``name -> (d_out, d_in)``.

    Names are relative to the model class of ``config.architectures[0]`` (e.g.
    ``LlamaForCausalLM``: ``model.layers.0.self_attn.q_proj``), as PEFT names an adapter's modules;
    without ``architectures``, the causal-LM class of the model type.
    """
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = load_base_config(config)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is not None:
            model = model_class(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):  # weight [d_in, d_out] (fan_in_fan_out)
            shapes[name] = (int(module.weight.shape[1]), int(module.weight.shape[0]))
    return shapes


def matching_modules(shapes: Iterable[str], target_modules: str | list[str]) -> list[str]:
    """The module names PEFT's ``target_modules`` selects (a regex string or a list of suffixes)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=target_modules)
    return [name for name in shapes if check_target_module_exists(config, name)]


def layout_from_config(
    config, target_modules: str | list[str], r_max: int, base_model: str | None = None
) -> Layout:
    """The layout of LoRA adapters of rank up to ``r_max`` on ``target_modules`` of the base model.

    Raises:
        ValueError: ``target_modules`` selects no ``Linear``/``Conv1D`` module of the model.
    """
    config = load_base_config(config)
    shapes = module_shapes(config)
    names = matching_modules(shapes, target_modules)
    if not names:
        raise ValueError(
            f"target_modules {target_modules!r} select no Linear/Conv1D module of the base model"
        )
    base = base_model or getattr(config, "name_or_path", "") or config.model_type
    specs = tuple(ModuleSpec(n, *shapes[n]) for n in Layout.sort_names(names))
    return Layout(base_model=base, modules=specs, r_max=r_max)


def shape_faults(
    adapter_shapes: Mapping[str, tuple[int, int]], base_shapes: Mapping[str, tuple[int, int]]
) -> list[str]:
    """Every module of an adapter that the base model lacks or has with another shape."""
    faults = []
    for name, shape in adapter_shapes.items():
        expected = base_shapes.get(name)
        if expected is None:
            faults.append(f"{name} is not a Linear/Conv1D module of the base model")
        elif tuple(expected) != tuple(shape):
            faults.append(
                f"{name}: delta shape {tuple(shape)} but the base model's module is {tuple(expected)}"
            )
    return faults
