"""F-VAE configuration (internal dataclass tier; the YAML tier validates into it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class FVAEConfig:
    """Shape and loss settings of a Fusion-VAE.

    Attributes:
        input_dim: flat adapter length ``N`` (the catalog layout's size).
        cond_dim: task-vector length ``d``.
        arch: ``"conv"`` — the reference 1-D conv stack (ICM-LoRA); ``"chunked"`` — fixed-size
            chunks with slot embeddings and a shared encoder, for adapters far larger than a few
            million parameters.
        latent_dim: size of ``z`` (reference: 256).
        depth: stride-2 conv layers; the input is padded to a multiple of ``2**depth``
            (reference: 12, i.e. 4096).
        channels: conv channels of the first layer (doubled every two layers up to ``max_channels``).
        max_channels: channel cap.
        chunk_size: chunked variant: values per chunk.
        hidden: chunked variant: width of the per-chunk MLPs.
        kl_weight: ``beta`` of the KL term (reference: 0.005).
        norm: conv stack normalisation. ``instance`` (default): per sample and channel, so a
            fused latent decodes the same in training and at fusion time. ``batch``: the
            reference's BatchNorm — its batch statistics make the one-sample fused decode of an
            episode differ between training (batch statistics) and inference (running
            statistics); measured on the lab's generative suite, K = 2: G 0.77 vs 0.16.
    """

    input_dim: int
    cond_dim: int
    arch: Literal["conv", "chunked"] = "conv"
    latent_dim: int = 256
    depth: int = 12
    channels: int = 8
    max_channels: int = 64
    chunk_size: int = 1024
    hidden: int = 256
    kl_weight: float = 0.005
    norm: Literal["instance", "batch"] = "instance"

    def __post_init__(self) -> None:
        faults = []
        for name in (
            "input_dim",
            "cond_dim",
            "latent_dim",
            "depth",
            "channels",
            "max_channels",
            "chunk_size",
            "hidden",
        ):
            if getattr(self, name) <= 0:
                faults.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch not in ("conv", "chunked"):
            faults.append(f"arch must be 'conv' or 'chunked', got {self.arch!r}")
        if self.norm not in ("instance", "batch"):
            faults.append(f"norm must be 'instance' or 'batch', got {self.norm!r}")
        if self.kl_weight < 0:
            faults.append(f"kl_weight must be >= 0, got {self.kl_weight}")
        if faults:
            raise ValueError("invalid FVAEConfig: " + "; ".join(faults))

    @property
    def padded_dim(self) -> int:
        """Input length after padding (conv: multiple of ``2**depth``; chunked: of ``chunk_size``)."""
        unit = 2**self.depth if self.arch == "conv" else self.chunk_size
        return -(-self.input_dim // unit) * unit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FVAEConfig:
        # Artifacts written before ``norm`` existed were trained with the reference's BatchNorm.
        return cls(**{"norm": "batch", **data})
