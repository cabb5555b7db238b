"""Fail fast: a bad training setup is refused on the driver within seconds with every fault listed;
inside workers, errors that would repeat end the run at once and only deaths are retried."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.catalog import Catalog
from engine.meta.config import MetaConfigError, load_config
from engine.meta.failures import WorkerFault, fail_fast, first_deterministic
from engine.meta.preflight import plan_training
from engine.tasks import TaskDefinition, load_model_spec, save_task
from engine.tasks.errors import ExamplesError, TaskError
from tests.meta.heads import BASE_ID, SPLIT, heads_adapter, heads_spec, write_task_files

REPO = Path(__file__).resolve().parents[2]


def _define(catalog: Catalog, name: str, spec: dict, examples: Path, **extra) -> None:
    save_task(
        catalog,
        TaskDefinition(name=name, model=load_model_spec(spec), examples=str(examples), split=SPLIT, **extra),
    )


@pytest.fixture(scope="module")
def bad_setup(tmp_path_factory) -> Path:
    """A catalog whose tasks cannot train together: ``argmax``'s model has another body than
    ``sign``'s (another seed), ``parity``'s examples file is gone, ``sign2`` names a missing field."""
    root = tmp_path_factory.mktemp("bad-setup")
    catalog = Catalog(root / "catalog")
    for seed, (task, spec_seed) in enumerate((("sign", 0), ("argmax", 1), ("parity", 0))):
        _, examples = write_task_files(root, task)
        adapter = heads_adapter(root, task, seed=seed, spec_seed=spec_seed)
        catalog.ingest([adapter], task=task, base_model=BASE_ID)
        _define(catalog, task, heads_spec(task, spec_seed), examples)
    (root / "parity.jsonl").unlink()
    catalog.ingest([heads_adapter(root, "sign", seed=3)], task="sign2", base_model=BASE_ID)
    _define(catalog, "sign2", heads_spec("sign"), root / "sign.jsonl", fields={"input": "features"})
    config = root / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "catalog": catalog.uri,
                "out": str(root / "out"),
                "fvae": {"arch": "mlp", "hidden": 8, "latent_dim": 4},
                "train": {"steps": 5, "checkpoint_every": 5, "fusion_loss": "data"},
            }
        )
    )
    return config


def test_plan_lists_every_fault_at_once(bad_setup):
    with pytest.raises(MetaConfigError) as info:
        plan_training(load_config(bad_setup))
    message = str(info.value)
    assert "3 fault(s)" in message, message
    assert "parity.jsonl: no such file" in message  # the missing examples file
    assert "'features'" in message  # the bad field, named
    assert "different base models" in message and "['argmax']" in message  # bodies differ


def test_memory_estimate_is_checked_against_the_workers_memory(bad_setup):
    cfg = load_config(bad_setup)
    cfg = cfg.model_copy(update={"tasks": ["sign"]})
    plan = plan_training(cfg)
    assert plan.memory.total > 0 and plan.memory.model > 0 and plan.memory.pool > 0
    with pytest.raises(MetaConfigError, match="memory: a training worker needs about"):
        plan_training(cfg, worker_memory=plan.memory.total // 2)


def test_icmf_train_fails_within_seconds_before_ray_starts(bad_setup):
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "train", str(bad_setup)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 1, done.stderr
    # The command's own time (CPU seconds: what its wall time is on an idle machine; a shared CI
    # machine stretches wall time by its load). Training would take minutes and restart 3 times.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 15, f"took {cpu:.1f} CPU s ({elapsed:.1f} s wall)"
    err = done.stderr
    assert err.startswith("icmf: error: cannot train: 3 fault(s)"), err
    for fault in ("parity.jsonl: no such file", "'features'", "different base models"):
        assert fault in err
    # no Ray Train run was started, so nothing was restarted
    assert "RETRY" not in done.stdout + err and "Traceback" not in err
    out = bad_setup.parent / "out"
    assert not (out / "runs").exists() and not (out / "current_run.json").exists()


# ---------------------------------------------------------------------------------- in workers
def test_fail_fast_classifies_errors():
    shape_error = r"worker 0, step 3: RuntimeError: mat1 and mat2 shapes"
    with pytest.raises(WorkerFault, match=shape_error), fail_fast("worker 0, step 3"):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)")
    with pytest.raises(ExamplesError), fail_fast("setup"):  # project errors pass unchanged
        raise ExamplesError("x.jsonl", ["no such file"])
    with pytest.raises(OSError), fail_fast("setup"):  # I/O may be transient: stays retryable
        raise OSError("connection reset")
    with pytest.raises(RuntimeError, match="Gloo"), fail_fast("step"):  # a peer died
        raise RuntimeError("[Gloo] Connection closed by peer")
    died = RuntimeError("ActorDiedError")
    fatal = TaskError("task 'x': bad")
    assert first_deterministic({0: died, 1: died}) is None
    assert first_deterministic({1: fatal, 0: died}) is fatal


def _failing_loop(config: dict) -> None:
    marker = Path(config["dir"]) / f"attempt-{time.time_ns()}"
    marker.write_text("")
    raise ExamplesError(config["examples"], ["no such file; give the path of a JSON Lines file"])


def _dying_loop(config: dict) -> None:
    import ray.train

    attempts = Path(config["dir"])
    (attempts / f"attempt-{time.time_ns()}").write_text("")
    if len(list(attempts.glob("attempt-*"))) == 1:
        os._exit(1)  # the worker process dies (as on a lost node), once
    (attempts / "done").write_text("")
    ray.train.report({"done": 1})


def _trainer(loop, tmp_path: Path, name: str):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return lambda: TorchTrainer(
        loop,
        train_loop_config={"dir": str(tmp_path), "examples": "missing.jsonl"},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.01}),
        run_config=RunConfig(
            name=name, storage_path=str(tmp_path / "runs"), failure_config=FailureConfig(max_failures=0)
        ),
    )


@pytest.fixture
def own_placement_groups(ray_session):
    """Remove the placement groups a failed run leaves behind: Ray Train's cleaner actor cannot
    always reach the cluster (e.g. with several local Ray instances on one machine), and a group
    left holding a CPU fraction starves the next test's Ray Data tasks."""
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    before = set(placement_group_table())
    yield
    for pg_id, info in placement_group_table().items():
        if pg_id not in before and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray_session.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("own_placement_groups")
def test_a_deterministic_worker_error_ends_the_run_at_once(ray_session, tmp_path):
    from engine.meta.failures import fit_with_retries

    retries: list[str] = []
    with pytest.raises(ExamplesError) as info:
        fit_with_retries(_trainer(_failing_loop, tmp_path, "fails"), max_failures=3, log=retries.append)
    # the original error, its type and message (it crossed the process boundary pickled)
    assert str(info.value) == "missing.jsonl: no such file; give the path of a JSON Lines file"
    assert info.value.faults == ["no such file; give the path of a JSON Lines file"]
    assert retries == [] and len(list(tmp_path.glob("attempt-*"))) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("own_placement_groups")
def test_a_dead_worker_is_retried(ray_session, tmp_path):
    from engine.meta.failures import fit_with_retries

    retries: list[str] = []
    result = fit_with_retries(_trainer(_dying_loop, tmp_path, "dies"), max_failures=2, log=retries.append)
    assert result.error is None and (tmp_path / "done").exists()
    assert len(retries) == 1 and "restarting from the latest checkpoint (retry 1 of 2)" in retries[0]
    assert len(list(tmp_path.glob("attempt-*"))) == 2


def test_fvae_section_defaults_are_fvae_config_defaults():
    import dataclasses

    from engine.fvae.config import FVAEConfig
    from engine.meta.config import FVAESection

    config = FVAEConfig(input_dim=4096, cond_dim=8, **FVAESection().model_dump())
    assert config == FVAEConfig(input_dim=4096, cond_dim=8)
    assert set(FVAESection.model_fields) <= {f.name for f in dataclasses.fields(FVAEConfig)}
