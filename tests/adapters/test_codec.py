"""Canonical form and flat-vector codec: exact round trips, gauge, padding and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.adapters import (
    Layout,
    LoraAdapter,
    LoraModule,
    ModuleSpec,
    canonical_gauge,
    from_flat,
    load_adapter,
    to_canonical,
    to_flat,
    to_lora,
)
from engine.errors import AdapterError
from tests.helpers import make_adapter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def random_adapter(shapes: dict[str, tuple[int, int, int]], seed: int, scaling: float = 1.5) -> LoraAdapter:
    """``shapes``: module -> (d_out, d_in, rank)."""
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scaling)
        for name, (d_out, d_in, r) in shapes.items()
    }
    return LoraAdapter(modules, {"peft_type": "LORA", "r": 1, "lora_alpha": 1})


def assert_round_trip(adapter: LoraAdapter, layout: Layout, gauge: bool) -> None:
    flat = to_flat(to_canonical(adapter, layout, gauge=gauge))
    assert flat.shape == (layout.size,) and flat.dtype == torch.float32
    canonical = to_canonical(adapter, layout, gauge=gauge)
    back = to_lora(from_flat(flat, layout, canonical.mask))
    assert set(back.modules) == set(adapter.modules)
    for name, module in adapter.modules.items():
        assert rel_err(back.modules[name].delta(), module.delta()) < 1e-6, name


@pytest.mark.parametrize("gauge", [False, True])
def test_peft_adapter_round_trip_preserves_every_delta(tmp_path, gauge):
    adapter = load_adapter(
        make_adapter(
            tmp_path / "a",
            r=6,
            alpha=12,
            use_rslora=True,
            rank_pattern={"v_proj": 3},
            alpha_pattern={"q_proj": 5},
        )
    )
    layout = Layout.from_adapters([adapter], base_model="m", r_max=8)
    assert_round_trip(adapter, layout, gauge)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6)), min_size=1, max_size=4
    ),
    extra_rank=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    gauge=st.booleans(),
)
def test_round_trip_for_generated_shapes(data, extra_rank, seed, gauge):
    shapes = {f"layers.{i}.proj": s for i, s in enumerate(data)}
    adapter = random_adapter(shapes, seed)
    layout = Layout.from_adapters([adapter], base_model="m")
    layout = Layout(layout.base_model, layout.modules, layout.r_max + extra_rank)
    assert_round_trip(adapter, layout, gauge)


def test_absent_modules_are_zero_and_masked():
    layout = Layout("m", (ModuleSpec("a", 4, 5), ModuleSpec("b", 3, 2)), r_max=3)
    adapter = random_adapter({"b": (3, 2, 2)}, seed=0)
    canonical = to_canonical(adapter, layout)
    assert canonical.mask.tolist() == [False, True]
    flat = to_flat(canonical)
    assert torch.all(flat[: int(layout.offsets[1])] == 0)
    assert set(to_lora(from_flat(flat, layout, canonical.mask)).modules) == {"b"}


def test_scaling_is_folded_into_B():
    layout = Layout("m", (ModuleSpec("a", 4, 5),), r_max=2)
    adapter = random_adapter({"a": (4, 5, 2)}, seed=1, scaling=3.0)
    canonical = to_canonical(adapter, layout)
    torch.testing.assert_close(canonical.B[0], adapter.modules["a"].B * 3.0)
    assert to_lora(canonical).modules["a"].scaling == 1.0


def test_flat_layout_is_A_then_B_transposed_per_module():
    layout = Layout("m", (ModuleSpec("a", 3, 2),), r_max=2)
    A = torch.arange(4.0).reshape(2, 2)
    B = torch.arange(6.0).reshape(3, 2) + 10
    flat = to_flat(to_canonical(LoraAdapter({"a": LoraModule(A, B)}, {}), layout))
    assert flat.tolist() == A.flatten().tolist() + B.T.flatten().tolist()
    assert layout.offsets.tolist() == [0, 10]


def test_gauge_is_canonical_across_equivalent_factorisations():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 20, generator=g), torch.randn(16, 4, generator=g)
    M = torch.randn(4, 4, generator=g) + 4 * torch.eye(4)
    a1, b1 = canonical_gauge(A, B)
    a2, b2 = canonical_gauge(M @ A, B @ torch.linalg.inv(M))
    torch.testing.assert_close(a1, a2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b1, b2, atol=1e-4, rtol=1e-4)
    s = torch.linalg.svdvals(B.double() @ A.double())[:4]
    torch.testing.assert_close(a1.double().norm(dim=1) ** 2, s, rtol=1e-4, atol=1e-6)  # ||a_i||^2 = s_i


def test_gauge_handles_rank_deficient_factors():
    A = torch.zeros(4, 6)
    A[0] = 1.0
    B = torch.randn(5, 4)
    a, b = canonical_gauge(A, B)
    assert rel_err(b @ a, B @ A) < 1e-6
    assert torch.all(a[1:].abs() < 1e-6)


def test_layout_orders_modules_naturally_and_checks_fit():
    adapter = random_adapter({"layers.10.q": (4, 4, 2), "layers.2.q": (4, 4, 2)}, seed=0)
    layout = Layout.from_adapters([adapter], base_model="m")
    assert [m.name for m in layout.modules] == ["layers.2.q", "layers.10.q"]
    assert Layout.from_dict(layout.to_dict()) == layout
    other = random_adapter({"layers.2.q": (4, 5, 3)}, seed=1)
    faults = layout.check_fits(other)
    assert any("delta shape" in f for f in faults) and any("exceeds the layout's r_max" in f for f in faults)
    with pytest.raises(AdapterError, match="differs from the layout"):
        to_canonical(other, layout)


def test_from_flat_rejects_wrong_length():
    layout = Layout("m", (ModuleSpec("a", 3, 2),), r_max=2)
    with pytest.raises(ValueError, match="needs"):
        from_flat(np.zeros(7, np.float32), layout)
