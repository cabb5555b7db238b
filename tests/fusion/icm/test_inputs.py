"""The ``icm`` per-input cache: same bits with and without it, and never another F-VAE's,
adapter's or condition's entry (pure torch, milliseconds)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine.adapters import LoraAdapter, LoraModule
from engine.adapters.layout import Layout
from engine.fusion import FusionConfigError, FusionContext, fuse_adapters
from engine.fusion.icm.inputs import IcmInputsCache, adapter_digest
from engine.fvae.artifact import ArtifactMeta, Familiarity, FVAEArtifact, TaskVectorSource, TrainingMetrics
from engine.fvae.config import FVAEConfig
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer
from tests.helpers import small_conv_fvae_config

COND_DIM = 4


def _adapter(ranks: dict[str, int], seed: int, scaling: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        n: LoraModule(torch.randn(r, 10, generator=g), torch.randn(12, r, generator=g), scaling)
        for n, r in ranks.items()
    }
    return LoraAdapter(modules, {"peft_type": "LORA", "r": 1, "lora_alpha": 1})


ADAPTERS = [_adapter({"q": 2, "v": 3}, 0), _adapter({"q": 3}, 1), _adapter({"v": 1, "q": 1}, 2)]
TASKS = ["seen", "unseen_a", "unseen_b"]
LAYOUT = Layout.from_adapters(ADAPTERS, base_model="m")


def _artifact(seed: int = 0, mean_shift: float = 0.1) -> FVAEArtifact:
    """A small conv F-VAE with a non-trivial normaliser; ``seen`` has a training task vector,
    the other tasks get the adapter-derived projection."""
    torch.manual_seed(seed)
    config = small_conv_fvae_config(LAYOUT.size, COND_DIM)
    g = torch.Generator().manual_seed(seed + 100)
    normalizer = SlotNormalizer(
        mean_shift * torch.randn(LAYOUT.size, generator=g), 0.5 + torch.rand(LAYOUT.size, generator=g)
    )
    vectors = {"seen": torch.randn(COND_DIM, generator=g)}
    meta = ArtifactMeta(task_vector_source=TaskVectorSource(kind="adapter_projection", dim=COND_DIM, seed=0))
    return FVAEArtifact(FVAE(config).eval(), normalizer, LAYOUT, vectors, meta)


SPECS = [  # (input indices, weights, params): new weights over the same inputs, as a server sees
    ([0, 1], [0.5, 0.5], {}),
    ([0, 1], [0.3, 0.9], {}),
    ([1, 0], [0.9, 0.3], {"combine": "sum"}),
    ([0, 1, 2], [0.2, 0.3, 0.5], {"rank": 3}),
    ([2], [1.0], {}),
    ([0, 2], [0.6, 0.4], {"anchor": False}),
    ([0, 2], [0.4, 0.7], {"condition": "adapter", "project": False}),
]


def _fuse(artifact, spec, cache=None, **context):
    idx, weights, params = spec
    if cache is not None:
        context["icm_inputs_cache"] = cache
    result = fuse_adapters(
        [ADAPTERS[i] for i in idx],
        "icm",
        weights,
        params,
        tasks=[TASKS[i] for i in idx],
        context=FusionContext(fvae=artifact, **context),
    )
    return result.adapter


def _assert_same_bits(a: LoraAdapter, b: LoraAdapter) -> None:
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:
        assert torch.equal(a.modules[name].A, b.modules[name].A), name
        assert torch.equal(a.modules[name].B, b.modules[name].B), name


def _count_encodes(artifact) -> list[int]:
    calls = [0]
    encode = artifact.model.encode

    def counted(x, cond):
        calls[0] += x.shape[0]
        return encode(x, cond)

    artifact.model.encode = counted
    return calls


def test_cached_fusion_is_bit_identical_and_encodes_each_input_once():
    artifact = _artifact()
    fresh = [_fuse(artifact, spec) for spec in SPECS]
    cache = IcmInputsCache()
    calls = _count_encodes(artifact)
    for _ in range(2):  # first pass: misses (then hits within it), second pass: all hits
        for spec, expected in zip(SPECS, fresh, strict=True):
            _assert_same_bits(_fuse(artifact, spec, cache), expected)
    # three adapters under their 'trained' conditions, then adapter 0 ('seen') again under the
    # adapter-derived one (the unseen tasks' conditions are that projection in either mode): 4
    assert calls[0] == len(cache) == 4
    stats = cache.describe()
    assert stats["misses"] == 4 and stats["hits"] == 2 * sum(len(s[0]) for s in SPECS) - 4


def test_inputs_projected_together_draw_the_projection_once_and_match_each_alone(monkeypatch):
    """Inputs conditioned on their own projection share one draw of the seeded projection (drawn
    block by block above CACHED_ELEMENTS, as at 8 B-class layouts, where the draw costs more than
    the F-VAE), and each gets the same bits as when it is encoded alone."""
    from engine.fusion.icm import inputs, projection

    monkeypatch.setattr(projection, "CACHED_ELEMENTS", 0)
    monkeypatch.setattr(projection, "BLOCK", 7)  # several blocks, the last one partial
    draws = []
    blocks = projection._blocks
    monkeypatch.setattr(projection, "_blocks", lambda *a: draws.append(a) or blocks(*a))
    artifact = _artifact()
    conditions = [inputs.resolve_condition(t, artifact, {}, "adapter") for t in TASKS]
    assert all(c.kind == "projection" for c in conditions)
    together = inputs.encode_inputs(artifact, ADAPTERS, TASKS, mode="adapter")
    assert len(draws) == 1
    for adapter, condition, entry in zip(ADAPTERS, conditions, together, strict=True):
        alone = inputs.encode_input(artifact, adapter, condition)
        for field in ("cond", "mu", "decoded", "mask"):
            assert torch.equal(getattr(entry, field), getattr(alone, field)), field
        assert entry.recon_error == alone.recon_error
    assert len(draws) == 1 + len(ADAPTERS)


def test_one_adapter_twice_in_one_call_is_encoded_once():
    from engine.fusion.icm.inputs import encode_inputs

    artifact, cache = _artifact(), IcmInputsCache()
    calls = _count_encodes(artifact)
    entries = encode_inputs(artifact, [ADAPTERS[1], ADAPTERS[1]], [TASKS[1]] * 2, cache=cache)
    assert calls[0] == len(cache) == 1 and entries[0] is entries[1]


def test_a_different_fvae_never_hits_another_ones_entries():
    first, second = _artifact(seed=0), _artifact(seed=1)
    assert first.fingerprint != second.fingerprint
    cache = IcmInputsCache()
    spec = SPECS[0]
    a = _fuse(first, spec, cache)
    b = _fuse(second, spec, cache)
    _assert_same_bits(b, _fuse(second, spec))
    assert not torch.equal(a.modules["q"].B, b.modules["q"].B)
    assert cache.describe()["misses"] == 4  # two inputs for each F-VAE
    # The fingerprint covers the normaliser too: same weights, other statistics.
    shifted = _artifact(seed=0, mean_shift=0.2)
    assert shifted.fingerprint != first.fingerprint
    _assert_same_bits(_fuse(shifted, spec, cache), _fuse(shifted, spec))


def test_task_vector_mode_and_given_vectors_key_their_own_entries():
    artifact = _artifact()
    cache = IcmInputsCache()
    trained, derived = (([0, 1], [0.5, 0.5], {"task_vectors": mode}) for mode in ("trained", "adapter"))
    by_trained = _fuse(artifact, trained, cache)
    by_adapter = _fuse(artifact, derived, cache)
    _assert_same_bits(by_trained, _fuse(artifact, trained))
    _assert_same_bits(by_adapter, _fuse(artifact, derived))
    assert not torch.equal(by_trained.modules["q"].B, by_adapter.modules["q"].B)
    # A vector passed in the context for an unseen task: its content is part of the key.
    given = [{"unseen_a": torch.full((COND_DIM,), v)} for v in (1.0, -1.0)]
    one, two = (_fuse(artifact, SPECS[0], cache, task_vectors=g) for g in given)
    _assert_same_bits(one, _fuse(artifact, SPECS[0], task_vectors=given[0]))
    _assert_same_bits(two, _fuse(artifact, SPECS[0], task_vectors=given[1]))
    assert not torch.equal(one.modules["q"].B, two.modules["q"].B)


def test_keys_are_content_addressed():
    copy = LoraAdapter(
        {n: LoraModule(m.A.clone(), m.B.clone(), m.scaling) for n, m in ADAPTERS[0].modules.items()}, {}
    )
    assert adapter_digest(copy) == adapter_digest(ADAPTERS[0])  # another object, same content
    rescaled = LoraAdapter({n: LoraModule(m.A, m.B, 0.7) for n, m in ADAPTERS[0].modules.items()}, {})
    assert adapter_digest(rescaled) != adapter_digest(ADAPTERS[0])
    edited = LoraAdapter(dict(ADAPTERS[0].modules), {})
    edited.modules["v"] = LoraModule(ADAPTERS[0].modules["v"].A + 1e-3, ADAPTERS[0].modules["v"].B, 0.5)
    assert adapter_digest(edited) != adapter_digest(ADAPTERS[0])


def test_byte_bound_and_threads_keep_results_exact():
    artifact = _artifact()
    fresh = [_fuse(artifact, spec) for spec in SPECS]
    one_entry = IcmInputsCache(max_bytes=0)
    for spec, expected in zip(SPECS, fresh, strict=True):
        _assert_same_bits(_fuse(artifact, spec, one_entry), expected)
    assert len(one_entry) == 0  # nothing fits: every fusion encodes afresh, same bits
    small = IcmInputsCache(max_bytes=int(1.5 * _entry_bytes(artifact)))
    for spec, expected in zip(SPECS, fresh, strict=True):
        _assert_same_bits(_fuse(artifact, spec, small), expected)
    assert len(small) == 1 and small.describe()["bytes"] <= small.describe()["capacity"]
    shared = IcmInputsCache()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: _fuse(artifact, s, shared), SPECS * 3))
    for got, expected in zip(results, fresh * 3, strict=True):
        _assert_same_bits(got, expected)


def _entry_bytes(artifact) -> int:
    cache = IcmInputsCache()
    _fuse(artifact, ([0], [1.0], {}), cache)
    return cache.describe()["bytes"]


def test_per_input_encoding_matches_the_batched_formula():
    """The factored icm (one input at a time) computes what the batched formula does: encode
    every input in one batch, decode ``[mu; z_f]`` in one pass, anchor on the inputs."""
    from engine.adapters.codec import to_canonical, to_flat
    from engine.fusion.icm.latent import anchored_factors, fuse_latents
    from engine.fusion.icm.projection import project
    from engine.tasks.functional import adapter_factors

    artifact, weights = _artifact(), torch.tensor([0.2, 0.3, 0.5])
    model, normalizer = artifact.model, artifact.normalizer
    canon = [to_canonical(a, LAYOUT, gauge=True) for a in ADAPTERS]
    xn = normalizer.normalize(torch.stack([to_flat(c) for c in canon]))  # [K, N]
    cond = torch.stack(
        [artifact.trained_vectors["seen"], project(xn[1], COND_DIM, 0), project(xn[2], COND_DIM, 0)]
    )
    with torch.no_grad():
        mu, _ = model.encode(xn, cond)
        z_f, v_f = fuse_latents(mu, cond, weights)
        out = normalizer.denormalize(model.decode(torch.cat([mu, z_f[None]]), torch.cat([cond, v_f[None]])))
    masks = torch.stack([c.mask for c in canon])
    expected = anchored_factors(
        out[-1], out[:-1], [adapter_factors(a, LAYOUT) for a in ADAPTERS], masks, weights, LAYOUT
    )
    fused = _fuse(artifact, ([0, 1, 2], weights.tolist(), {}), IcmInputsCache())
    for spec, (A, B) in zip(LAYOUT.modules, expected, strict=True):
        assert torch.allclose(fused.modules[spec.name].A, A, rtol=1e-5, atol=1e-6)
        assert torch.allclose(fused.modules[spec.name].B, B, rtol=1e-5, atol=1e-6)


def _dense(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {n: m.scaling * m.B @ m.A for n, m in adapter.modules.items()}


def _fuse_first_two(artifact, params: dict):
    """The first two inputs with icm at equal weights, the full result (provenance included)."""
    return fuse_adapters(
        [ADAPTERS[0], ADAPTERS[1]],
        "icm",
        [0.5, 0.5],
        params,
        tasks=TASKS[:2],
        context=FusionContext(fvae=artifact),
    )


def test_familiarity_gate_falls_back_to_task_arithmetic_on_inputs_it_cannot_reconstruct():
    from engine.fusion.icm.latent import familiarity

    assert familiarity(torch.tensor([0.1, 0.4, 0.7, 1.0, 1.5]), 0.4).tolist() == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.0]
    )
    artifact = _artifact()  # untrained: reconstructs nothing (relative error >= ~1)
    spec = ([0, 1], [0.5, 0.5], {"familiarity_gate": True})
    artifact.meta.metrics = TrainingMetrics(recon=0.3)
    gated = _fuse_first_two(artifact, spec[2])
    details = gated.provenance["details"]["familiarity"]
    assert details["gate"] == 0.0 and min(details["recon_errors"]) > 0.9
    assert details["inputs"] == familiarity(torch.tensor(details["recon_errors"]), 0.3).tolist()
    want = {n: 0.5 * _dense(ADAPTERS[0]).get(n, 0) + 0.5 * _dense(ADAPTERS[1]).get(n, 0) for n in ("q", "v")}
    for name, delta in _dense(gated.adapter).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-4, atol=1e-5)
    # An F-VAE that reconstructs as badly in training trusts its displacement fully: no gate.
    artifact.meta.metrics = TrainingMetrics(recon=2.0)
    _assert_same_bits(
        _fuse(artifact, spec), _fuse(artifact, ([0, 1], [0.5, 0.5], {"familiarity_gate": False}))
    )
    # The error measured on the final model's training adapters wins over the training loss.
    artifact.meta.familiarity = Familiarity(reference=0.3)
    measured = _fuse_first_two(artifact, spec[2]).provenance["details"]["familiarity"]
    assert measured["reference_error"] == 0.3 and measured["gate"] == 0.0
    artifact.meta.metrics, artifact.meta.familiarity = TrainingMetrics(), None
    with pytest.raises(FusionConfigError, match="training reconstruction error"):
        _fuse(artifact, spec)  # asked for explicitly; by default the gate is then off
    _assert_same_bits(
        _fuse(artifact, ([0, 1], [0.5, 0.5], {})),
        _fuse(artifact, ([0, 1], [0.5, 0.5], {"familiarity_gate": False})),
    )
    with pytest.raises(FusionConfigError, match="needs anchor"):
        _fuse(artifact, ([0, 1], [0.5, 0.5], {"familiarity_gate": True, "anchor": False}))
    _fuse(artifact, ([0, 1], [0.5, 0.5], {"anchor": False}))  # the default gate just does not apply


def test_an_fvae_that_explains_nothing_reads_familiarity_from_the_condition():
    """A fusion-trained F-VAE whose reconstructions explain none of its training adapters has the
    same (useless) error for every input; its gate counts an input familiar exactly when it is
    conditioned on its task's meta-training vector."""
    artifact = _artifact()
    artifact.meta.familiarity = Familiarity(reference=2.5, explained=0.002)  # every error is below 2.5
    seen_alone = fuse_adapters(
        [ADAPTERS[0]], "icm", [1.0], {}, tasks=["seen"], context=FusionContext(fvae=artifact)
    ).provenance["details"]["familiarity"]
    assert (seen_alone["basis"], seen_alone["gate"], seen_alone["conditions"]) == ("task", 1.0, ["trained"])
    # 'seen' + an unseen task: the unseen input is merged by arithmetic (partial, the default) ...
    details = _fuse_first_two(artifact, {}).provenance["details"]["familiarity"]
    assert details["basis"] == "task" and details["conditions"] == ["trained", "projection"]
    assert details["inputs"] == [1.0, 0.0]
    assert details["mode"] == "partial" and details["arithmetic_inputs"] == [1]
    assert details["displacement"] == "full"

    def fuse(adapters, weights, tasks, params):
        return fuse_adapters(
            adapters, "icm", weights, params, tasks=tasks, context=FusionContext(fvae=artifact)
        )

    # With two familiar inputs, their displacement is added at full strength (the default), or
    # scaled by their share of the weights ('scaled').
    familiar = _dense(fuse([ADAPTERS[0], ADAPTERS[2]], [0.5, 0.5], ["seen", "seen"], {}).adapter)
    dense = [_dense(a) for a in ADAPTERS]
    names = ("q", "v")
    displacement = {n: familiar[n] - 0.5 * dense[0].get(n, 0) - 0.5 * dense[2].get(n, 0) for n in names}
    assert any(float(d.abs().max()) > 1e-3 for d in displacement.values())
    arithmetic = {
        n: 0.25 * dense[0].get(n, 0) + 0.25 * dense[2].get(n, 0) + 0.5 * dense[1].get(n, 0) for n in names
    }
    three = ([ADAPTERS[0], ADAPTERS[2], ADAPTERS[1]], [0.25, 0.25, 0.5], ["seen", "seen", "unseen_a"])
    full = _dense(fuse(*three, {}).adapter)
    scaled = fuse(*three, {"partial_displacement": "scaled"})
    assert scaled.provenance["details"]["familiarity"]["arithmetic_inputs"] == [2]
    assert scaled.provenance["details"]["familiarity"]["displacement"] == "scaled"
    for name, delta in _dense(scaled.adapter).items():
        torch.testing.assert_close(full[name], arithmetic[name] + displacement[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta, arithmetic[name] + 0.5 * displacement[name], rtol=1e-4, atol=1e-5)
    # ... and under 'min' the whole fusion is task arithmetic.
    whole = _fuse_first_two(artifact, {"gate_mode": "min"})
    assert whole.provenance["details"]["familiarity"]["gate"] == 0.0
    want = {n: 0.5 * _dense(ADAPTERS[0]).get(n, 0) + 0.5 * _dense(ADAPTERS[1]).get(n, 0) for n in ("q", "v")}
    for name, delta in _dense(whole.adapter).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-4, atol=1e-5)
    # With the explained fraction of an F-VAE that does reconstruct, the errors decide as before.
    artifact.meta.familiarity = Familiarity(reference=2.5, explained=0.5)
    assert _fuse_first_two(artifact, {}).provenance["details"]["familiarity"]["basis"] == "reconstruction"


def test_an_unfamiliar_input_of_a_trained_task_is_encoded_with_its_tasks_prototype(monkeypatch):
    """A new training run of a known task: the F-VAE reconstructs it worse than its training
    adapters, so its code moves towards the task's prototype by its unfamiliarity (``1 - f``), the
    anchored decode reads ``D`` of that code, and the gate counts the input familiar."""
    import dataclasses

    import engine.fusion.icm.inputs as inputs_module
    import engine.fusion.icm.method as icm_module
    from engine.fusion.icm.inputs import encode_inputs

    artifact = _artifact()
    artifact.meta.familiarity = Familiarity(reference=0.3, explained=0.5)
    prototype = torch.randn(8, generator=torch.Generator().manual_seed(7))
    artifact.task_latents = {"seen": prototype}
    monkeypatch.setattr(inputs_module, "familiarity", lambda errors, reference: torch.full_like(errors, 0.25))
    pair, tasks = [ADAPTERS[0], ADAPTERS[2]], ["seen", "seen"]  # two runs of the task
    encoded = encode_inputs(artifact, pair, tasks)
    for entry in encoded:
        code = entry.prototype
        assert code.share == 0.75
        torch.testing.assert_close(code.mu, 0.25 * entry.mu + 0.75 * prototype)
        decoded = artifact.normalizer.denormalize(artifact.model.decode(code.mu[None], entry.cond[None]))[0]
        torch.testing.assert_close(code.decoded, decoded)
    # Only a trained task's condition with a recorded prototype gets one.
    assert encode_inputs(artifact, [ADAPTERS[1]], ["unseen_a"])[0].prototype is None
    assert encode_inputs(artifact, [ADAPTERS[0]], ["seen"], mode="adapter")[0].prototype is None

    def fuse(params, artifact=artifact):
        return fuse_adapters(
            pair, "icm", [0.5, 0.5], params, tasks=tasks, context=FusionContext(fvae=artifact)
        )

    fused = fuse({})
    details = fused.provenance["details"]["familiarity"]
    assert details["prototype_shares"] == [0.75, 0.75] and details["inputs"] == [1.0, 1.0]
    assert details["gate"] == 1.0
    # = the ungated fusion of the two inputs encoded with the prototype codes
    real_encode = icm_module.encode_inputs

    def with_codes(*args, **kwargs):
        return [
            dataclasses.replace(e, mu=e.prototype.mu, decoded=e.prototype.decoded, prototype=None)
            for e in real_encode(*args, **kwargs)
        ]

    monkeypatch.setattr(icm_module, "encode_inputs", with_codes)
    _assert_same_bits(fused.adapter, fuse({"familiarity_gate": False}).adapter)
    monkeypatch.setattr(icm_module, "encode_inputs", real_encode)
    # Through the per-input cache: the same bits.
    cache = IcmInputsCache()
    for _ in range(2):
        cached = fuse_adapters(
            pair,
            "icm",
            [0.5, 0.5],
            tasks=tasks,
            context=FusionContext(fvae=artifact, icm_inputs_cache=cache),
        )
        _assert_same_bits(cached.adapter, fused.adapter)
    # Switched off: the inputs' own codes, whose errors (untrained F-VAE: about 1) close the gate.
    plain = fuse({"task_prototypes": False})
    assert "prototype_shares" not in plain.provenance["details"]["familiarity"]
    assert plain.provenance["details"]["familiarity"]["gate"] == 0.0
    # A fully familiar input keeps its own code; so does every input when the gate reads conditions.
    monkeypatch.setattr(inputs_module, "familiarity", lambda errors, reference: torch.ones_like(errors))
    assert encode_inputs(artifact, pair, tasks)[0].prototype is None
    monkeypatch.setattr(inputs_module, "familiarity", lambda errors, reference: torch.zeros_like(errors))
    assert encode_inputs(artifact, pair, tasks)[0].prototype.share == 1.0
    artifact.meta.familiarity = Familiarity(reference=0.3, explained=0.002)
    assert encode_inputs(artifact, pair, tasks)[0].prototype is None


def test_partial_gate_merges_unrepresentable_inputs_by_arithmetic_with_the_latent_fusion_of_the_rest(
    monkeypatch,
):
    import engine.fusion.icm.method as icm_module

    artifact = _artifact()
    artifact.meta.familiarity = Familiarity(reference=0.3)
    # Inputs 0 and 1 fully familiar, input 2 not representable at all.
    monkeypatch.setattr(icm_module, "familiarity", lambda errors, reference: torch.tensor([1.0, 1.0, 0.0]))
    weights = [0.3, 0.2, 0.5]

    def fuse(adapters, w, params):
        return fuse_adapters(
            adapters, "icm", w, params, tasks=TASKS[: len(adapters)], context=FusionContext(fvae=artifact)
        )

    partial = fuse(ADAPTERS, weights, {})
    details = partial.provenance["details"]["familiarity"]
    # the gate reported is the latent part's: both its inputs are fully familiar
    assert details["mode"] == "partial" and details["arithmetic_inputs"] == [2] and details["gate"] == 1.0
    assert details["displacement"] == "full"
    # 'scaled' = 0.5 x icm(inputs 0, 1 with weights 0.6, 0.4; both familiar: ungated) + 0.5 x dW_2
    familiar = fuse(ADAPTERS[:2], [0.6, 0.4], {"familiarity_gate": False}).adapter
    scaled = fuse(ADAPTERS, weights, {"partial_displacement": "scaled"})
    assert scaled.provenance["details"]["familiarity"]["displacement"] == "scaled"
    want = {n: 0.5 * d for n, d in _dense(familiar).items()}
    for name, delta in _dense(ADAPTERS[2]).items():
        want[name] = want.get(name, 0) + 0.5 * delta
    got = _dense(scaled.adapter)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    # 'min' falls back to arithmetic for all inputs
    whole = fuse(ADAPTERS, weights, {"gate_mode": "min"}).adapter
    arithmetic = {
        n: sum(w * _dense(a).get(n, 0) for w, a in zip(weights, ADAPTERS, strict=True)) for n in got
    }
    for name, delta in _dense(whole).items():
        torch.testing.assert_close(delta, arithmetic[name], rtol=1e-4, atol=1e-5)
    assert partial.adapter.modules.keys() == whole.modules.keys()
    # 'full' (the default): arithmetic over every input + the familiar inputs' displacement, unscaled
    displacement = _dense(familiar)
    for w, adapter in zip([0.6, 0.4], ADAPTERS[:2], strict=True):
        for name, delta in _dense(adapter).items():
            displacement[name] = displacement[name] - w * delta
    assert any(float(d.abs().max()) > 1e-3 for d in displacement.values())  # it is not arithmetic
    for name, delta in _dense(partial.adapter).items():
        torch.testing.assert_close(delta, arithmetic[name] + displacement[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            got[name], arithmetic[name] + 0.5 * displacement[name], rtol=1e-4, atol=1e-5
        )


def test_the_gate_scales_the_displacement_linearly(monkeypatch):
    """A gate ``g`` gives ``sum_t w_t dW_t + g x displacement``: the displacement's update scales
    by ``g``, not ``g**2`` (a decoded vector holds both factors of each module)."""
    import engine.fusion.icm.method as icm_module

    artifact = _artifact()
    artifact.meta.familiarity = Familiarity(reference=0.3)
    monkeypatch.setattr(icm_module, "familiarity", lambda errors, reference: torch.full_like(errors, 0.25))
    gated = _fuse_first_two(artifact, {})
    assert gated.provenance["details"]["familiarity"]["gate"] == 0.25
    ungated = _dense(_fuse_first_two(artifact, {"familiarity_gate": False}).adapter)
    for name, delta in _dense(gated.adapter).items():
        arithmetic = 0.5 * _dense(ADAPTERS[0]).get(name, 0) + 0.5 * _dense(ADAPTERS[1]).get(name, 0)
        assert float((ungated[name] - arithmetic).abs().max()) > 1e-3
        torch.testing.assert_close(
            delta, arithmetic + 0.25 * (ungated[name] - arithmetic), rtol=1e-4, atol=1e-5
        )


def test_catalog_rows_are_encoded_as_stored_not_regauged(tmp_path, monkeypatch):
    """A gauge catalog's rows are in the canonical gauge already: ``icm`` encodes each row exactly
    as stored instead of computing the gauge again. The path before (gauge recomputed on the
    decoded factors) is not bit-reproducible, since the gauge is not idempotent in float32: it
    moves about a third of a row's values by an ulp. The fused adapter agrees with it to that
    rounding, and is the same, byte for byte, however the catalog adapters reach ``icm``."""
    import engine.adapters.codec as codec
    from engine.adapters.codec import to_canonical, to_flat
    from engine.catalog import Catalog
    from engine.fusion import fuse_from_catalog
    from tests.helpers import make_adapter

    pattern = {"rank_pattern": {"layers.0.self_attn.q_proj": 2}}  # a module below r_max: padding
    paths = [make_adapter(tmp_path / f"a{i}", seed=i, r=4, **(pattern if i else {})) for i in range(2)]
    catalog = Catalog(tmp_path / "cat")
    ids = catalog.ingest(paths, task="copy").added
    layout = catalog.layout()
    torch.manual_seed(0)
    config = FVAEConfig(input_dim=layout.size, cond_dim=COND_DIM, arch="mlp", hidden=16, latent_dim=4)
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.full((layout.size,), 0.05))
    meta = ArtifactMeta(task_vector_source=TaskVectorSource(dim=COND_DIM))
    artifact = FVAEArtifact(FVAE(config).eval(), normalizer, layout, {}, meta)
    gauged = []
    real_gauge = codec.canonical_gauge
    monkeypatch.setattr(codec, "canonical_gauge", lambda A, B: gauged.append(1) or real_gauge(A, B))

    def weights_sha256(result, name: str) -> str:
        saved = Path(result.save(tmp_path / name)) / "adapter_model.safetensors"
        return hashlib.sha256(saved.read_bytes()).hexdigest()

    stored = fuse_from_catalog(catalog, "icm", adapter_ids=ids, context=FusionContext(fvae=artifact))
    assert gauged == []  # every module was taken as stored
    loaded = [catalog.load_adapter(i) for i in ids]
    for adapter_id, adapter in zip(ids, loaded, strict=True):
        row = torch.from_numpy(catalog.read_vector(adapter_id)[0].copy())
        assert torch.equal(to_flat(to_canonical(adapter, layout, gauge=True)), row)
    same = fuse_adapters(loaded, "icm", tasks=["copy", "copy"], context=FusionContext(fvae=artifact))
    assert weights_sha256(same, "same") == weights_sha256(stored, "stored")
    # the path before: the rows' factors gauged again on the way into the F-VAE
    for adapter in loaded:
        adapter.modules = {n: LoraModule(m.A, m.B, m.scaling) for n, m in adapter.modules.items()}
    regauged = fuse_adapters(loaded, "icm", tasks=["copy", "copy"], context=FusionContext(fvae=artifact))
    assert len(gauged) == sum(len(a.modules) for a in loaded)
    assert set(regauged.adapter.modules) == set(stored.adapter.modules)
    for name, module in stored.adapter.modules.items():
        torch.testing.assert_close(
            module.delta(), regauged.adapter.modules[name].delta(), rtol=1e-5, atol=1e-7
        )


def test_condition_param_reads_its_former_name():
    from engine.fusion.icm.method import IcmParams

    assert IcmParams.model_validate({"condition": "adapter"}).condition == "adapter"
    assert IcmParams.model_validate({"task_vectors": "adapter"}).condition == "adapter"  # older specs
    assert IcmParams().condition == "trained"
