"""Real model shapes: layouts from a base model's config.json (meta device, nothing downloaded)
agree with the adapters' own shapes; GQA, MLP, GPT-2 Conv1D, lm_head; embeddings and DoRA refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engine.adapters import load_adapter
from engine.adapters.layout import Layout
from engine.adapters.shapes import layout_from_config, module_shapes
from engine.catalog import Catalog
from engine.errors import AdapterError, CatalogError, IngestError
from tests.helpers import make_adapter, tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config).eval()
    model.name_or_path = "tests/tiny-gpt2"
    return model


def test_llama_layout_from_config_equals_the_adapters_own(tmp_path):
    base = tiny_llama()
    base.config.architectures = ["LlamaForCausalLM"]
    adapter = load_adapter(make_adapter(tmp_path / "a", r=8, target_modules=ALL_LINEAR, base=base))
    from_config = layout_from_config(
        base.config.to_dict(), list(ALL_LINEAR), r_max=8, base_model=adapter.base_model
    )
    assert from_config == Layout.from_adapters([adapter], adapter.base_model)
    spec = {m.name: (m.d_out, m.d_in) for m in from_config.modules}
    hidden, kv = base.config.hidden_size, base.config.num_key_value_heads * base.config.head_dim
    assert spec["model.layers.0.self_attn.k_proj"] == (kv, hidden) != (hidden, hidden)  # GQA
    assert spec["model.layers.1.mlp.up_proj"] == (base.config.intermediate_size, hidden)
    assert spec["model.layers.1.mlp.down_proj"] == (hidden, base.config.intermediate_size)
    with pytest.raises(ValueError, match="select no Linear/Conv1D"):
        layout_from_config(base.config.to_dict(), ["nope"], r_max=4)


def test_gpt2_conv1d_adapters_ingest_and_export_exactly(tmp_path):
    base = tiny_gpt2()
    path = make_adapter(
        tmp_path / "g", r=4, target_modules=("c_attn", "c_proj"), base=base, fan_in_fan_out=True
    )
    config = base.config.to_dict()
    shapes = module_shapes(config)
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32)  # Conv1D weight is [32, 96]
    catalog = Catalog(tmp_path / "cat")
    [adapter_id] = catalog.ingest([path], task="g", base_config=config).added
    layout = catalog.layout()
    assert {m.name: (m.d_out, m.d_in) for m in layout.modules}.items() <= shapes.items()
    assert layout == layout_from_config(config, ["c_attn", "c_proj"], r_max=4, base_model="tests/tiny-gpt2")
    original, exported = load_adapter(path), load_adapter(catalog.export(adapter_id, tmp_path / "out"))
    assert exported.config["fan_in_fan_out"] is True
    for name, module in original.modules.items():
        assert rel_err(exported.modules[name].delta(), module.delta()) < 1e-6


def test_lm_head_is_supported_and_embeddings_are_refused_by_name(tmp_path):
    base = tiny_llama()
    head = make_adapter(tmp_path / "head", target_modules=("q_proj", "lm_head"), base=base)
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest([head], task="h", base_config=tiny_llama().config.to_dict())
    spec = catalog.layout().modules[catalog.layout().index["lm_head"]]
    assert (spec.d_out, spec.d_in) == (base.config.vocab_size, base.config.hidden_size)
    embed = make_adapter(tmp_path / "embed", target_modules=("embed_tokens", "q_proj"), base=tiny_llama())
    with pytest.raises(AdapterError, match=r"embed_tokens\.lora_embedding_A.*LoRA on embedding layers"):
        load_adapter(embed)


def test_dora_is_refused_with_a_message_saying_so(tmp_path):
    dora = make_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(IngestError, match="DoRA"):
        Catalog(tmp_path / "cat").ingest([dora], task="d")


def test_base_config_catches_adapters_of_another_model(tmp_path):
    wide = make_adapter(tmp_path / "wide", base=tiny_llama(hidden=48))
    with pytest.raises(IngestError, match=r"but the base model's module is \(32, 32\)"):
        Catalog(tmp_path / "cat").ingest([wide], task="w", base_config=tiny_llama().config.to_dict())
    with pytest.raises(CatalogError, match="cannot read the base model config"):
        Catalog(tmp_path / "cat").ingest([wide], task="w", base_config=tmp_path / "missing.json")
