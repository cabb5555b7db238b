"""Meta-training on Ray Train end to end: train, fuse with icm, resume, survive a killed worker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from engine.adapters import load_adapter
from engine.catalog import Catalog
from engine.catalog.synth import parse_layout, synthesize
from engine.cli.main import main
from engine.fusion import PROVENANCE_FILE, FusionContext, fuse_from_catalog
from engine.fusion.icm.familiarity import EXPLAINS_NOTHING
from engine.fvae.artifact import FVAEArtifact
from engine.meta.config import MetaConfigError, load_config
from engine.meta.train import train_fvae

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def catalog_uri(tmp_path_factory):
    catalog = Catalog(tmp_path_factory.mktemp("meta") / "cat")
    synthesize(catalog, 32, parse_layout("tiny"), num_tasks=4, seed=0)
    return catalog.uri


def config(catalog_uri: str, out: Path, steps: int, workers: int = 2, every: int = 10) -> dict:
    return {
        "catalog": catalog_uri,
        "out": str(out),
        "fvae": {"depth": 5, "channels": 4, "max_channels": 8, "latent_dim": 16},
        "task_vectors": {"dim": 8},
        "train": {
            "steps": steps,
            "checkpoint_every": every,
            "report_every": 5,
            "workers": workers,
            "lr": 1e-3,
            "lr_schedule": "cosine",
        },
    }


def test_train_then_fuse_with_icm(ray_session, catalog_uri, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(catalog_uri, tmp_path / "out", steps=20)))
    assert main(["train", str(path)]) == 0
    artifact = FVAEArtifact.load(str(tmp_path / "out"))
    assert artifact.meta.steps == 20 and artifact.meta.workers == 2
    # each worker streamed its own half (17/7/5/3 adapters per task: none replicated)
    split = artifact.meta.data_split
    assert split.mode == "disjoint" and split.replicated_tasks == []
    assert sorted(split.adapters_per_worker) == [16, 16]
    assert sum(split.rank0_streamed.values()) == 16
    assert set(artifact.meta.pool_sizes) == set(Catalog(catalog_uri).tasks())
    assert set(artifact.trained_vectors) == set(Catalog(catalog_uri).tasks())
    # the cosine schedule ended at its floor; the final model's reconstruction errors were measured
    assert artifact.meta.metrics.lr == pytest.approx(1e-4)
    assert artifact.meta.metrics.skipped == 0
    familiar = artifact.meta.familiarity
    assert set(familiar.per_task) == set(artifact.meta.pool_sizes) and familiar.adapters == 16
    assert 0 < familiar.median <= familiar.reference <= familiar.max
    # each training task's prototype code, measured on the same adapters
    assert set(artifact.task_latents) == set(familiar.per_task)
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in artifact.task_latents.values())
    out = tmp_path / "fused"
    argv = ["fuse", "--catalog", catalog_uri, "--tasks", "synth-00,synth-02", "--method", "icm"]
    assert main([*argv, "--model", str(tmp_path / "out"), "--out", str(out)]) == 0
    fused = load_adapter(out)
    layout = Catalog(catalog_uri).layout()
    assert set(fused.modules) <= {m.name for m in layout.modules}
    assert all(torch.isfinite(m.delta()).all() for m in fused.modules.values())
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["method"] == "icm"
    gate = provenance["details"]["familiarity"]
    assert 0.0 <= familiar.explained <= 1.0
    assert gate["basis"] == ("task" if familiar.explained < EXPLAINS_NOTHING else "reconstruction")
    assert gate.get("reference_error", familiar.reference) == familiar.reference
    # a task the F-VAE never saw: its vector is derived from its adapter alone
    unseen = fuse_from_catalog(
        Catalog(catalog_uri),
        "icm",
        tasks=["synth-01", "synth-03"],
        params={"condition": "adapter", "rank": 2},
        context=FusionContext(fvae=artifact),
    )
    assert max(m.rank for m in unseen.adapter.modules.values()) <= 2
    assert main([*argv, "--out", str(tmp_path / "nomodel")]) == 1
    assert "needs a trained F-VAE" in capsys.readouterr().err


def test_resume_continues_from_the_last_checkpoint(ray_session, catalog_uri, tmp_path):
    out = tmp_path / "out"
    train_fvae(load_config(config(catalog_uri, out, steps=10, workers=1, every=5)))
    first = FVAEArtifact.load(str(out)).meta
    train_fvae(load_config(config(catalog_uri, out, steps=20, workers=1, every=5)), resume=True)
    second = FVAEArtifact.load(str(out)).meta
    assert second.run == first.run and second.resumed is True
    assert second.steps == 20 and second.metrics.start_step == 10


@pytest.mark.parametrize("recon_space", ["factors", "delta"])
def test_module_token_fvae_trains_resumes_and_fuses(ray_session, catalog_uri, tmp_path, recon_space):
    out = tmp_path / "out"
    tokens = {"arch": "tokens", "hidden": 16, "latent_dim": 8, "token_queries": 2, "recon_space": recon_space}
    settings = {**config(catalog_uri, out, steps=6, workers=1, every=3), "fvae": tokens}
    if recon_space == "delta":  # and a checkpoint kept out: its task's vector comes from the others
        kept_out = next(e["id"] for e in Catalog(catalog_uri).entries() if e["task"] == "synth-00")
        settings["exclude_adapters"] = [kept_out]
    train_fvae(load_config(settings))
    train_fvae(load_config({**settings, "train": {**settings["train"], "steps": 10}}), resume=True)
    artifact = FVAEArtifact.load(str(out))
    assert artifact.meta.steps == 10 and artifact.meta.metrics.start_step == 6
    assert (
        artifact.model.config.arch == "tokens" and artifact.model.config.layout == artifact.layout.to_dict()
    )
    assert artifact.model.config.recon_space == recon_space
    # the zero-preserving per-module-type normaliser travelled with it
    assert torch.count_nonzero(artifact.normalizer.mean) == 0
    assert artifact.meta.familiarity.reference > 0  # its reconstruction errors were measured
    fused = tmp_path / "fused"
    argv = ["fuse", "--catalog", catalog_uri, "--tasks", "synth-00,synth-01", "--method", "icm"]
    assert main([*argv, "--model", str(out), "--out", str(fused)]) == 0
    assert all(torch.isfinite(m.delta()).all() for m in load_adapter(fused).modules.values())


def _kill_a_worker_after_first_checkpoint(out: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        if list(out.glob("runs/*/checkpoint_*")):
            time.sleep(3.0)  # let the controller register the checkpoint before the crash
            # Only this session's cluster: ray.init(address="local") starts it as our descendants
            # (another Ray on the machine, e.g. a benchmark's, has training workers too).
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = proc.cmdline()
                except psutil.Error:
                    continue
                if any("RayTrainWorker" in part for part in cmdline):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_a_killed_worker_is_survived(ray_session, catalog_uri, tmp_path):
    out = tmp_path / "out"
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint, args=(out, killed, stop), daemon=True
    )
    watcher.start()
    try:
        train_fvae(load_config(config(catalog_uri, out, steps=200, workers=2, every=5)))
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed, "no training worker was found to kill"
    meta = FVAEArtifact.load(str(out)).meta
    assert meta.steps == 200 and meta.metrics.start_step > 0


def _probe_loop(config: dict) -> None:
    """Stream this worker's share exactly as ``train_loop`` does and write down what came."""
    import ray.train

    from engine.meta.train import fill_pool, worker_shard

    context = ray.train.get_context()
    rank = context.get_world_rank()
    shard = worker_shard(config["num_shares"], rank, context.get_world_size())
    # A capacity above every task's count keeps every streamed adapter in the store.
    pool, store = fill_pool(shard, 64, seed=rank, tasks=set(config["tasks"]))
    assert sum(pool.seen.values()) == len(store)
    record = {"ids": [adapter_id for _, _, adapter_id in store.values()], "pool_tasks": pool.tasks()}
    (Path(config["dir"]) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("split", ["disjoint", "full"])
def test_workers_stream_disjoint_shares_covering_every_task(ray_session, tmp_path, split):
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.meta.train import worker_datasets, worker_shares

    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 24, parse_layout("tiny"), num_tasks=8, seed=0)  # 12, 4, 2, 2, 1, 1, 1, 1
    counts = catalog.tasks()
    tasks = sorted(counts)[:-1]  # one task kept out of training: never streamed
    layout_id = catalog.layout().layout_id
    shares = worker_shares(catalog, layout_id, tasks, 2, split)
    TorchTrainer(
        _probe_loop,
        train_loop_config={"num_shares": len(shares), "tasks": tasks, "dir": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=worker_datasets(catalog, layout_id, shares),
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name=f"probe-{split}"),
    ).fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for record in seen:
        assert record["pool_tasks"] == tasks  # every worker covers every training task
        assert len(record["ids"]) == len(set(record["ids"]))
    first, second = (set(record["ids"]) for record in seen)
    expected = {e["id"] for e in catalog.entries() if e["task"] in tasks}
    assert first | second == expected
    if split == "full":
        assert first == second == expected
        return
    # disjoint, except the tasks with one adapter (fewer than workers), which both workers get
    single = {t for t in tasks if counts[t] < 2}
    assert single and {catalog.get(i)["task"] for i in first & second} == single
    assert len(first & second) == len(single) and abs(len(first) - len(second)) <= 1


def test_kept_out_adapters_are_never_streamed_and_bad_ids_are_faults(tmp_path):
    """``exclude_adapters`` keeps checkpoints out of meta-training (to measure fusion of new
    checkpoints of known tasks); ids that name nothing, or that empty a task, are config faults."""
    from engine.meta.preflight import plan_training

    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 24, parse_layout("tiny"), num_tasks=8, seed=0)  # 12, 4, 2, 2, 1, 1, 1, 1
    by_task: dict[str, list[str]] = {}
    for entry in catalog.entries():
        by_task.setdefault(entry["task"], []).append(entry["id"])
    big = max(by_task, key=lambda t: len(by_task[t]))
    kept_out = by_task[big][:3]
    config = {"catalog": catalog.uri, "out": str(tmp_path / "out"), "fvae": {"arch": "mlp", "hidden": 8}}
    plan = plan_training(load_config({**config, "exclude_adapters": kept_out}))
    streamed = {i for share in plan.shares for i in share["id"].to_pylist()}
    assert streamed == {e["id"] for e in catalog.entries()} - set(kept_out)
    single = next(t for t, ids in by_task.items() if len(ids) == 1)
    with pytest.raises(MetaConfigError) as info:
        plan_training(load_config({**config, "exclude_adapters": ["no-such-id", by_task[single][0]]}))
    assert "['no-such-id'] are not adapters" in str(info.value)
    assert f"leaves tasks ['{single}'] without any training adapter" in str(info.value)


def test_a_worker_group_of_another_size_is_refused():
    from engine.meta.train import worker_shard

    with pytest.raises(RuntimeError, match="split for 2 workers but 3"):
        worker_shard(2, 0, 3)


def test_bad_config_lists_every_fault(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"out": "x", "fvae": {"depth": 0, "colour": 1}, "train": {"steps": -1}}))
    with pytest.raises(MetaConfigError) as info:
        load_config(path)
    message = str(info.value)
    for fault in ("catalog", "fvae.depth", "fvae.colour", "train.steps"):
        assert fault in message
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
