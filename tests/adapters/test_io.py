"""Reading, validating and writing PEFT adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from engine.adapters import load_adapter, save_adapter
from engine.adapters.lora import LoraModule
from engine.errors import AdapterError
from tests.helpers import make_adapter, rewrite_config, rewrite_weights, tiny_bert, tiny_llama

Q0 = "model.layers.0.self_attn.q_proj"


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Each LoRA layer's effective delta as PEFT computes it."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_reads_scaling_like_peft_with_rslora_and_patterns(tmp_path):
    path = make_adapter(
        tmp_path / "a",
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 16},
    )
    adapter = load_adapter(path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), path)
    expected = peft_deltas(peft_model)
    assert set(adapter.modules) == set(expected)
    assert adapter.modules["model.layers.1.self_attn.q_proj"].rank == 2
    for name, module in adapter.modules.items():
        assert rel_err(module.delta(), expected[name]) < 1e-6


def test_save_adapter_loads_in_stock_peft_with_mixed_ranks(tmp_path):
    src = make_adapter(tmp_path / "a", r=4, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={})
    adapter = load_adapter(src)
    out = save_adapter(adapter, tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    reloaded = PeftModel.from_pretrained(tiny_llama(), out)
    deltas = peft_deltas(reloaded)
    for name, module in adapter.modules.items():
        assert rel_err(deltas[name], module.delta()) < 1e-6
    assert load_adapter(out).modules["model.layers.1.self_attn.q_proj"].rank == 2


def test_modules_to_save_are_kept_alongside(tmp_path):
    path = make_adapter(
        tmp_path / "cls", base=tiny_bert(), target_modules=("query", "value"), modules_to_save=["classifier"]
    )
    adapter = load_adapter(path)
    assert set(adapter.extras) == {"classifier.weight", "classifier.bias"}
    out = save_adapter(adapter, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(tiny_bert(seed=1), out)
    head = reloaded.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight, adapter.extras["classifier.weight"])


def test_save_adapter_is_atomic_and_refuses_non_finite(tmp_path):
    adapter = load_adapter(make_adapter(tmp_path / "a"))
    module = adapter.modules[Q0]
    adapter.modules[Q0] = LoraModule(module.A, module.B * float("nan"), module.scaling)
    with pytest.raises(AdapterError, match="non-finite"):
        save_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging directory left behind


def test_save_adapter_refuses_existing_dir_unless_overwrite(tmp_path):
    adapter = load_adapter(make_adapter(tmp_path / "a"))
    save_adapter(adapter, tmp_path / "out")
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(adapter, tmp_path / "out")
    save_adapter(adapter, tmp_path / "out", overwrite=True)
    assert load_adapter(tmp_path / "out").modules.keys() == adapter.modules.keys()


# ----------------------------------------------------------------------------- validation
def _drop(key_part):
    return lambda tensors: {k: v for k, v in tensors.items() if key_part not in k}


BAD_ADAPTERS = {
    "not_a_dir": (None, "not a directory"),
    "missing_config": (lambda p: (p / "adapter_config.json").unlink(), "missing adapter_config.json"),
    "invalid_json": (lambda p: (p / "adapter_config.json").write_text("{oops"), "invalid JSON"),
    "wrong_peft_type": (lambda p: rewrite_config(p, peft_type="IA3"), "peft_type is 'IA3'"),
    "bad_rank_in_config": (lambda p: rewrite_config(p, r=0), "r must be a positive integer"),
    "dora": (lambda p: rewrite_config(p, use_dora=True), "DoRA"),
    "pickle_only": (
        lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
        "only adapter_model.bin found: it is a pickle",
    ),
    "missing_weights": (
        lambda p: (p / "adapter_model.safetensors").unlink(),
        "missing adapter_model.safetensors",
    ),
    "truncated": (
        lambda p: (p / "adapter_model.safetensors").write_bytes(
            (p / "adapter_model.safetensors").read_bytes()[:100]
        ),
        "corrupt or truncated",
    ),
    "garbage": (
        lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
        "corrupt or truncated",
    ),
    "shape_mismatch": (
        lambda p: rewrite_weights(
            p,
            lambda t: {
                k: (v[:, :3].contiguous() if "layers.0.self_attn.q_proj.lora_B" in k else v)
                for k, v in t.items()
            },
        ),
        "shape mismatch",
    ),
    "rank_disagrees_with_config": (lambda p: rewrite_config(p, r=8), "config gives rank 8"),
    "non_finite": (
        lambda p: rewrite_weights(
            p,
            lambda t: {
                k: (v * float("inf") if "layers.1.self_attn.v_proj.lora_A" in k else v) for k, v in t.items()
            },
        ),
        "non-finite",
    ),
    "foreign_key": (
        lambda p: rewrite_weights(p, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)}),
        "is not a LoRA key",
    ),
    "half_module": (lambda p: rewrite_weights(p, _drop("layers.0.self_attn.q_proj.lora_B")), "has no lora_B"),
    "no_lora": (lambda p: rewrite_weights(p, lambda t: {}), "no LoRA weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_rejected_with_the_cause(tmp_path, case):
    damage, message = BAD_ADAPTERS[case]
    path = tmp_path / "bad"
    if damage is not None:
        make_adapter(path)
        damage(path)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(path)
    assert str(path) in str(info.value)


def test_all_faults_of_one_config_are_listed_together(tmp_path):
    path = make_adapter(tmp_path / "a")
    rewrite_config(path, peft_type="X", r=-1, lora_alpha="big")
    with pytest.raises(AdapterError) as info:
        load_adapter(path)
    message = str(info.value)
    assert "peft_type" in message and "r must be" in message and "lora_alpha" in message
