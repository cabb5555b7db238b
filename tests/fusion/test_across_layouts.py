"""Fusion of catalog adapters stored in different versions of a grown layout (other target
modules, other ranks): every registry method fuses the union of their modules."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import load_adapter
from engine.catalog import Catalog
from engine.fusion import FusionContext, fuse_adapters, fuse_from_catalog, list_methods
from tests.fusion.test_methods import _artifact
from tests.helpers import make_adapter

INPUTS = {
    "qv4": dict(r=4, target_modules=("q_proj", "v_proj")),
    "attn8": dict(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    "mlp16": dict(r=16, target_modules=("gate_proj", "down_proj", "v_proj")),
}
WEIGHTS = [0.5, 0.3, 0.8]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("across")
    catalog = Catalog(root / "cat")
    ids = []
    for i, (name, kwargs) in enumerate(INPUTS.items()):  # one ingest each: three layout versions
        ids += catalog.ingest([make_adapter(root / name, seed=i, **kwargs)], task=name).added
    assert len(catalog.layouts()) == 3
    return catalog, ids


def expected_sum(catalog, ids, name):
    """sum_i w_i dW_i over the inputs that target ``name`` (an absent module contributes 0)."""
    total = None
    for adapter_id, w in zip(ids, WEIGHTS, strict=True):
        module = catalog.load_adapter(adapter_id).modules.get(name)
        if module is not None:
            total = w * module.delta() if total is None else total + w * module.delta()
    return total


def params_and_context(method, catalog):
    if method == "icm":  # an F-VAE trained on the first (smallest) layout version
        return {}, FusionContext(fvae=_artifact(catalog.layout(catalog.entries()[0]["layout_id"])))
    if method == "lorahub":
        return {"budget": 4, "compose": "factors"}, FusionContext(
            loss_fn=lambda a: sum(float(m.A.norm()) for m in a.modules.values())
        )
    if method == "regmean":  # identity Gram matrices: every input direction weighs the same
        d_in = {
            n: m.d_in for e in catalog.entries() for n, m in catalog.load_adapter(e["id"]).modules.items()
        }
        identity = {name: torch.eye(d) for name, d in d_in.items()}
        return {}, FusionContext(grams={e["task"]: identity for e in catalog.entries()})
    if method in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        return {"density": 0.5}, None
    return {}, None


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_fuses_the_union_of_modules_across_layout_versions(grown, method):
    catalog, ids = grown
    params, context = params_and_context(method, catalog)
    result = fuse_from_catalog(
        catalog, method, adapter_ids=ids, weights=WEIGHTS, params=params, context=context
    )
    union = {n for i in ids for n in catalog.load_adapter(i).modules}
    fused = result.adapter
    assert set(fused.modules) == union
    for name, module in fused.modules.items():
        reference = catalog.load_adapter(next(i for i in ids if name in catalog.load_adapter(i).modules))
        assert (module.d_out, module.d_in) == (reference.modules[name].d_out, reference.modules[name].d_in)
        assert torch.isfinite(module.A).all() and torch.isfinite(module.B).all()
    if method in ("cat", "task_arithmetic"):  # exact: absent modules count as zero
        for name in union:
            assert rel(fused.modules[name].delta(), expected_sum(catalog, ids, name)) < 1e-5
    if method == "icm":
        first_layout = catalog.layout(catalog.entries()[0]["layout_id"])
        outside = sorted(n for n in union if n not in first_layout.index)
        details = result.provenance["details"]["outside_layout"]
        assert details == {"merged_by": "task_arithmetic", "modules": outside} and outside
        for name in outside:  # merged by task arithmetic over the inputs that target them
            assert rel(fused.modules[name].delta(), expected_sum(catalog, ids, name)) < 1e-5


def test_icm_refuses_an_input_with_nothing_in_its_layout(grown):
    catalog, ids = grown
    artifact = _artifact(catalog.layout(catalog.entries()[0]["layout_id"]))
    mlp_only = load_adapter(catalog.export(ids[2], catalog.root + "-export"))
    mlp_only.modules = {n: m for n, m in mlp_only.modules.items() if "mlp" in n}
    with pytest.raises(ValueError, match=r"input\(s\) \[1\] target no module of the F-VAE's layout"):
        fuse_adapters([catalog.load_adapter(ids[0]), mlp_only], "icm", context=FusionContext(fvae=artifact))
