"""What ``icm``'s familiarity gate reads from an F-VAE artifact (docs/design.md §2.7): its measured
training error, and whether its reconstructions say anything about an adapter at all.

The per-input half (:mod:`engine.fusion.icm.inputs`, which chooses a task's prototype code for an
input the F-VAE cannot reconstruct) and the gate (:mod:`engine.fusion.icm.method`) read the same
figures from here.
"""

from __future__ import annotations

# Median explained fraction of its training adapters below which an F-VAE's reconstructions say
# nothing about any adapter (the measurement behind it: benchmarks/README.md, fusion_quality).
EXPLAINS_NOTHING = 0.01


def reads_condition(artifact) -> bool:
    """Whether the gate reads familiarity from an input's condition instead of its reconstruction
    error: the F-VAE's reconstructions explain nothing of its own training adapters (median
    explained fraction below :data:`EXPLAINS_NOTHING`), so its errors are the same for every
    adapter. Artifacts without the figure read reconstruction errors."""
    recorded = artifact.meta.familiarity
    return recorded is not None and recorded.explained is not None and recorded.explained < EXPLAINS_NOTHING


def training_error(artifact) -> float | None:
    """The reconstruction error an input may have and still count as familiar: the 90th percentile
    of the final F-VAE's errors on its training adapters (``familiarity.reference``, measured by
    ``icmf train``), or, for artifacts older than that measurement, the last reported training
    ``recon`` (a train-mode window average, which a late loss spike inflates)."""
    if artifact.meta.familiarity is not None:
        return artifact.meta.familiarity.reference
    return artifact.meta.metrics.recon
