"""The F-VAE artifact's metadata is typed (ArtifactMeta) and artifacts written before it still load."""

from __future__ import annotations

import json

import pytest
import torch

from engine.adapters.layout import Layout, ModuleSpec
from engine.errors import FaultsError
from engine.fusion.icm.familiarity import training_error
from engine.fvae import FVAE, FVAEConfig, SlotNormalizer
from engine.fvae.artifact import ArtifactMeta, FVAEArtifact

LAYOUT = Layout(base_model="m", modules=(ModuleSpec("q", d_out=4, d_in=4),), r_max=2)


def _write_weights(root) -> FVAEConfig:
    """A tiny F-VAE's files under ``root/fvae``; returns its config (artifact.json is then replaced)."""
    config = FVAEConfig(input_dim=LAYOUT.size, cond_dim=3, arch="mlp", hidden=8, latent_dim=4)
    normalizer = SlotNormalizer(torch.zeros(LAYOUT.size), torch.ones(LAYOUT.size))
    FVAEArtifact(FVAE(config).eval(), normalizer, LAYOUT, {"copy": torch.ones(3)}).save(str(root))
    return config


def _write_record(root, record: dict) -> None:
    (root / "fvae" / "artifact.json").write_text(json.dumps(record, indent=2))


# artifact.json as `icmf train` wrote it while the metadata was a free dict (before ArtifactMeta)
def _dict_era_record(config: FVAEConfig) -> dict:
    return {
        "run": "fvae-20260101-000000-abcdef",
        "resumed": False,
        "steps": 40,
        "workers": 2,
        "catalog": "/data/catalog",
        "catalog_version": 3,
        "gauge": True,
        "config": {"catalog": "/data/catalog", "out": "/data/out", "train": {"steps": 40}},
        "metrics": {
            "loss": 1.5,
            "recon": 0.25,
            "kl": 3.0,
            "fusion": 0.5,
            "skipped": 0,
            "step": 40,
            "start_step": 0,
            "episodes_per_s": 12.5,
            "lr": 1e-4,
        },
        "familiarity": {
            "reference": 0.2,
            "quantile": 0.9,
            "mean": 0.1,
            "median": 0.09,
            "max": 0.3,
            "adapters": 16,
            "per_task": {"copy": 0.1},
        },
        "task_vector_source": {
            "kind": "context",
            "dim": 3,
            "model": "sha256:0123456789abcdef",
            "k": {"copy": 8},
        },
        "pool_sizes": {"copy": 16},
        "data_split": {
            "mode": "disjoint",
            "adapters_per_worker": [8, 8],
            "replicated_tasks": [],
            "rank0_streamed": {"copy": 8},
            "rank0_fill_s": 0.5,
        },
        "fusion_loss": "proxy",
        "tasks": ["copy"],
        "created": "2026-01-01T00:00:00+00:00",
        "pid": 1234,
        "format": 1,
        "fvae": config.to_dict(),
    }


def test_an_artifact_written_while_the_metadata_was_a_dict_loads_typed_and_saves_the_same(tmp_path):
    config = _write_weights(tmp_path)
    old = _dict_era_record(config)
    _write_record(tmp_path, old)
    meta = FVAEArtifact.load(str(tmp_path)).meta
    assert isinstance(meta, ArtifactMeta)
    assert meta.familiarity.reference == 0.2 and meta.familiarity.per_task == {"copy": 0.1}
    assert meta.task_vector_source.kind == "context" and meta.task_vector_source.k == {"copy": 8}
    assert meta.metrics.recon == 0.25 and meta.metrics.lr == 1e-4
    assert meta.data_split.adapters_per_worker == [8, 8] and meta.fusion_loss == "proxy"
    # saving it again writes the same record, plus the defaults of what it left out
    FVAEArtifact.load(str(tmp_path)).save(str(tmp_path / "again"))
    again = json.loads((tmp_path / "again/fvae/artifact.json").read_text())
    defaults = {
        "task_vector_source": dict(old["task_vector_source"], seed=0),
        "familiarity": dict(old["familiarity"], explained=None),
    }
    assert again == dict(old, **defaults)


def test_an_artifact_older_than_most_fields_loads_with_their_defaults(tmp_path):
    config = _write_weights(tmp_path)
    # before the gauge, the task-vector source, the familiarity measurement and the data split
    _write_record(tmp_path, {"steps": 10, "metrics": {"recon": 0.4}, "format": 1, "fvae": config.to_dict()})
    artifact = FVAEArtifact.load(str(tmp_path))
    meta = artifact.meta
    assert meta.gauge is True and meta.familiarity is None and meta.data_split is None
    assert meta.task_vector_source.kind == "adapter_projection" and meta.task_vector_source.dim is None
    # the familiarity gate falls back on the training loss's reconstruction term
    assert training_error(artifact) == 0.4


def test_keys_of_a_newer_artifact_are_kept(tmp_path):
    config = _write_weights(tmp_path)
    _write_record(tmp_path, {"format": 1, "fvae": config.to_dict(), "future": {"x": 1}})
    FVAEArtifact.load(str(tmp_path)).save(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again/fvae/artifact.json").read_text())["future"] == {"x": 1}


def test_damaged_metadata_names_the_field(tmp_path):
    config = _write_weights(tmp_path)
    _write_record(
        tmp_path, {"format": 1, "fvae": config.to_dict(), "familiarity": {"reference": "low"}, "steps": "x"}
    )
    with pytest.raises(FaultsError, match=r"2 fault\(s\)") as caught:
        FVAEArtifact.load(str(tmp_path))
    assert any(f.startswith("familiarity.reference") for f in caught.value.faults)
    assert any(f.startswith("steps") for f in caught.value.faults)
