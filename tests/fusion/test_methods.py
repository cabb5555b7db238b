"""Fusion methods: exact low-rank algebra, registry errors, conventions, output and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from engine.adapters import LoraAdapter, LoraModule, load_adapter
from engine.catalog import Catalog
from engine.cli.main import main
from engine.fusion import (
    PROVENANCE_FILE,
    FusionConfigError,
    FusionContext,
    fuse_adapters,
    fuse_from_catalog,
    get_method,
    list_methods,
)
from engine.fusion.lowrank import dense_to_lowrank, lowrank_weighted_sum, truncate_lowrank
from engine.fusion.methods.pruning import SignParams, merge_tensors
from tests.helpers import make_adapter, small_conv_fvae_config, tiny_llama


def random_adapter(ranks: dict[str, int], seed: int, d_out: int = 12, d_in: int = 10) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        n: LoraModule(
            torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scaling=0.5 + seed
        )
        for n, r in ranks.items()
    }
    return LoraAdapter(modules, {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "task_type": "CAUSAL_LM"})


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_lowrank_sum_is_exact_and_truncation_is_optimal():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 30, generator=g), torch.randn(20, r, generator=g)) for r in (3, 5, 2)]
    weights = [0.5, -1.0, 2.0]
    dense = sum(w * (B.double() @ A.double()) for (A, B), w in zip(factors, weights, strict=True))
    A, B = lowrank_weighted_sum(factors, weights, rank=None)
    assert A.shape == (10, 30) and rel(B @ A, dense) < 1e-5
    A4, B4 = lowrank_weighted_sum(factors, weights, rank=4)
    U, S, Vh = torch.linalg.svd(dense)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    assert A4.shape == (4, 30) and rel(B4 @ A4, best) < 1e-5
    A_d, B_d = dense_to_lowrank(dense.float(), 4)
    assert rel(B_d @ A_d, best) < 1e-5
    A_t, _ = truncate_lowrank(A, B, 100)  # a rank above R keeps everything
    assert A_t.shape[0] == 10


def test_unknown_method_lists_valid_names():
    with pytest.raises(FusionConfigError, match=r"valid methods: .*task_arithmetic.*ties"):
        get_method("nope")


def test_bad_params_are_all_listed():
    adapter = random_adapter({"m": 2}, 0)
    with pytest.raises(FusionConfigError) as info:
        fuse_adapters([adapter, adapter], "ties", params={"density": 2.0, "space": "weird", "colour": 1})
    message = str(info.value)
    assert "density" in message and "space" in message and "colour" in message


def test_weights_must_match_adapters():
    adapter = random_adapter({"m": 2}, 0)
    with pytest.raises(FusionConfigError, match="2 weight"):
        fuse_adapters([adapter], "cat", weights=[1.0, 2.0])


def test_methods_declare_their_context_in_the_signature(monkeypatch):
    """Keyword-only arguments name the context fields a method reads (required without a default,
    checked before it runs); details go to the provenance, never into PEFT's config."""
    from engine.fusion import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    @registry.fusion_method("probe")
    def probe(inputs, params, *, loss_fn, task_vectors=None):
        seen.update(loss_fn=loss_fn, task_vectors=task_vectors)
        return inputs.adapters[0], {"score": 1.5}

    method = registry.get_method("probe")
    assert (method.needs, method.accepts) == (("loss_fn",), ("loss_fn", "task_vectors"))
    adapters = [random_adapter({"x": 2}, 0)]
    with pytest.raises(FusionConfigError, match=r"method 'probe' needs few-shot examples.*'loss_fn'"):
        fuse_adapters(adapters, "probe", context=FusionContext(fvae=object()))
    result = fuse_adapters(adapters, "probe", context=FusionContext(loss_fn=len, task_vectors={"t": 1}))
    assert seen == {"loss_fn": len, "task_vectors": {"t": 1}}
    assert result.provenance["details"] == {"score": 1.5} and "icmf_details" not in result.adapter.config
    with pytest.raises(ValueError, match="'fvea' is not a FusionContext field"):

        @registry.fusion_method("typo")
        def typo(inputs, params, *, fvea):
            return inputs.adapters[0], {}


def test_cat_and_task_arithmetic_are_exact_with_mixed_ranks_and_missing_modules():
    a = random_adapter({"x": 2, "y": 3}, 0)
    b = random_adapter({"x": 4}, 1)
    for method, params in (("cat", {}), ("task_arithmetic", {"lam": 1.0})):
        fused = fuse_adapters([a, b], method, weights=[0.3, 0.9], params=params).adapter
        target = 0.3 * a.modules["x"].delta() + 0.9 * b.modules["x"].delta()
        assert rel(fused.modules["x"].delta(), target) < 1e-6
        assert rel(fused.modules["y"].delta(), 0.3 * a.modules["y"].delta()) < 1e-6
    scaled = fuse_adapters(
        [a, b], "task_arithmetic", weights=[0.3, 0.9], params={"lam": 0.5, "rank": 2}
    ).adapter
    assert scaled.modules["x"].rank == 2


def test_linear_zero_pads_mixed_ranks():
    low, high = random_adapter({"x": 2}, 0), random_adapter({"x": 3}, 1)
    m = low.modules["x"]
    padded = LoraAdapter(
        {
            "x": LoraModule(
                torch.cat([m.A, torch.zeros(1, m.d_in)]),
                torch.cat([m.B, torch.zeros(m.d_out, 1)], 1),
                m.scaling,
            )
        },
        low.config,
    )
    fused = fuse_adapters([low, high], "linear", weights=[0.4, 0.7]).adapter.modules["x"]
    expected = fuse_adapters([padded, high], "linear", weights=[0.4, 0.7]).adapter.modules["x"]
    assert fused.rank == 3 and torch.allclose(fused.delta(), expected.delta())


def test_mergekit_ties_convention_by_hand():
    # Two tasks, one entry each: +1 (w=1) and -3 (w=0.5). PEFT elects on unweighted values
    # (total -2 -> negative) and averages by count; mergekit elects on weighted values
    # (1 - 1.5 -> negative) and divides by the agreeing weight.
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 2.0])]
    weights = torch.tensor([1.0, 0.5])
    generator = torch.Generator()
    peft = merge_tensors("ties", tensors, weights, SignParams(density=1.0), generator)
    mergekit = merge_tensors(
        "ties", tensors, weights, SignParams(density=1.0, convention="mergekit"), generator
    )
    torch.testing.assert_close(peft, torch.tensor([-1.5, (2.0 + 1.0) / 2]))
    torch.testing.assert_close(mergekit, torch.tensor([-1.5 / 0.5, (2.0 + 1.0) / 1.5]))


def test_dare_is_deterministic_per_seed():
    adapters = [random_adapter({"x": 3}, s) for s in range(3)]
    run = lambda seed: fuse_adapters(adapters, "dare_ties", params={"density": 0.3}, seed=seed).adapter  # noqa: E731
    torch.testing.assert_close(run(1).modules["x"].delta(), run(1).modules["x"].delta())
    assert not torch.allclose(run(1).modules["x"].delta(), run(2).modules["x"].delta())


def test_non_finite_output_is_never_written(tmp_path):
    a = random_adapter({"x": 2}, 0)
    with pytest.raises(FusionConfigError, match="non-finite"):
        fuse_adapters([a], "cat", weights=[float("inf")])


def test_fused_adapter_loads_in_peft_with_provenance(tmp_path):
    dirs = [make_adapter(tmp_path / f"a{i}", seed=i, r=2 + i) for i in range(3)]
    catalog = Catalog(tmp_path / "cat")
    for i, d in enumerate(dirs):
        catalog.ingest([d], task=f"t{i}", r_max=4)
    result = fuse_from_catalog(catalog, "task_arithmetic", tasks=["t0", "t2"], weights=[1.0, 0.5])
    out = result.save(tmp_path / "fused")
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert [i["task"] for i in provenance["inputs"]] == ["t0", "t2"]
    assert provenance["method"] == "task_arithmetic" and provenance["params"] == {"lam": 1.0, "rank": None}
    model = PeftModel.from_pretrained(tiny_llama(), out)
    loaded = load_adapter(out)
    expected = load_adapter(dirs[0]).modules
    other = load_adapter(dirs[2]).modules
    for name, module in loaded.modules.items():
        target = expected[name].delta() + 0.5 * other[name].delta()
        assert rel(module.delta(), target) < 1e-5
    assert model.peft_config["default"].base_model_name_or_path == "tests/tiny-llama"


NEEDS_AN_FVAE = {"icm"}  # its own tests build one


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("every-method")
    return [make_adapter(root / f"a{i}", seed=i, r=4, alpha=4 * (i + 1)) for i in range(3)]


@pytest.mark.parametrize("method", sorted(m.name for m in list_methods() if m.name not in NEEDS_AN_FVAE))
def test_every_method_writes_a_finite_peft_adapter_with_provenance(method, peft_dirs, tmp_path):
    """Generic registry contract: finite factors, a PEFT-loadable directory whose layers give the
    fused deltas, provenance naming the method and its reference."""
    adapters = [load_adapter(p) for p in peft_dirs]
    params, context, tasks = {}, None, ["t0", "t1", "t2"]
    if method == "lorahub":
        params = {"budget": 4}
        context = FusionContext(
            loss_fn=lambda a: float(sum(m.delta().pow(2).sum() for m in a.modules.values()))
        )
    if method == "regmean":  # input Gram matrices of full rank
        g = torch.Generator().manual_seed(0)
        grams = {}
        for task in tasks:
            X = {n: torch.randn(64, m.d_in, generator=g) for n, m in adapters[0].modules.items()}
            grams[task] = {n: x.T @ x / 64 for n, x in X.items()}
        context = FusionContext(grams=grams)
    result = fuse_adapters(adapters, method, params=params, tasks=tasks, context=context)
    out = result.save(tmp_path / method)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["method"] == method and provenance["reference"]
    model = PeftModel.from_pretrained(tiny_llama(), out)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert set(layers) == set(result.adapter.modules) == set(adapters[0].modules)
    for name, module in result.adapter.modules.items():
        assert torch.isfinite(module.A).all() and torch.isfinite(module.B).all()
        expected = module.delta()
        assert expected.norm() > 0, f"{method} fused {name} to zero"
        assert rel(layers[name].get_delta_weight("default"), expected) < 1e-5


def test_fuse_cli(tmp_path, capsys):
    dirs = [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(2)]
    cat = str(tmp_path / "cat")
    for i, d in enumerate(dirs):
        assert main(["catalog", "ingest", str(d), "--catalog", cat, "--task", f"t{i}"]) == 0
    capsys.readouterr()
    argv = ["fuse", "--catalog", cat, "--tasks", "t0,t1", "--method", "ties", "--param", "density=0.4"]
    assert main([*argv, "--param", "space=delta", "--out", str(tmp_path / "f")]) == 0
    assert "fused [t0-" in capsys.readouterr().out
    assert json.loads((tmp_path / "f" / PROVENANCE_FILE).read_text())["params"]["density"] == 0.4
    assert main([*argv, "--out", str(tmp_path / "f")]) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["fuse", "--catalog", cat, "--tasks", "t0,zz", "--method", "cat", "--out", str(tmp_path / "g")])
        == 1
    )
    assert "task 'zz' has no adapters" in capsys.readouterr().err
    assert (
        main(["fuse", "--catalog", cat, "--tasks", "t0", "--method", "magic", "--out", str(tmp_path / "g")])
        == 1
    )
    assert "valid methods" in capsys.readouterr().err


def test_evolution_strategy_minimises_a_quadratic():
    import numpy as np

    from engine.fusion.methods.lorahub import evolve

    target = np.array([0.7, -0.3, 1.1])
    best, value, history = evolve(
        lambda w: float(((w - target) ** 2).sum()),
        np.zeros(3),
        300,
        0.5,
        (-1.5, 1.5),
        np.random.default_rng(0),
    )
    assert len(history) == 300 and history == sorted(history, reverse=True)
    assert value < 1e-3 and np.abs(best - target).max() < 0.05


def test_lorahub_finds_weights_that_lower_the_few_shot_loss():
    adapters = [random_adapter({"x": 2}, s) for s in range(3)]
    target = 0.8 * adapters[0].modules["x"].delta() - 0.4 * adapters[2].modules["x"].delta()

    def loss_fn(candidate: LoraAdapter) -> float:
        return float(((candidate.modules["x"].delta() - target) ** 2).mean())

    result = fuse_adapters(
        adapters, "lorahub", params={"budget": 150, "l1": 0.0}, seed=3, context=FusionContext(loss_fn=loss_fn)
    )
    details = result.provenance["details"]
    assert details["objective"] < 0.05 * details["start_objective"]
    found = [i["weight"] for i in result.provenance["inputs"]]
    assert max(abs(f - t) for f, t in zip(found, [0.8, 0.0, -0.4], strict=True)) < 0.15
    with pytest.raises(FusionConfigError, match="few-shot"):
        fuse_adapters(adapters, "lorahub")


class _ConstantDecoder(torch.nn.Module):
    """A collapsed F-VAE: its decoder emits one fixed vector whatever the code and condition."""

    def __init__(self, config, output: torch.Tensor):
        super().__init__()
        self.config, self.output = config, output

    def encode(self, x, cond):
        return x[:, : self.config.latent_dim], torch.zeros(x.shape[0], self.config.latent_dim)

    def decode(self, z, cond):
        return self.output.expand(z.shape[0], -1) + 0 * z.sum()

    def reconstruction_measures(self, x_hat, x, present):
        from engine.fvae.recon import explained_fraction, relative_error

        return relative_error(x_hat, x, present), explained_fraction(x_hat, x, present)


def _artifact(layout, model=None):
    from engine.fvae.artifact import ArtifactMeta, FVAEArtifact, TaskVectorSource
    from engine.fvae.model import FVAE
    from engine.fvae.normalize import SlotNormalizer

    torch.manual_seed(0)
    config = small_conv_fvae_config(layout.size, 4)
    model = model(config) if model else FVAE(config)
    meta = ArtifactMeta(task_vector_source=TaskVectorSource(kind="adapter_projection", dim=4, seed=0))
    return FVAEArtifact(model.eval(), SlotNormalizer.identity(layout.size), layout, {}, meta)


def test_icm_is_anchored_on_its_inputs():
    """A single adapter fuses to itself, and a decoder that ignores its code (posterior collapse:
    the lab's encoder suite) yields task arithmetic instead of its constant, memorised output."""
    from engine.adapters.layout import Layout

    adapters = [random_adapter({"q": 2, "v": 3}, 0), random_adapter({"q": 3}, 1)]
    layout = Layout.from_adapters(adapters, base_model="m")
    constant = torch.randn(layout.size, generator=torch.Generator().manual_seed(9))
    untrained, collapsed = _artifact(layout), _artifact(layout, lambda c: _ConstantDecoder(c, constant))
    for name in ("q", "v"):
        one = fuse_adapters(adapters[:1], "icm", [1.0], context=FusionContext(fvae=untrained)).adapter
        assert rel(one.modules[name].delta(), adapters[0].modules[name].delta()) < 1e-5
    fused = fuse_adapters(adapters, "icm", [0.5, 0.5], context=FusionContext(fvae=collapsed)).adapter
    ta = fuse_adapters(adapters, "task_arithmetic", [0.5, 0.5]).adapter
    for name in ("q", "v"):
        expected = ta.modules[name].delta() + (0.5 if name == "v" else 0.0) * _constant_delta(
            constant, layout, name
        )  # only the input targeting "v" cancels half of the constant there
        assert rel(fused.modules[name].delta(), expected) < 1e-5
    absolute = fuse_adapters(
        adapters, "icm", [0.5, 0.5], {"anchor": False}, context=FusionContext(fvae=collapsed)
    )
    assert rel(absolute.adapter.modules["q"].delta(), _constant_delta(constant, layout, "q")) < 1e-5


def _constant_delta(vector, layout, name):
    from engine.adapters.codec import unflatten

    A, B = unflatten(vector, layout)[layout.index[name]]
    return B @ A
