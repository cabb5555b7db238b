"""The trained F-VAE artifact: everything fusion needs, written to a local path or object store.

<out>/fvae/model.safetensors        F-VAE weights
<out>/fvae/normalizer.safetensors   per-slot mean/std
<out>/fvae/task_vectors.safetensors task vectors seen in training (name -> [d])
<out>/fvae/layout.json              the catalog layout the F-VAE reads and writes
<out>/fvae/artifact.json            F-VAE config, training config, metrics (written last)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from engine.adapters.layout import Layout
from engine.catalog import fs as cfs
from engine.digest import update_with_tensor
from engine.errors import IcmfError
from engine.fvae.config import FVAEConfig
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer

ARTIFACT_FORMAT = 1


@dataclass
class FVAEArtifact:
    model: FVAE
    normalizer: SlotNormalizer
    layout: Layout
    task_vectors: dict[str, torch.Tensor]
    meta: dict[str, Any]

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
            "meta": self.meta,
        }
        digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        tensors = [
            *(("model." + k, v) for k, v in self.model.state_dict().items()),
            *(("normalizer." + k, v) for k, v in self.normalizer.state_dict().items()),
            *(("task_vector." + k, v) for k, v in sorted(self.task_vectors.items())),
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
            "task_vectors.safetensors": save_bytes({k: v.contiguous() for k, v in self.task_vectors.items()}),
            "layout.json": json.dumps(self.layout.to_dict(), sort_keys=True).encode(),
        }
        for name, data in files.items():
            cfs.write_bytes_atomic(fs, cfs.join(base, name), data)
        meta = dict(self.meta, format=ARTIFACT_FORMAT, fvae=self.model.config.to_dict())
        cfs.write_bytes_atomic(fs, cfs.join(base, "artifact.json"), json.dumps(meta, indent=2).encode())
        return cfs.join(base)

    @classmethod
    def load(cls, uri: str) -> FVAEArtifact:
        fs, root = cfs.resolve_uri(uri)
        # ``uri`` is the training output (holding fvae/) or the fvae/ directory itself.
        base = next(
            (b for b in (cfs.join(root, "fvae"), root) if cfs.exists(fs, cfs.join(b, "artifact.json"))), None
        )
        marker = cfs.join(base or root, "artifact.json")
        if base is None:
            raise IcmfError(
                f"{uri}: no trained F-VAE here (missing fvae/artifact.json); run `icmf train` first"
            )
        meta = json.loads(cfs.read_bytes(fs, marker))
        if meta.get("format") != ARTIFACT_FORMAT:
            raise IcmfError(f"{uri}: unsupported F-VAE artifact format {meta.get('format')!r}")
        model = FVAE(FVAEConfig.from_dict(meta["fvae"]))
        model.load_state_dict(load_bytes(cfs.read_bytes(fs, cfs.join(base, "model.safetensors"))))
        model.eval()
        normalizer = SlotNormalizer.from_state_dict(
            load_bytes(cfs.read_bytes(fs, cfs.join(base, "normalizer.safetensors")))
        )
        vectors = dict(load_bytes(cfs.read_bytes(fs, cfs.join(base, "task_vectors.safetensors"))))
        layout = Layout.from_dict(json.loads(cfs.read_bytes(fs, cfs.join(base, "layout.json"))))
        return cls(model, normalizer, layout, vectors, meta)
