"""The trained F-VAE artifact: everything fusion needs, written to a local path or object store.

<out>/fvae/model.safetensors        F-VAE weights
<out>/fvae/normalizer.safetensors   per-slot mean/std
<out>/fvae/task_vectors.safetensors trained_vectors: the training tasks' vectors (name -> [d])
<out>/fvae/task_latents.safetensors task_latents: the training tasks' prototype codes (name ->
                                    [latent]); absent in artifacts written before them
<out>/fvae/layout.json              the catalog layout the F-VAE reads and writes
<out>/fvae/artifact.json            F-VAE config and :class:`ArtifactMeta` (written last)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from engine.adapters.layout import Layout
from engine.catalog import fs as cfs
from engine.digest import update_with_tensor
from engine.errors import FaultsError, IcmfError, pydantic_faults
from engine.fvae.config import FVAEConfig
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer

ARTIFACT_FORMAT = 1
TASK_LATENTS_FILE = "task_latents.safetensors"


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


class _Record(pydantic.BaseModel):
    """A part of ``artifact.json``: typed fields; keys it does not name are kept as they are (an
    artifact written by a newer version still loads, and saving it again loses nothing)."""

    model_config = pydantic.ConfigDict(extra="allow", validate_assignment=True)


class TaskVectorSource(_Record):
    """What the F-VAE is conditioned on: ``adapter_projection`` (the seeded projection of each
    adapter, :func:`engine.fusion.icm.projection.project` with ``dim`` and ``seed``) or ``context``
    (stored in-context vectors of the model(s) ``model``, ``k`` examples per task)."""

    kind: Literal["adapter_projection", "context"] = "adapter_projection"
    dim: int | None = pydantic.Field(None, gt=0, description="None: the F-VAE's cond_dim")
    seed: int = 0
    model: str | list[str] | None = None
    k: dict[str, int] = pydantic.Field(default_factory=dict)


class Familiarity(_Record):
    """The final F-VAE's relative reconstruction errors on its training adapters
    (:func:`engine.fvae.recon.reconstruction_errors`); ``reference`` (their ``quantile``) is the
    error up to which ``icm``'s familiarity gate counts an input as familiar. ``explained``: the
    median :func:`engine.fvae.recon.explained_fraction` of the same adapters (None in artifacts
    older than it): near 0, the F-VAE's reconstructions say nothing about any adapter, so the gate
    cannot read familiarity from them."""

    reference: float
    explained: float | None = None
    quantile: float | None = None
    mean: float | None = None
    median: float | None = None
    max: float | None = None
    adapters: int | None = None
    per_task: dict[str, float] = pydantic.Field(default_factory=dict)


class TrainingMetrics(_Record):
    """The last report window of training: mean loss terms over its applied episodes (NaN when
    all were skipped), spikes skipped, the step, the step this attempt started from, the rate."""

    loss: float | None = None
    recon: float | None = None
    kl: float | None = None
    fusion: float | None = None
    skipped: int = 0
    step: int | None = None
    start_step: int = 0
    episodes_per_s: float | None = None
    lr: float | None = None


class DataSplit(_Record):
    """How the catalog's adapters were split over the workers (and what rank 0 streamed)."""

    mode: str = ""
    adapters_per_worker: list[int] = pydantic.Field(default_factory=list)
    replicated_tasks: list[str] = pydantic.Field(default_factory=list)
    rank0_streamed: dict[str, int] = pydantic.Field(default_factory=dict)
    rank0_fill_s: float | None = None


class ArtifactMeta(_Record):
    """``artifact.json`` besides its ``format`` and the F-VAE's config: how the F-VAE was trained
    and what fusion reads (``gauge``, ``task_vector_source``, ``familiarity``, ``metrics``).

    Every field has a default, so artifacts written before a field existed still load: an old
    artifact is read as trained on the gauge-fixed canonical form with adapter-derived task
    vectors, without a familiarity measurement.
    """

    run: str = ""
    resumed: bool = False
    steps: int = 0
    workers: int = 1
    catalog: str = ""
    catalog_version: int | None = None
    gauge: bool = True
    config: dict[str, Any] = pydantic.Field(default_factory=dict, description="the training config")
    metrics: TrainingMetrics = pydantic.Field(default_factory=TrainingMetrics)
    familiarity: Familiarity | None = None
    task_vector_source: TaskVectorSource = pydantic.Field(default_factory=TaskVectorSource)
    pool_sizes: dict[str, int] = pydantic.Field(default_factory=dict)
    data_split: DataSplit | None = None
    fusion_loss: Literal["data", "proxy"] | None = None
    tasks: list[str] = pydantic.Field(default_factory=list)
    created: str = ""
    pid: int | None = None


@dataclass
class FVAEArtifact:
    """A trained F-VAE and what fusion reads with it.

    Attributes:
        trained_vectors: the condition meta-training gave each of its tasks (in-context or
            adapter-derived, as ``meta.task_vector_source`` says), by task; stored as
            ``task_vectors.safetensors``. Vectors of other tasks reach fusion through the
            fusion context instead.
        task_latents: each training task's prototype code ``[latent]``, the mean posterior mean
            of its training adapters (measured with ``meta.familiarity``); ``icm`` encodes an
            input of the task that the F-VAE cannot reconstruct with it. Stored as
            ``task_latents.safetensors``; empty for artifacts written before it.
    """

    model: FVAE
    normalizer: SlotNormalizer
    layout: Layout
    trained_vectors: dict[str, torch.Tensor]
    meta: ArtifactMeta = field(default_factory=ArtifactMeta)
    task_latents: dict[str, torch.Tensor] = field(default_factory=dict)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of everything fusion reads from this artifact: the model's class, config and
        state dict, the normaliser, the layout, the training task vectors and ``meta`` (gauge,
        task-vector source). Computed once (megabytes of weights): an artifact is not changed
        after it is loaded; build a new one for new weights."""
        digest = hashlib.sha256()
        config = getattr(self.model, "config", None)
        header = {
            "model": type(self.model).__qualname__,
            "config": config.to_dict() if hasattr(config, "to_dict") else repr(config),
            "layout": self.layout.to_dict(),
            "meta": self.meta.model_dump(mode="json"),
        }
        digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        tensors = [
            *(("model." + k, v) for k, v in self.model.state_dict().items()),
            *(("normalizer." + k, v) for k, v in self.normalizer.state_dict().items()),
            *(("task_vector." + k, v) for k, v in sorted(self.trained_vectors.items())),
            *(("task_latent." + k, v) for k, v in sorted(self.task_latents.items())),
        ]
        for name, tensor in tensors:
            update_with_tensor(digest, name, tensor)
        return digest.hexdigest()

    def save(self, uri: str) -> str:
        """Write under ``<uri>/fvae``; ``artifact.json`` goes last, so a reader that finds it finds
        every other file whole."""
        fs, root = cfs.resolve_uri(uri)
        base = cfs.join(root, "fvae")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        files = {
            "model.safetensors": save_bytes(state),
            "normalizer.safetensors": save_bytes(self.normalizer.state_dict()),
            "task_vectors.safetensors": save_bytes(
                {k: v.contiguous() for k, v in self.trained_vectors.items()}
            ),
            "layout.json": json.dumps(self.layout.to_dict(), sort_keys=True).encode(),
        }
        if self.task_latents:
            files[TASK_LATENTS_FILE] = _tensors_bytes(self.task_latents)
        for name, data in files.items():
            cfs.write_bytes_atomic(fs, cfs.join(base, name), data)
        record = dict(
            self.meta.model_dump(mode="json"), format=ARTIFACT_FORMAT, fvae=self.model.config.to_dict()
        )
        cfs.write_bytes_atomic(fs, cfs.join(base, "artifact.json"), json.dumps(record, indent=2).encode())
        return cfs.join(base)

    def save_task_latents(self, uri: str) -> None:
        """Add ``task_latents`` to the artifact already written at ``uri`` (the training output or
        its ``fvae/`` directory) without writing anything else: a reader sees the file whole or
        not at all, and an artifact without it is complete (it fuses without prototypes)."""
        fs, base = self.locate(uri)
        cfs.write_bytes_atomic(fs, cfs.join(base, TASK_LATENTS_FILE), _tensors_bytes(self.task_latents))

    @staticmethod
    def locate(uri: str) -> tuple[Any, str]:
        """``(filesystem, the fvae/ directory)`` of the artifact at ``uri``: the training output
        (holding fvae/) or the fvae/ directory itself.

        Raises:
            IcmfError: no ``artifact.json`` in either place.
        """
        fs, root = cfs.resolve_uri(uri)
        base = next(
            (b for b in (cfs.join(root, "fvae"), root) if cfs.exists(fs, cfs.join(b, "artifact.json"))), None
        )
        if base is None:
            raise IcmfError(
                f"{uri}: no trained F-VAE here (missing fvae/artifact.json); run `icmf train` first"
            )
        return fs, base

    @classmethod
    def load(cls, uri: str) -> FVAEArtifact:
        fs, base = cls.locate(uri)
        marker = cfs.join(base, "artifact.json")
        record = json.loads(cfs.read_bytes(fs, marker))
        if record.get("format") != ARTIFACT_FORMAT:
            raise IcmfError(f"{uri}: unsupported F-VAE artifact format {record.get('format')!r}")
        try:
            meta = ArtifactMeta.model_validate(
                {k: v for k, v in record.items() if k not in ("format", "fvae")}
            )
        except pydantic.ValidationError as exc:
            raise FaultsError(f"{marker} (damaged F-VAE artifact)", pydantic_faults(exc.errors())) from None
        model = FVAE(FVAEConfig.from_dict(record["fvae"]))
        model.load_state_dict(load_bytes(cfs.read_bytes(fs, cfs.join(base, "model.safetensors"))))
        model.eval()
        normalizer = SlotNormalizer.from_state_dict(
            load_bytes(cfs.read_bytes(fs, cfs.join(base, "normalizer.safetensors")))
        )
        vectors = dict(load_bytes(cfs.read_bytes(fs, cfs.join(base, "task_vectors.safetensors"))))
        layout = Layout.from_dict(json.loads(cfs.read_bytes(fs, cfs.join(base, "layout.json"))))
        latents_file = cfs.join(base, TASK_LATENTS_FILE)
        latents = dict(load_bytes(cfs.read_bytes(fs, latents_file))) if cfs.exists(fs, latents_file) else {}
        return cls(model, normalizer, layout, vectors, meta, latents)
