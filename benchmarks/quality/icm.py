"""The F-VAEs behind the ``icm`` rows: meta-trained on a lab catalog with the engine's own Ray Train
pipeline (``engine.meta.train.train_fvae``), cached by configuration.

A few tasks per suite are kept out of meta-training (seeded choice) so the benchmark can report
fusion of **unseen** tasks separately: ``icm`` then encodes their adapters with adapter-derived
task vectors, exactly as a user fusing a task the F-VAE never saw.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS
from benchmarks.lab.tasks import register_tasks

CACHE = RESULTS / "tmp" / "fvae"

# Meta-training per suite: the engine's defaults except what the lab's sizes call for (depth 8
# pads the ~20k-value adapters to a multiple of 256 rather than 4096; K_max 6 covers the largest
# fused set; encoder episodes score 8 shots per task to keep MiniLM's backward pass affordable).
SUITE_TRAINING: dict[str, dict[str, Any]] = {
    "generative": {
        "fvae": {"depth": 8, "norm": "instance"},
        "train": {"steps": 1500, "max_tasks": 6, "lr": 1e-3, "fusion_loss": "data"},
    },
    "encoder": {
        "fvae": {"depth": 8, "norm": "instance"},
        "train": {"steps": 800, "max_tasks": 6, "lr": 1e-3, "fusion_loss": "data", "shots_per_task": 8},
    },
}


def unseen_tasks(suite: str, tasks: list[str], seed: int, count: int = 2) -> list[str]:
    """The tasks kept out of meta-training: a seeded choice, fixed before any result is seen."""
    return sorted(random.Random(f"unseen-{suite}-{seed}").sample(sorted(tasks), count))


def training_config(
    suite: dict[str, Any],
    name: str,
    variant: str,
    exclude: list[str],
    seed: int,
    overrides: dict | None = None,
) -> dict[str, Any]:
    base = json.loads(json.dumps(SUITE_TRAINING[name]))
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    base.setdefault("train", {}).update(seed=seed, workers=1)
    return {"catalog": suite["catalogs"][variant]["uri"], "exclude_tasks": exclude, **base}


def trained_fvae(
    suite: dict[str, Any],
    name: str,
    variant: str = "main",
    exclude: list[str] | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    log=print,
) -> tuple[Path, dict[str, Any]]:
    """The artifact directory of an F-VAE meta-trained on ``suite``'s ``variant`` catalog (trained
    now unless a finished one with the same configuration is cached). Returns it and the config."""
    from engine._ray import ensure_ray
    from engine.meta.config import load_config
    from engine.meta.train import train_fvae

    register_tasks(suite, variant)
    config = training_config(suite, name, variant, list(exclude or []), seed, overrides)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    out = CACHE / f"{name}-{variant}-{key}"
    if (out / "fvae" / "artifact.json").is_file():
        log(f"{name}: cached F-VAE {out}")
        return out / "fvae", config
    ensure_ray()
    log(f"{name}: meta-training an F-VAE on {variant} ({config['train']['steps']} steps, unseen {exclude})")
    steps = config["train"]["steps"]
    logging = {"checkpoint_every": steps, "report_every": min(100, steps)}  # not part of the cache key
    train_fvae(load_config({**config, "out": str(out), "train": {**config["train"], **logging}}))
    return out / "fvae", config
