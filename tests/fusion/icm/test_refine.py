"""icm's few-shot refinement cannot make a fusion worse on noise: the step is chosen by
cross-validation over all shots, step 0 is kept unless the held-out gain beats its standard error,
and provenance records the kept step's weights.

The objective is synthetic: a stand-in model whose loss on example ``i`` is the squared distance
of the fused adapter's deltas to a target ``T_i = centre + noise_i``. With ``centre`` the
unrefined fusion, every gain on the support shots is noise; with ``centre`` a fusion at other
weights, refinement has something real to find.
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters.layout import Layout
from engine.fusion import FusionContext, fuse_adapters
from engine.fusion.icm.method import IcmParams, refine_budget, select_step
from engine.tasks.fewshot import FewShotObjective, TaskShots
from engine.tasks.functional import adapter_factors
from tests.fusion.test_methods import _artifact, _ConstantDecoder, random_adapter

TASKS = ["a", "b"]
SHOTS = 16


class _QuadraticHost:
    """Loss of a batch: mean over its rows of ``|deltas(factors) - target|^2`` (``target [n, D]``)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def loss(self, factors, batch, head=None) -> torch.Tensor:
        return (_deltas(factors) - batch["target"]).pow(2).sum(dim=1).mean()


def _deltas(factors) -> torch.Tensor:
    return torch.cat([(B @ A).flatten() for A, B in factors])


@pytest.fixture(scope="module")
def setup():
    adapters = [random_adapter({"q": 2, "v": 3}, 0), random_adapter({"q": 2, "v": 3}, 1)]
    layout = Layout.from_adapters(adapters, base_model="m")
    constant = torch.randn(layout.size, generator=torch.Generator().manual_seed(9))
    # A decoder that ignores its code: the fusion is a function of its weights alone, so a
    # recorded weight vector can be checked by re-fusing with it.
    artifact = _artifact(layout, lambda c: _ConstantDecoder(c, constant))
    return adapters, layout, artifact


def _fuse(setup, weights, params=None, objective=None):
    adapters, _, artifact = setup
    context = FusionContext(fvae=artifact, objective=objective)
    return fuse_adapters(adapters, "icm", weights, params or {}, tasks=TASKS, seed=0, context=context)


def _centre(setup, weights) -> torch.Tensor:
    return _deltas(adapter_factors(_fuse(setup, weights).adapter, setup[1]))


def _objective(
    setup, centre: torch.Tensor, noise: float, seed: int = 0, shots: int = SHOTS
) -> FewShotObjective:
    generator = torch.Generator().manual_seed(seed)
    scale = noise * centre.abs().mean()
    by_task = {
        t: TaskShots(
            t,
            {"target": centre + scale * torch.randn(shots, centre.numel(), generator=generator)},
            None,
            shots,
        )
        for t in TASKS
    }
    return FewShotObjective(_QuadraticHost(setup[1]), by_task)


def _excess(setup, fused, centre) -> float:
    """Population loss above the best possible: distance of the fused deltas to the centre."""
    return float((_deltas(adapter_factors(fused.adapter, setup[1])) - centre).pow(2).sum())


REFINE = {"refine_steps": 40, "refine_span": True, "span_granularity": "module"}


def test_noise_only_gain_keeps_step_0(setup):
    start = [0.5, 0.5]
    centre = _centre(setup, start)
    objective = _objective(setup, centre, noise=3.0)
    plain = _fuse(setup, start)
    # The objective does overfit: selecting on the shots it was fitted to moves the fusion away
    # from the population optimum (the unrefined fusion).
    overfit = _fuse(setup, start, {**REFINE, "refine_folds": 0}, objective)
    assert overfit.provenance["details"]["refine"]["kept_step"] > 0
    assert _excess(setup, overfit, centre) > 1e-3 * float(centre.pow(2).sum())
    refined = _fuse(setup, start, REFINE, objective)
    record = refined.provenance["details"]["refine"]
    assert record["selection"] == "cross-validation" and record["folds"] == 4
    assert record["kept_step"] == 0
    assert record["weights"] == pytest.approx(start) and record["span_weights"] == [[0.0, 0.0]] * 2
    for name in ("q", "v"):
        assert torch.equal(refined.adapter.modules[name].delta(), plain.adapter.modules[name].delta())


def test_real_gain_is_kept_and_provenance_records_the_kept_step(setup):
    start, better = [0.5, 0.5], [1.0, 0.9]
    centre = _centre(setup, better)
    objective = _objective(setup, centre, noise=0.5)
    plain = _fuse(setup, start)
    params = {"refine_steps": 60}
    refined = _fuse(setup, start, params, objective)
    record = refined.provenance["details"]["refine"]
    steps, _ = refine_budget(IcmParams(**params), SHOTS)
    assert record["steps"] == steps == 30  # 16 of refine_full_shots = 32 shots: half the steps
    assert 0 < record["kept_step"] <= steps
    kept = record["kept_step"]
    assert record["cv_gain"][kept] > record["cv_se"][kept]
    assert _excess(setup, refined, centre) < 0.5 * _excess(setup, plain, centre)
    assert record["support_loss_kept"] < record["support_loss_start"]
    # The recorded weights are the kept step's: re-fusing with them gives the refined adapter.
    assert record["weights"] != pytest.approx(start)
    again = _fuse(setup, record["weights"])
    for name in ("q", "v"):
        want = refined.adapter.modules[name].delta()
        assert torch.allclose(again.adapter.modules[name].delta(), want, atol=1e-5 * float(want.abs().max()))


def test_one_shot_per_task_cannot_be_cross_validated_so_step_0_is_kept(setup):
    centre = _centre(setup, [1.0, 0.9])
    refined = _fuse(setup, [0.5, 0.5], {"refine_steps": 60}, _objective(setup, centre, 0.1, shots=1))
    record = refined.provenance["details"]["refine"]
    assert record["selection"] == "too few shots" and record["kept_step"] == 0
    assert record["weights"] == [0.5, 0.5]


def test_select_step_keeps_step_0_unless_the_gain_beats_its_standard_error():
    # [folds, steps + 1, tasks]: step 1 gains 1.0 everywhere; step 2 gains 1.05 on average but
    # with a spread that makes it no surer; step 3 loses.
    base = torch.full((4, 1, 2), 5.0)
    step1 = base - 1.0
    step2 = base - torch.tensor([3.0, -0.8, 1.2, 0.8]).view(4, 1, 1).expand(4, 1, 2)
    step3 = base + 1.0
    held = torch.cat([base, step1, step2, step3], dim=1)
    step, record = select_step(held, confidence=1.0)
    assert record["cv_best_step"] == 2 and step == 1  # one-SE rule: the earlier, surer step
    noisy = torch.cat([base, base + torch.tensor([-1.0, 1.0, -1.0, 0.8]).view(4, 1, 1).expand(4, 1, 2)], 1)
    assert select_step(noisy, confidence=1.0)[0] == 0  # a gain (0.05) inside its standard error
    assert select_step(noisy, confidence=0.0)[0] == 1


def test_budget_shrinks_with_few_shots():
    params = IcmParams(refine_steps=100, refine_lr=0.08)
    assert refine_budget(params, 64) == (100, 0.08)
    steps, lr = refine_budget(params, 8)
    assert steps == 25 and lr == pytest.approx(0.04)


def test_folds_hold_every_shot_out_once():
    objective = _objective_rows(10)
    pairs = objective.folds(3, seed=1)
    held = torch.cat([h.shots["a"].batch["target"][:, 0] for _, h in pairs]).sort().values
    assert torch.equal(held, torch.arange(10.0))
    for fit, h in pairs:
        assert fit.shots["a"].count + h.shots["a"].count == 10
        assert not set(fit.shots["a"].batch["target"][:, 0].tolist()) & set(
            h.shots["a"].batch["target"][:, 0].tolist()
        )
    with pytest.raises(ValueError, match="at least 11 examples"):
        objective.folds(11)


def _objective_rows(n: int) -> FewShotObjective:
    rows = torch.arange(float(n)).view(n, 1)
    return FewShotObjective(None, {"a": TaskShots("a", {"target": rows}, None, n)})
