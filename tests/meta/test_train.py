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
from engine.fusion import PROVENANCE_FILE, fuse_from_catalog
from engine.meta.artifact import FVAEArtifact
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
        },
    }


def test_train_then_fuse_with_icm(ray_session, catalog_uri, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(catalog_uri, tmp_path / "out", steps=20)))
    assert main(["train", str(path)]) == 0
    artifact = FVAEArtifact.load(str(tmp_path / "out"))
    assert artifact.meta["steps"] == 20 and artifact.meta["workers"] == 2
    assert set(artifact.task_vectors) == set(Catalog(catalog_uri).tasks())
    out = tmp_path / "fused"
    argv = ["fuse", "--catalog", catalog_uri, "--tasks", "synth-00,synth-02", "--method", "icm"]
    assert main([*argv, "--model", str(tmp_path / "out"), "--out", str(out)]) == 0
    fused = load_adapter(out)
    layout = Catalog(catalog_uri).layout()
    assert set(fused.modules) <= {m.name for m in layout.modules}
    assert all(torch.isfinite(m.delta()).all() for m in fused.modules.values())
    assert json.loads((out / PROVENANCE_FILE).read_text())["method"] == "icm"
    # a task the F-VAE never saw: its vector is derived from its adapter alone
    unseen = fuse_from_catalog(
        Catalog(catalog_uri),
        "icm",
        tasks=["synth-01", "synth-03"],
        params={"task_vectors": "adapter", "rank": 2},
        context={"fvae": artifact},
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
    assert second["run"] == first["run"] and second["resumed"] is True
    assert second["steps"] == 20 and second["metrics"]["start_step"] == 10


def _kill_a_worker_after_first_checkpoint(out: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        if list(out.glob("runs/*/checkpoint_*")):
            time.sleep(3.0)  # let the controller register the checkpoint before the crash
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.info["pid"])
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
    assert meta["steps"] == 200 and meta["metrics"]["start_step"] > 0


def test_bad_config_lists_every_fault(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"out": "x", "fvae": {"depth": 0, "colour": 1}, "train": {"steps": -1}}))
    with pytest.raises(MetaConfigError) as info:
        load_config(path)
    message = str(info.value)
    for fault in ("catalog", "fvae.depth", "fvae.colour", "train.steps"):
        assert fault in message
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
