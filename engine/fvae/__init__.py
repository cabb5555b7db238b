"""The Fusion-VAE over flat normalised LoRA vectors (docs/design.md §2.4)."""

from engine.fvae.config import FVAEConfig
from engine.fvae.model import FVAE, kl_divergence
from engine.fvae.normalize import SlotNormalizer

__all__ = ["FVAE", "FVAEConfig", "SlotNormalizer", "kl_divergence"]
