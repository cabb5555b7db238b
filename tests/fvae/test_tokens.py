"""The module-token F-VAE (arch ``tokens``): shapes, gauge, masks, depth-independent size,
normaliser, learning, and the artifact round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout, ModuleSpec
from engine.catalog.synth import parse_layout, synthetic_records
from engine.fvae import FVAE, FVAEConfig, SlotNormalizer
from engine.fvae.artifact import ArtifactMeta, FVAEArtifact, TaskVectorSource
from engine.fvae.tokens import ModuleTokens


def gqa_layout(layers: int, r: int = 4) -> Layout:
    """q (16 -> 16) and a narrower, GQA-like v (16 -> 8) on every layer."""
    specs = []
    for i in range(layers):
        specs += [
            ModuleSpec(f"model.layers.{i}.self_attn.q_proj", 16, 16),
            ModuleSpec(f"model.layers.{i}.self_attn.v_proj", 8, 16),
        ]
    return Layout("test/base", tuple(specs), r)


def tokens_model(layout: Layout, **kwargs) -> FVAE:
    settings = dict(hidden=32, latent_dim=8, token_queries=2, **kwargs)
    return FVAE(
        FVAEConfig(input_dim=layout.size, cond_dim=5, arch="tokens", layout=layout.to_dict(), **settings)
    )


def test_module_tokens_follow_the_layout():
    layout = gqa_layout(3)
    tokens = ModuleTokens.from_layout(layout)
    assert tokens.types == (
        ("model.layers.*.self_attn.q_proj", 16, 16),
        ("model.layers.*.self_attn.v_proj", 8, 16),
    )
    assert tokens.type_of == (0, 1, 0, 1, 0, 1) and tokens.layer_of == (0, 0, 1, 1, 2, 2)
    assert tokens.relative_depth.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    # A token is one canonical rank component: row i of A and column i of B.
    x = torch.randn(2, layout.size)
    for m, (A, B) in enumerate(unflatten(x[1], layout)):
        a, b = tokens.blocks(x, m)
        assert torch.equal(a[1], A) and torch.equal(b[1], B.T)


def test_shapes_and_input_checks():
    layout = gqa_layout(2)
    model = tokens_model(layout)
    x, cond = torch.randn(3, layout.size), torch.randn(3, 5)
    out = model(x, cond)
    assert out["x_hat"].shape == (3, layout.size) and out["mu"].shape == (3, 8)
    assert model.decode(out["mu"], cond).shape == (3, layout.size)
    with pytest.raises(ValueError, match="x must be"):
        model.encode(torch.randn(3, layout.size - 1), cond)


def test_parameter_count_does_not_grow_with_depth():
    count = lambda layout: sum(p.numel() for p in tokens_model(layout).parameters())  # noqa: E731
    assert count(gqa_layout(2)) == count(gqa_layout(24))
    # It grows with the module types and their widths only.
    wider = Layout("w", (*gqa_layout(2).modules, ModuleSpec("model.layers.0.mlp.up_proj", 40, 16)), 4)
    assert count(wider) > count(gqa_layout(2))


def test_absent_modules_and_padded_ranks_are_masked():
    torch.manual_seed(0)
    layout = gqa_layout(2)
    model = tokens_model(layout, recon_space="factors").eval()
    tokens = ModuleTokens.from_layout(layout)
    x = torch.randn(1, layout.size)
    for m in range(layout.num_modules):
        a, b = tokens.blocks(x, m)
        a[:, 3:] = 0  # rank 3 of 4 is zero padding everywhere
        b[:, 3:] = 0
        if tokens.type_of[m] == 1:  # every v_proj is absent
            a.zero_()
            b.zero_()
    cond = torch.randn(1, 5)
    mask = model.net.token_mask(x)
    assert mask.shape == (1, 4, 4) and mask[0, :, 3].sum() == 0 and mask[0, 1].sum() == 0
    before = model.encode(x, cond)[0]
    with torch.no_grad():
        model.net.encoder_embeddings.rank_embedding.weight[3] += 5.0  # only masked tokens use it
        model.net.project_a[1].bias += 5.0  # v_proj's projection: only absent modules use it
    assert torch.allclose(model.encode(x, cond)[0], before, atol=1e-6)
    with torch.no_grad():
        model.net.encoder_embeddings.rank_embedding.weight[2] += 5.0  # a present rank: it must matter
    assert not torch.allclose(model.encode(x, cond)[0], before, atol=1e-3)
    # An adapter with no token at all encodes to finite statistics.
    mu, logvar = model.encode(torch.zeros(1, layout.size), cond)
    assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()
    # Reading updates, a present module has one token per probe whatever its rank; absent ones none.
    delta = tokens_model(layout, recon_space="delta").eval()
    mask = delta.net.token_mask(x)
    assert mask[0, 0].all() and mask[0, 2].all() and not mask[0, 1].any() and not mask[0, 3].any()
    before = delta.encode(x, cond)[0]
    with torch.no_grad():
        delta.net.project_a[1].bias += 5.0
    assert torch.allclose(delta.encode(x, cond)[0], before, atol=1e-6)


def test_learns_to_reconstruct_a_small_set():
    # One thread: this model is tiny, and on a loaded machine torch's thread pool only waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learns()
    finally:
        torch.set_num_threads(threads)


def _learns():
    torch.manual_seed(0)
    layout = gqa_layout(2)
    model = tokens_model(layout, kl_weight=1e-4)
    x, cond = torch.randn(6, layout.size), torch.randn(6, 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        loss = model.loss(model(x, cond), x)["loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = float(model.eval().loss(model(x, cond, sample=False), x)["recon"].detach())
    assert final < 0.3 * first


def test_per_token_scale_normaliser_keeps_zero_and_shares_scales_across_layers():
    layout = parse_layout("layers=3,d=8,r=4,modules=q_proj+v_proj")
    records = [r for _, r in synthetic_records(layout, 24, num_tasks=3, seed=1)]
    x = np.stack([r.weights for r in records])
    present = layout.slot_mask(np.stack([r.mask for r in records]))
    count = present.sum(0)
    mean = (x * present).sum(0) / np.maximum(count, 1)
    std = np.sqrt(((x - mean) ** 2 * present).sum(0) / np.maximum(count, 1))
    config = FVAEConfig(
        input_dim=layout.size, cond_dim=4, arch="tokens", layout=layout.to_dict(), recon_space="factors"
    )
    normalizer = SlotNormalizer.for_config(config, layout, mean, std, count)
    assert torch.equal(normalizer.normalize(torch.zeros(layout.size)), torch.zeros(layout.size))
    scale = normalizer.std.numpy()
    r, d = 4, 8
    module = lambda m: scale[layout.offsets[m] : layout.offsets[m + 1]].reshape(2, r, d)  # noqa: E731
    # q_proj of layers 0 and 2 share each (part, rank) scale; within a rank all slots share it.
    assert np.array_equal(module(0), module(4)) and np.all(module(0) == module(0)[:, :, :1])
    # ranks keep their own scale (canonical components shrink with the rank index)
    assert len(set(module(0)[0, :, 0].tolist())) == r
    # every slot's scale is the root mean square of its (type, part, rank) group
    first = x[:, : r * d].reshape(-1, r, d)[:, 0][present[:, 0]]  # q_proj layer 0, A, rank 0
    others = x[:, 4 * r * 2 * d : 4 * r * 2 * d + r * d].reshape(-1, r, d)[:, 0][present[:, 4 * r * 2 * d]]
    group = np.concatenate([first.ravel(), others.ravel()])
    layer1 = x[:, 2 * r * 2 * d : 2 * r * 2 * d + r * d].reshape(-1, r, d)[:, 0][present[:, 2 * r * 2 * d]]
    group = np.concatenate([group, layer1.ravel()])
    assert scale[0] == pytest.approx(np.sqrt((group.astype(np.float64) ** 2).mean()), rel=1e-4)


def test_config_faults_and_dicts():
    layout = gqa_layout(2)
    with pytest.raises(ValueError, match="needs the layout"):
        FVAEConfig(input_dim=layout.size, cond_dim=5, arch="tokens")
    with pytest.raises(ValueError, match="input_dim"):
        FVAEConfig(input_dim=layout.size + 1, cond_dim=5, arch="tokens", layout=layout.to_dict())
    # Other archs' dicts keep their keys (their artifacts' fingerprints do not move).
    assert "layout" not in FVAEConfig(input_dim=8, cond_dim=2).to_dict()
    config = FVAEConfig(input_dim=layout.size, cond_dim=5, arch="tokens", layout=layout.to_dict())
    assert FVAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_auto_arch_is_dense_where_it_fits_and_module_tokens_beyond():
    """The default arch: the dense F-VAE on small adapters, the module-token one at 7-8 B layouts,
    where the dense one cannot be built; what the config holds (and an artifact records) is the
    resolved arch, and ``icmf train``'s default config resolves the same way."""
    from engine.fvae.config import DENSE_PARAMETER_LIMIT, dense_parameters
    from engine.meta.config import load_config
    from engine.meta.train import fvae_config

    small, large = parse_layout("small"), parse_layout("llama3-8b-all-r16")
    assert dense_parameters(small.size, 256) <= DENSE_PARAMETER_LIMIT < dense_parameters(large.size, 256)
    assert FVAEConfig(input_dim=small.size, cond_dim=4).arch == "mlp"
    with pytest.raises(ValueError, match="'auto' picks above"):
        FVAEConfig(input_dim=large.size, cond_dim=4)
    defaults = load_config({"catalog": "c", "out": "o"})
    assert defaults.fvae.arch == "auto"
    for layout, arch in ((small, "mlp"), (large, "tokens")):
        config = fvae_config(defaults, layout)
        assert config.arch == arch and ("layout" in config.to_dict()) == (arch == "tokens")
        assert FVAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with torch.device("meta"):
        params = sum(p.numel() for p in FVAE(fvae_config(defaults, large)).parameters())
    assert params <= 100_000_000  # the default F-VAE of a Llama-3-8B all-linear r16 LoRA is buildable


def test_artifact_round_trip(tmp_path):
    torch.manual_seed(0)
    layout = gqa_layout(2)
    model = tokens_model(layout).eval()
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.rand(layout.size) + 0.5)
    artifact = FVAEArtifact(model, normalizer, layout, {"t": torch.randn(5)})
    artifact.save(str(tmp_path))
    loaded = FVAEArtifact.load(str(tmp_path))
    assert loaded.model.config == model.config
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x, cond = torch.randn(2, layout.size), torch.randn(2, 5)
    with torch.no_grad():
        assert torch.allclose(
            loaded.model.decode(*model.encode(x, cond)[:1], cond),
            model.decode(model.encode(x, cond)[0], cond),
        )
    # An artifact of an older arch, written before the token fields existed, still loads.
    old = FVAEArtifact(
        FVAE(FVAEConfig(input_dim=layout.size, cond_dim=5, arch="mlp", hidden=8)), normalizer, layout, {}
    )
    old.save(str(tmp_path / "old"))
    meta = json.loads((tmp_path / "old/fvae/artifact.json").read_text())
    assert "layout" not in meta["fvae"] and "token_queries" not in meta["fvae"]
    assert FVAEArtifact.load(str(tmp_path / "old")).model.config.arch == "mlp"


def test_icm_fuses_with_a_module_token_fvae():
    """The anchored decode, the familiarity gate and refinement's decoder read the token arch's
    flat output like any other: one adapter fuses to itself; two fuse to finite deltas."""
    from engine.fusion import FusionContext, fuse_adapters
    from tests.fusion.test_methods import random_adapter

    names = {f"model.layers.{i}.self_attn.{m}_proj": r for i in range(2) for m, r in (("q", 2), ("v", 3))}
    adapters = [random_adapter(names, 0), random_adapter(dict(list(names.items())[:2]), 1)]
    layout = Layout.from_adapters(adapters, base_model="m")
    torch.manual_seed(0)
    meta = ArtifactMeta(task_vector_source=TaskVectorSource(kind="adapter_projection", dim=5, seed=0))
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.full((layout.size,), 0.5))
    artifact = FVAEArtifact(tokens_model(layout).eval(), normalizer, layout, {}, meta)
    one = fuse_adapters(adapters[:1], "icm", [1.0], context=FusionContext(fvae=artifact)).adapter
    for name, module in adapters[0].modules.items():
        expected = module.delta()
        assert (one.modules[name].delta() - expected).norm() <= 1e-5 * expected.norm()
    fused = fuse_adapters(adapters, "icm", [0.5, 0.5], context=FusionContext(fvae=artifact))
    assert all(torch.isfinite(m.delta()).all() for m in fused.adapter.modules.values())


@pytest.mark.parametrize("recon_space", ["factors", "delta"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"anchor": False},
        {"fusion_weight": 0.0},
        {"combine": "sum", "project": False},
    ],
    ids=["anchored", "absolute", "recon-only", "sum"],
)
def test_episode_loss_one_module_at_a_time_equals_the_materialised_one(settings, recon_space):
    """The module-token F-VAE's episodes are computed one module at a time under activation
    checkpoints (no [K, N] copies at 8 B-class sizes): loss terms and every gradient must equal
    those of the whole-vector path (reached here through a data loss that is the proxy itself)."""
    from engine.meta.losses import subspace_proxy_loss
    from engine.meta.step import EpisodeBatch, EpisodeSettings, episode_loss

    layout = gqa_layout(3)
    records = [r for _, r in synthetic_records(layout, 3, num_tasks=3, seed=4)]
    x = torch.from_numpy(np.stack([r.weights for r in records]))
    mask = torch.from_numpy(np.stack([r.mask for r in records]))
    mask[0, 1] = mask[1, 4] = False  # modules some adapters do not target
    x = x * torch.from_numpy(layout.slot_mask(mask.numpy()))
    assert not mask.all() and mask.any(dim=0).all()
    normalizer = SlotNormalizer.per_token_scale(
        layout, x.mean(0).numpy(), x.std(0).numpy() + 1e-3, np.full(layout.size, 3)
    )
    batch = EpisodeBatch(x=x, mask=mask, cond=torch.randn(3, 5), tasks=("a", "b", "c"))
    model = tokens_model(layout, recon_space=recon_space)
    episode = EpisodeSettings(**settings)

    def proxy(fused, _tasks, _ids):
        return subspace_proxy_loss(fused, batch.x, batch.mask, layout)

    results = []
    for data_loss in (None, proxy):
        model.zero_grad()
        torch.manual_seed(0)
        out = episode_loss(model, normalizer, batch, layout, episode, data_loss)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (by_module, grads_by_module), (whole, grads_whole) = results
    assert float(whole["recon"]) > 0 and (float(whole["fusion"]) > 0) == (episode.fusion_weight > 0)
    for key in ("loss", "recon", "kl", "fusion"):
        torch.testing.assert_close(by_module[key], whole[key], rtol=1e-5, atol=1e-6)
    assert grads_by_module.keys() == grads_whole.keys()
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_by_module[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- recon_space: delta
def regauged(x: torch.Tensor, layout: Layout, seed: int) -> torch.Tensor:
    """``x [B, N]`` with every module's factors rewritten as ``A -> G A``, ``B -> B G^-1`` for a
    random invertible ``G`` per (adapter, module): the same updates ``B A``, other factors."""
    generator = torch.Generator().manual_seed(seed)
    tokens = ModuleTokens.from_layout(layout)
    out = x.clone()
    r = layout.r_max
    for m in range(layout.num_modules):
        a, b = tokens.blocks(out, m)
        for i in range(x.shape[0]):
            g = torch.randn(r, r, generator=generator, dtype=torch.float64) + 2 * torch.eye(
                r, dtype=torch.float64
            )
            a[i] = (g @ a[i].double()).float()
            b[i] = (torch.linalg.inv(g).T @ b[i].double()).float()  # rows of B^T: (B G^-1)^T = G^-T B^T
    return out


def dense_updates(x: torch.Tensor, layout: Layout) -> list[list[torch.Tensor]]:
    """Per adapter of ``x [B, N]``, each module's dense update ``B A`` (float64)."""
    return [[B @ A for A, B in unflatten(row.double(), layout)] for row in x]


def test_delta_measures_equal_the_dense_updates_and_ignore_the_gauge():
    from engine.fvae.tokens import delta_measures

    torch.manual_seed(0)
    layout = gqa_layout(2)
    tokens = ModuleTokens.from_layout(layout)
    x, x_hat = torch.randn(3, layout.size), torch.randn(3, layout.size)
    x_hat[1] = 0.5 * x[1] + 0.1 * torch.randn(layout.size)
    for m in range(layout.num_modules):
        error, explained = delta_measures(*tokens.blocks(x_hat.double(), m), *tokens.blocks(x.double(), m))
        for i in range(3):
            target, hat = (
                dense_updates(x[i : i + 1], layout)[0][m],
                dense_updates(x_hat[i : i + 1], layout)[0][m],
            )
            dense_error = (hat - target).square().sum() / target.square().sum()
            dense_cos = (hat * target).sum() / (hat.norm() * target.norm())
            assert float(error[i]) == pytest.approx(float(dense_error), rel=1e-9)
            assert float(explained[i]) == pytest.approx(float(dense_cos**2), rel=1e-9)
    # A different gauge of the target (same updates) changes no measure.
    other = regauged(x, layout, seed=1)
    assert not torch.allclose(other, x)
    for m in range(layout.num_modules):
        first = delta_measures(*tokens.blocks(x_hat, m), *tokens.blocks(x, m))
        second = delta_measures(*tokens.blocks(x_hat, m), *tokens.blocks(other, m))
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-6)


def test_delta_encoder_and_loss_read_the_update_not_its_factors():
    """With ``recon_space: delta`` an adapter's code and its reconstruction loss depend on each
    module's update ``B A`` only; with ``factors`` they depend on how the factors are written."""
    torch.manual_seed(0)
    layout = gqa_layout(2)
    x, cond = torch.randn(2, layout.size), torch.randn(2, 5)
    x[1, : layout.module_sizes[0]] = 0  # an absent module stays absent in any gauge
    other = regauged(x, layout, seed=3)
    for space, invariant in (("delta", True), ("factors", False)):
        model = tokens_model(layout, recon_space=space).eval()
        mu, mu_other = model.encode(x, cond)[0], model.encode(other, cond)[0]
        assert torch.allclose(mu, mu_other, rtol=1e-4, atol=1e-4) == invariant
        out = model(x, cond, sample=False)
        same = model.loss(out, x)["recon"], model.loss(out, other)["recon"]
        assert torch.allclose(*same, rtol=1e-4) == invariant
    # The loss is the mean relative update error over present (adapter, module) pairs.
    model = tokens_model(layout, recon_space="delta").eval()
    out = model(x, cond, sample=False)
    mask = torch.ones(2, layout.size, dtype=torch.bool)
    mask[1, : layout.module_sizes[0]] = False
    dense_hat, dense_x = dense_updates(out["x_hat"].detach(), layout), dense_updates(x, layout)
    pairs = [
        float((dense_hat[i][m] - dense_x[i][m]).square().sum() / dense_x[i][m].square().sum())
        for i in range(2)
        for m in range(layout.num_modules)
        if not (i == 1 and m == 0)
    ]
    assert float(model.loss(out, x, mask)["recon"].detach()) == pytest.approx(np.mean(pairs), rel=1e-4)
    errors, _ = model.reconstruction_measures(out["x_hat"], x, mask)
    assert float(errors[1].detach()) == pytest.approx(np.mean(pairs[layout.num_modules :]), rel=1e-4)


def test_delta_learns_to_reconstruct_updates():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        layout = gqa_layout(2)
        model = tokens_model(layout, recon_space="delta", kl_weight=1e-4)
        x, cond = torch.randn(6, layout.size), torch.randn(6, 5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = model.loss(model(x, cond), x)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            errors, explained = model.eval().reconstruction_measures(
                model(x, cond, sample=False)["x_hat"], x, torch.ones_like(x, dtype=torch.bool)
            )
    finally:
        torch.set_num_threads(threads)
    assert float(errors.mean()) < 0.3 and float(explained.mean()) > 0.7


def test_delta_config_normaliser_and_artifact(tmp_path):
    layout = gqa_layout(2)
    with pytest.raises(ValueError, match="recon_space 'delta' needs arch 'tokens'"):
        FVAEConfig(input_dim=layout.size, cond_dim=5, arch="mlp", recon_space="delta")
    # One scale per (module type, A or B) for every rank: each update only gains a constant.
    records = [r for _, r in synthetic_records(layout, 12, num_tasks=3, seed=1)]
    x = np.stack([r.weights for r in records])
    count = layout.slot_mask(np.stack([r.mask for r in records])).sum(0)
    config = FVAEConfig(
        input_dim=layout.size, cond_dim=5, arch="tokens", layout=layout.to_dict(), recon_space="delta"
    )
    scale = SlotNormalizer.for_config(config, layout, x.mean(0), x.std(0), count).std
    a, b = ModuleTokens.from_layout(layout).blocks(scale[None], 0)
    assert torch.all(a == a[0, 0, 0]) and torch.all(b == b[0, 0, 0])
    # The probes travel with the artifact; an older token artifact (no recon_space) reads factors.
    torch.manual_seed(0)
    model = tokens_model(layout, recon_space="delta").eval()
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.rand(layout.size) + 0.5)
    FVAEArtifact(model, normalizer, layout, {}).save(str(tmp_path / "delta"))
    loaded = FVAEArtifact.load(str(tmp_path / "delta")).model
    assert loaded.config.recon_space == "delta" and torch.equal(loaded.net.probe_in_0, model.net.probe_in_0)
    legacy = {k: v for k, v in model.config.to_dict().items() if k != "recon_space"}
    assert FVAEConfig.from_dict(legacy).recon_space == "factors"
