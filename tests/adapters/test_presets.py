"""Real-model layout presets: module shapes derived from the published transformers configs."""

import dataclasses

import pytest
import torch
import transformers

from engine.adapters.presets import MODEL_PRESETS, layout_from_config, model_layout, preset_config
from engine.catalog.synth import parse_layout


def _shapes_from_model(config) -> dict[str, tuple[int, int]]:
    """Every linear layer's (out, in) of the model the config describes, built on the meta device
    (no memory, no download): the ground truth the arithmetic derivation must match."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_layout_matches_the_model_built_from_its_config(name):
    preset = MODEL_PRESETS[name]
    # Two layers suffice for the per-layer shapes; the full depth is checked below.
    config = preset_config(name)
    config.num_hidden_layers = 2
    truth = _shapes_from_model(config)
    small = layout_from_config(config, preset.targets, preset.r, "x")
    assert {m.name: (m.d_out, m.d_in) for m in small.modules} == {
        n: s for n, s in truth.items() if n.rsplit(".", 1)[-1] in preset.targets
    }
    layout = model_layout(name)
    assert layout.num_modules == preset.config["num_hidden_layers"] * len(preset.targets)
    assert layout.r_max == preset.r and layout.base_model == preset.base_model
    assert parse_layout(name, base_model="b").layout_id == model_layout(name, base_model="b").layout_id


def test_llama3_8b_sizes_and_gqa_shapes():
    qv = model_layout("llama3-8b-qv-r16")
    assert qv.size == 6_815_744  # the figure
    full = model_layout("llama3-8b-all-r16")
    assert full.size == 41_943_040
    shapes = {m.name.rsplit(".", 1)[-1]: (m.d_out, m.d_in) for m in full.modules[:7]}
    assert shapes == {
        "q_proj": (4096, 4096),
        "k_proj": (1024, 4096),
        "v_proj": (1024, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096),
        "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }
    qwen = {
        m.name.rsplit(".", 1)[-1]: (m.d_out, m.d_in) for m in model_layout("qwen2.5-0.5b-all-r16").modules[:7]
    }
    assert qwen["k_proj"] == (128, 896) and qwen["down_proj"] == (896, 4864)


def test_unknown_preset_and_target_are_named():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_layout("llama9-all")
    preset = dataclasses.replace(MODEL_PRESETS["llama3-8b-qv-r16"], targets=("qkv",))
    with pytest.raises(ValueError, match="qkv"):
        layout_from_config(preset_config("llama3-8b-qv-r16"), preset.targets, 16, "x")
