"""Every fusion method that PEFT's ``add_weighted_adapter`` has gives PEFT's result."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

from engine.adapters import load_adapter
from engine.fusion import fuse_adapters
from tests.helpers import make_adapter, tiny_llama

WEIGHTS = [0.6, 0.3, 0.8]
SEED = 7
DENSITY = 0.5

# PEFT combination_type -> (our method, params)
CASES = {
    "linear": ("linear", {}),
    "cat": ("cat", {}),
    "svd": ("svd", {}),
    "ties": ("ties", {"space": "factors", "density": DENSITY}),
    "ties_svd": ("ties", {"density": DENSITY}),
    "dare_linear": ("dare_linear", {"space": "factors", "density": DENSITY}),
    "dare_linear_svd": ("dare_linear", {"density": DENSITY}),
    "dare_ties": ("dare_ties", {"space": "factors", "density": DENSITY}),
    "dare_ties_svd": ("dare_ties", {"density": DENSITY}),
    "magnitude_prune": ("magnitude_prune", {"space": "factors", "density": DENSITY}),
    "magnitude_prune_svd": ("magnitude_prune", {"density": DENSITY}),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    # Different alphas (and rsLoRA on one) so scalings differ: the conventions must honour them.
    return [
        make_adapter(root / "a0", seed=0, r=4, alpha=8),
        make_adapter(root / "a1", seed=1, r=4, alpha=4, use_rslora=True),
        make_adapter(root / "a2", seed=2, r=4, alpha=16),
    ]


def peft_merged_deltas(adapter_dirs, combination_type: str, monkeypatch) -> dict[str, torch.Tensor]:
    # PEFT draws DARE masks from the global RNG after initialising the new adapter (which also
    # draws); hand it a generator seeded like ours so both sides drop the same entries.
    generator = torch.Generator().manual_seed(SEED)

    def seeded_random_pruning(tensor, density, rescale):
        keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return tensor * keep / density if rescale else tensor * keep

    monkeypatch.setattr(merge_utils, "random_pruning", seeded_random_pruning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), adapter_dirs[0], adapter_name="a0")
        for i, path in enumerate(adapter_dirs[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
        model.add_weighted_adapter(
            ["a0", "a1", "a2"], WEIGHTS, "merged", combination_type=combination_type, density=DENSITY
        )
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("merged").double()
    return out


@pytest.mark.parametrize("combination_type", sorted(CASES))
def test_matches_peft_add_weighted_adapter(adapter_dirs, combination_type, monkeypatch):
    method, params = CASES[combination_type]
    expected = peft_merged_deltas(adapter_dirs, combination_type, monkeypatch)
    adapters = [load_adapter(p) for p in adapter_dirs]
    fused = fuse_adapters(adapters, method, weights=WEIGHTS, params=params, seed=SEED).adapter
    assert set(fused.modules) == set(expected)
    for name, delta in expected.items():
        ours = fused.modules[name].delta()
        error = float((ours - delta).norm() / delta.norm())
        assert error < 2e-5, f"{combination_type} {name}: relative error {error:.2e}"


# The 2025 merges have no PEFT counterpart; where they reduce to the exact weighted sum they must
# give PEFT's ``cat`` (tasks enter as K w_i dW_i, so alpha = 1/K undoes the K).
REDUCES_TO_CAT = {
    "core_space_ta": ("core_space", {"inner": "ta", "alpha": 1 / len(WEIGHTS)}),
    "star_full_spectrum": ("star", {"eta": 100.0}),
}


@pytest.mark.parametrize("case", sorted(REDUCES_TO_CAT))
def test_2025_merges_reduce_to_peft_cat(adapter_dirs, case, monkeypatch):
    method, params = REDUCES_TO_CAT[case]
    expected = peft_merged_deltas(adapter_dirs, "cat", monkeypatch)
    adapters = [load_adapter(p) for p in adapter_dirs]
    fused = fuse_adapters(adapters, method, weights=WEIGHTS, params=params).adapter
    for name, delta in expected.items():
        error = float((fused.modules[name].delta() - delta).norm() / delta.norm())
        assert error < 2e-5, f"{case} {name}: relative error {error:.2e}"
