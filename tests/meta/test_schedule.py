"""The learning-rate schedule of meta-training (pure; milliseconds)."""

from __future__ import annotations

import itertools

import pytest

from engine.meta.config import MetaConfigError, TrainSection, load_config
from engine.meta.schedule import learning_rate, warmup_steps


def test_cosine_warms_up_then_decays_to_its_floor():
    train = TrainSection(steps=1000, lr=1e-3, min_lr_ratio=0.1, lr_schedule="cosine")
    assert warmup_steps(train) == 50  # 5 % of the run
    rates = [learning_rate(step, train) for step in range(1, 1001)]
    assert rates[0] == pytest.approx(1e-3 / 50)
    assert rates[49] == pytest.approx(1e-3)  # end of warm-up: the full rate
    assert max(rates) == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[49:]))  # never rises again
    assert rates[-1] == pytest.approx(1e-4)
    halfway = TrainSection(steps=101, lr=1.0, warmup_steps=0, min_lr_ratio=0.2, lr_schedule="cosine")
    assert learning_rate(51, halfway) == pytest.approx(0.2 + 0.8 * 0.5)


def test_warmup_default_is_capped_and_explicit_values_win():
    assert warmup_steps(TrainSection(steps=10_000)) == 100
    assert warmup_steps(TrainSection(steps=10)) == 0
    no_warmup = TrainSection(steps=10, lr=2e-4, lr_schedule="cosine")
    assert learning_rate(1, no_warmup) == pytest.approx(2e-4)
    train = TrainSection(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, lr_schedule="cosine")
    assert learning_rate(5, train) == pytest.approx(0.5)
    assert learning_rate(100, train) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_is_the_default_and_the_configured_rate_throughout():
    train = TrainSection(steps=100, lr=3e-4)
    assert {learning_rate(step, train) for step in (1, 50, 100)} == {3e-4}


def test_schedule_faults_are_listed_together():
    bad = {"catalog": "c", "out": "o", "train": {"steps": 10, "warmup_steps": 10, "min_lr_ratio": 2}}
    with pytest.raises(MetaConfigError) as info:
        load_config(bad)
    assert "train.min_lr_ratio" in str(info.value)
    bad["train"]["min_lr_ratio"] = 0.5
    with pytest.raises(MetaConfigError, match=r"warmup_steps must be < train\.steps"):
        load_config(bad)


def test_spike_guard_skips_outliers_and_non_finite_losses_only():
    from engine.meta.schedule import SPIKE_WARMUP, SpikeGuard

    guard = SpikeGuard(10.0)
    assert not guard.accept(float("nan")) and not guard.accept(float("inf"))
    # before the warm-up every finite loss is applied, however large
    assert all(guard.accept(v) for v in [1.0] * (SPIKE_WARMUP - 1) + [50.0])
    assert guard.accept(9.9)  # the median of the applied ones is 1.0: under 10x
    assert not guard.accept(10.5)
    assert guard.accept(2.0)
    assert len(guard.recent) == SPIKE_WARMUP + 2  # the skipped one is not remembered
    off = SpikeGuard(None)
    assert all(off.accept(v) for v in [1.0] * 50 + [1e9]) and not off.accept(float("nan"))
