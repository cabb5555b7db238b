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

# Meta-training per suite: the F-VAE is the engine's default (``arch: auto``, which at the lab's
# sizes, N 2.5 k-20 k, is the dense ``mlp`` with hidden 256 and the reference's sum reconstruction:
# the conv stack does not reconstruct per-slot normalised LoRA factors at all, relative error ~1.0
# in `benchmarks.fvae_recon`). Only the episodes are set per suite: lr 2e-4 (the reference's; 1e-3
# diverges with dense layers over ~20k inputs); K_max 6 covers the largest fused set; encoder
# episodes score 8 shots per task to keep MiniLM's backward pass affordable. Episodes score the
# tasks' train split: the support split is what refinement and the few-shot baselines get at fusion
# time, so meta-training must not have fitted it. Generative runs 4000 steps: its training fusion
# loss was still falling at 1500 (1.88; 1.30 at 4000); at a constant rate (a cosine schedule ended
# at 1.40). The encoder runs 1600 steps with the cosine schedule (at 800 constant steps its F-VAE
# reconstructed nothing, relative error ~1, and the run ended in a loss spike: recon 24). Every
# F-VAE and episode setting is written out, so the cache key changes with them.
_FVAE: dict[str, Any] = {}
# The classifier suites (per-task heads from the adapters): the same recipe, their own lengths.
_CLASSIFIER_TRAIN = {
    "max_tasks": 6,
    "lr": 2e-4,
    "lr_schedule": "cosine",
    "fusion_loss": "data",
    "fusion_examples": "train",
    "heads": "adapter",
    "shots_per_task": 8,
    "anchor": True,
}
SUITE_TRAINING: dict[str, dict[str, Any]] = {
    "generative": {
        "fvae": dict(_FVAE),
        "train": {
            "steps": 4000,
            "max_tasks": 6,
            "lr": 2e-4,
            "lr_schedule": "constant",
            "fusion_loss": "data",
            "fusion_examples": "train",
            "anchor": True,
        },
    },
    # benchmarks.lab.features: N = 2,560 (rank 4 on two MLP layers), 6 adapters per task
    "features": {"fvae": dict(_FVAE), "train": {**_CLASSIFIER_TRAIN, "steps": 800}},
    "encoder": {"fvae": dict(_FVAE), "train": {**_CLASSIFIER_TRAIN, "steps": 1600}},
}


TASK_VECTOR_K = 16  # in-context examples per task vector (support split, under the task's own adapter)


def context_task_vectors(suite: dict[str, Any], tasks: list[str], seed: int, log=print) -> dict[str, Any]:
    """The paper's in-context task vectors of ``tasks``: each the mean last-layer hidden state over
    ``TASK_VECTOR_K`` support examples under the task's own adapter, computed by the engine's Ray
    Data actor pool and stored in the suite's main catalog (meta-training with ``task_vectors.source:
    context`` reads the training tasks' ones from there). Deterministic in ``seed``.

    Returns ``{task: [d] tensor}``: what fusion reads as the context's ``task_vectors``, so a task
    kept out of meta-training is conditioned on a vector from k of its examples, never on data the
    F-VAE saw.
    """
    from engine._ray import ensure_ray
    from engine.task_vectors import compute_task_vectors, save_task_vectors

    uri = suite["catalogs"]["main"]["uri"]
    register_tasks(suite, "main")
    ensure_ray()
    log(f"task vectors: {len(tasks)} tasks, k={TASK_VECTOR_K} support examples each (Ray Data)")
    vectors = compute_task_vectors(uri, tasks, k=TASK_VECTOR_K, seed=seed)
    save_task_vectors(uri, vectors)
    return {task: vector.vector for task, vector in vectors.items()}


def unseen_tasks(suite: str, tasks: list[str], seed: int, count: int = 2) -> list[str]:
    """The tasks kept out of meta-training: a seeded choice, fixed before any result is seen; at
    most half of the tasks, so meta-training keeps some (a tiny lab has two per suite)."""
    count = min(count, len(tasks) // 2)
    return sorted(random.Random(f"unseen-{suite}-{seed}").sample(sorted(tasks), count))


def training_config(
    suite: dict[str, Any],
    name: str,
    variant: str,
    exclude: list[str],
    seed: int,
    overrides: dict | None = None,
    exclude_adapters: list[str] = (),
) -> dict[str, Any]:
    base = json.loads(json.dumps(SUITE_TRAINING[name]))
    if exclude_adapters:  # only when set: the cache keys of every other F-VAE stay as they were
        base["exclude_adapters"] = sorted(exclude_adapters)
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
    exclude_adapters: list[str] = (),
) -> tuple[Path, dict[str, Any]]:
    """The artifact directory of an F-VAE meta-trained on ``suite``'s ``variant`` catalog (trained
    now unless a finished one with the same configuration is cached), without the tasks in
    ``exclude`` and the adapters in ``exclude_adapters``. Returns it and the config."""
    from engine._ray import ensure_ray
    from engine.meta.config import load_config
    from engine.meta.prototypes import record_task_latents
    from engine.meta.train import train_fvae

    register_tasks(suite, variant)
    config = training_config(suite, name, variant, list(exclude or []), seed, overrides, exclude_adapters)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    # Pinned after hashing (cached F-VAEs keep their keys): the engine's default `auto` would
    # switch to stored in-context vectors as soon as `--task-vectors context` has stored some.
    config.setdefault("task_vectors", {"source": "adapter_projection"})
    out = CACHE / f"{name}-{variant}-{key}"
    if (out / "fvae" / "artifact.json").is_file():
        log(f"{name}: cached F-VAE {out}")
        # F-VAEs cached before meta-training recorded task prototypes get them from their catalog.
        record_task_latents(str(out / "fvae"))
        return out / "fvae", config
    ensure_ray()
    log(f"{name}: meta-training an F-VAE on {variant} ({config['train']['steps']} steps, unseen {exclude})")
    steps = config["train"]["steps"]
    logging = {"checkpoint_every": steps, "report_every": min(100, steps)}  # not part of the cache key
    train_fvae(load_config({**config, "out": str(out), "train": {**config["train"], **logging}}))
    return out / "fvae", config
