"""One fusion path: ``icmf fuse`` and a served fusion spec give the same adapter, bit for bit.

Both build their context with :func:`engine.fusion.fusion_context`; the F-VAE here was trained on
in-context task vectors and one fused task was never seen, so the fusion depends on the vector
stored in the catalog (``icmf taskvec``): a server that ignored it would fail or differ.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from engine.adapters.io import WEIGHTS_NAME, save_adapter
from engine.catalog import Catalog
from engine.cli.main import main
from engine.fvae.artifact import ArtifactMeta, FVAEArtifact, TaskVectorSource
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer
from engine.task_vectors import TaskVector, save_task_vectors
from serve.deployment import fuse_spec
from serve.spec import FusionSpec
from tests.helpers import make_adapter, small_conv_fvae_config

COND_DIM = 6


@pytest.fixture(scope="module")
def fusion_setup(tmp_path_factory):
    """A catalog of two tasks (``seen``, ``unseen``), a stored vector for ``unseen``, and an F-VAE
    conditioned on in-context vectors that saw only ``seen``."""
    root = tmp_path_factory.mktemp("fusion-path")
    catalog = Catalog(root / "catalog")
    for i, task in enumerate(("seen", "unseen")):
        catalog.ingest([make_adapter(root / f"a{i}", seed=i, r=4 - 2 * i)], task=task)
    g = torch.Generator().manual_seed(7)
    stored = TaskVector(
        "unseen", torch.randn(COND_DIM, generator=g), k=4, example_ids=[], model="m", with_adapter=True
    )
    save_task_vectors(catalog, {"unseen": stored})
    layout = catalog.layout()
    torch.manual_seed(0)
    config = small_conv_fvae_config(layout.size, COND_DIM)
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.full((layout.size,), 0.05))
    meta = ArtifactMeta(task_vector_source=TaskVectorSource(kind="context", dim=COND_DIM))
    vectors = {"seen": torch.randn(COND_DIM, generator=g)}
    FVAEArtifact(FVAE(config).eval(), normalizer, layout, vectors, meta).save(str(root / "fvae"))
    return catalog, str(root / "fvae")


def _sha256(path) -> str:
    return hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("method", "params"), [("icm", {}), ("icm", {"gate_mode": "min", "rank": 3}), ("ties", {"density": 0.5})]
)
def test_cli_and_served_spec_fuse_the_same_adapter(fusion_setup, tmp_path, capsys, method, params):
    catalog, fvae_dir = fusion_setup
    weights = [0.7, 0.4]
    argv = ["fuse", "--catalog", catalog.uri, "--tasks", "seen,unseen", "--method", method]
    argv += ["--weights", "0.7,0.4", "--model", fvae_dir, "--out", str(tmp_path / "cli")]
    argv += [f"--param={key}={value}" for key, value in params.items()]
    assert main(argv) == 0, capsys.readouterr().err
    spec = FusionSpec.model_validate(
        {"method": method, "tasks": ["seen", "unseen"], "weights": weights, "params": params}
    ).canonical()
    served = fuse_spec(catalog, spec, FVAEArtifact.load(fvae_dir))
    save_adapter(served, tmp_path / "served")
    assert _sha256(tmp_path / "served") == _sha256(tmp_path / "cli")


def test_the_served_icm_uses_the_stored_task_vector(fusion_setup):
    """Without the stored vector the unseen task has no condition: the server must read it."""
    catalog, fvae_dir = fusion_setup
    spec = FusionSpec.model_validate({"method": "icm", "tasks": ["seen", "unseen"]}).canonical()
    artifact = FVAEArtifact.load(fvae_dir)
    fuse_spec(catalog, spec, artifact)  # would raise "no task vector" without the catalog's vector
    seen_only = FusionSpec.model_validate({"method": "icm", "tasks": ["seen"]}).canonical()
    assert fuse_spec(catalog, seen_only, artifact).modules
