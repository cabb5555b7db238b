"""F-VAE configuration (internal dataclass tier; the YAML tier validates into it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

ARCHS = ("conv", "chunked", "mlp", "tokens")
TOKEN_FIELDS = ("layout", "token_queries", "recon_space")  # read by arch "tokens" only
# ``auto`` picks the dense ``mlp`` while it has at most this many parameters (about 1 GiB of
# parameters, gradients and AdamW moments): where it can be built it reconstructs and fuses best;
# beyond it, the module-token F-VAE, whose size does not grow with N (docs/design.md §2.4).
DENSE_PARAMETER_LIMIT = 64_000_000


def dense_parameters(input_dim: int, hidden: int) -> int:
    """Weights of the ``mlp`` arch's two ``N x hidden`` layers (its other layers are negligible)."""
    return 2 * input_dim * hidden


def resolve_arch(arch: str, input_dim: int, hidden: int) -> str:
    """The architecture ``arch`` stands for: itself, or for ``"auto"`` the dense ``mlp`` up to
    :data:`DENSE_PARAMETER_LIMIT` parameters and ``tokens`` above."""
    if arch != "auto":
        return arch
    return "mlp" if dense_parameters(input_dim, hidden) <= DENSE_PARAMETER_LIMIT else "tokens"


@dataclass(frozen=True)
class FVAEConfig:
    """Shape and loss settings of a Fusion-VAE.

    Attributes:
        input_dim: flat adapter length ``N`` (the catalog layout's size).
        cond_dim: task-vector length ``d``.
        arch: ``"auto"`` (default) — resolved when the config is built (:func:`resolve_arch`):
            ``mlp`` while its ``2 x N x hidden`` weights stay within :data:`DENSE_PARAMETER_LIMIT`,
            else ``tokens``; the config then holds the resolved name. ``"conv"`` — the reference
            1-D conv stack (ICM-LoRA); ``"chunked"`` — fixed-size chunks with slot embeddings and a
            shared encoder, for adapters far larger than a few million parameters.
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
            statistics); benchmarks/README.md has the measurement.
            ``group``: GroupNorm with 8 channels per group; ``none``: no normalisation.
        recon_reduction: how reconstruction and KL are balanced. ``sum`` (default): the reference's
            — squared error summed over a sample's elements + ``kl_weight`` x KL — divided through
            by the elements per sample so the loss keeps the per-element scale the fusion loss is
            weighed against (so per element the KL weighs ``kl_weight / N``). ``mean``: per-element
            mean + ``kl_weight`` x KL, i.e. a KL ~N times heavier: on the lab suites (N ~ 20k) the
            posterior collapses (KL ~ 4 nats) and nothing is reconstructed.
        layout: ``tokens`` (and ``auto``, which may resolve to it) only: the layout
            (:meth:`engine.adapters.layout.Layout.to_dict`) whose modules are the tokens (its size
            must be ``input_dim``).
        token_queries: ``tokens`` only: learned queries of the encoder's attention pooling.
        recon_space: what the F-VAE reads and reconstructs. ``auto`` (default) — resolved when the
            config is built: ``delta`` for ``tokens``, ``factors`` for every other arch.
            ``factors``: the flat canonical LoRA factors (squared error per slot). ``delta``
            (``tokens`` only): the update ``dW = B A`` each module applies, which does not depend on
            how the factors are written (any ``A -> G A``, ``B -> B G^-1``): the encoder reads each
            module's action on fixed probe directions, and the reconstruction term is each
            module's relative error ``||dW_hat - dW||^2 / ||dW||^2``, computed from the factors
            through ``r x r`` Gram matrices (:mod:`engine.fvae.tokens`). Adapters of one task
            trained apart share much of their updates and little of their factors, so only
            ``delta`` reconstructs new checkpoints of known tasks.
        arch ``tokens``: the module-token F-VAE (:mod:`engine.fvae.tokens`): one token per rank
            component of every module, layer and module type as embeddings, per-module-type input
            projections and output heads; parameters independent of the number of layers and N.
        arch ``mlp``: dense encoder/decoder, one weight per slot (``2 x N x hidden`` parameters):
            per-slot normalised LoRA factors have no local structure for the conv kernels to share,
            and the conv stack cannot reconstruct them (relative error ~1.0 on the lab suites).
    """

    input_dim: int
    cond_dim: int
    arch: Literal["auto", "conv", "chunked", "mlp", "tokens"] = "auto"
    latent_dim: int = 256
    depth: int = 12
    channels: int = 8
    max_channels: int = 64
    chunk_size: int = 1024
    hidden: int = 256
    kl_weight: float = 0.005
    norm: Literal["none", "instance", "batch", "group"] = "instance"
    recon_reduction: Literal["mean", "sum"] = "sum"
    layout: dict[str, Any] | None = None
    token_queries: int = 8
    recon_space: Literal["auto", "factors", "delta"] = "auto"

    def __post_init__(self) -> None:
        # Frozen, so set through object: every consumer (and the artifact) sees the resolved arch.
        object.__setattr__(self, "arch", resolve_arch(self.arch, self.input_dim, self.hidden))
        if self.arch != "tokens":  # only tokens reads it; equal configs compare equal either way
            object.__setattr__(self, "layout", None)
        if self.recon_space == "auto":
            object.__setattr__(self, "recon_space", "delta" if self.arch == "tokens" else "factors")
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
            "token_queries",
        ):
            if getattr(self, name) <= 0:
                faults.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch not in ARCHS:
            choices = ", ".join(map(repr, ("auto", *ARCHS)))
            faults.append(f"arch must be one of {choices}, got {self.arch!r}")
        if self.arch == "tokens":
            faults += self._layout_faults()
        if self.norm not in ("none", "instance", "batch", "group"):
            faults.append(f"norm must be 'none', 'instance', 'batch' or 'group', got {self.norm!r}")
        if self.recon_reduction not in ("mean", "sum"):
            faults.append(f"recon_reduction must be 'mean' or 'sum', got {self.recon_reduction!r}")
        if self.recon_space not in ("factors", "delta"):
            faults.append(f"recon_space must be 'factors' or 'delta', got {self.recon_space!r}")
        elif self.recon_space == "delta" and self.arch != "tokens":
            faults.append(f"recon_space 'delta' needs arch 'tokens' (the arch is {self.arch!r})")
        if self.kl_weight < 0:
            faults.append(f"kl_weight must be >= 0, got {self.kl_weight}")
        if faults:
            raise ValueError("invalid FVAEConfig: " + "; ".join(faults))

    def _layout_faults(self) -> list[str]:
        from engine.adapters.layout import Layout

        if self.layout is None:
            return [
                f"arch 'tokens' (which 'auto' picks above {DENSE_PARAMETER_LIMIT:,} dense parameters) "
                "needs the layout (FVAEConfig.layout = Layout.to_dict())"
            ]
        try:
            size = Layout.from_dict(self.layout).size
        except (ValueError, KeyError, TypeError) as exc:
            return [f"layout is not a valid layout dict ({exc})"]
        if size != self.input_dim:
            return [f"layout has {size} slots but input_dim is {self.input_dim}"]
        return []

    @property
    def padded_dim(self) -> int:
        """Input length after padding (conv: multiple of ``2**depth``; chunked: of ``chunk_size``; mlp: none)."""
        if self.arch in ("mlp", "tokens"):
            return self.input_dim
        unit = 2**self.depth if self.arch == "conv" else self.chunk_size
        return -(-self.input_dim // unit) * unit

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.arch != "tokens":
            # Other archs' dicts (and so their artifacts' fingerprints) stay as they were.
            for name in TOKEN_FIELDS:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FVAEConfig:
        # Artifacts written before ``norm`` existed were trained with the reference's BatchNorm.
        # ... and before ``recon_reduction`` existed, with the per-element mean; before ``arch``
        # existed, with the conv stack (an artifact always records the arch it was built with);
        # before ``recon_space`` existed, a module-token F-VAE read and reconstructed factors.
        defaults = {"arch": "conv", "norm": "batch", "recon_reduction": "mean"}
        if data.get("arch") == "tokens":
            defaults["recon_space"] = "factors"
        return cls(**{**defaults, **data})
