"""Sizes of the lab: how many tasks, examples, runs, steps and adapters each suite gets.

``standard`` is the benchmark lab (~20 CPU-minutes: about 10 minutes with 2 workers on two free
cores); ``tiny`` builds in seconds for tests. Everything else about a build is derived from the size and the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

LAB_FORMAT = "icmf-lab/1"


@dataclass(frozen=True)
class AdapterPlan:
    """How the adapters of one suite are trained.

    Main variant: ``runs`` runs per task; run ``i`` uses seed ``i``, rank ``ranks[i % len]``, and
    (for ``i >= 1``) a random ``subset_fraction`` of the training split; each run saves the
    adapter at every step in ``checkpoints``. Few-shot variants: ``fewshot_seeds`` adapters per
    task and k, trained on k training examples for ``fewshot_steps`` steps (final step saved).
    Long-tail variant: a subset of the main adapters, from ``longtail[0]`` adapters for the most
    represented task down to ``longtail[1]`` for the least (geometric).
    """

    runs: int
    steps: int
    checkpoints: tuple[int, ...]
    ranks: tuple[int, ...] = (8, 4)
    subset_fraction: float = 0.75
    lr: float = 3e-3
    warmup_fraction: float = 0.1  # linear warm-up, then constant (checkpoints are snapshots)
    batch_size: int = 32
    fewshot_k: tuple[int, ...] = (8, 32)
    fewshot_seeds: int = 2
    fewshot_steps: int = 60
    longtail: tuple[int, int] = (12, 1)

    def __post_init__(self):
        if not self.checkpoints or max(self.checkpoints) != self.steps:
            raise ValueError(f"checkpoints {self.checkpoints} must end at steps={self.steps}")
        if self.longtail[0] > self.runs * len(self.checkpoints):
            raise ValueError(
                f"longtail max {self.longtail[0]} exceeds the {self.runs * len(self.checkpoints)} main "
                "adapters of a task (runs x checkpoints)"
            )

    @property
    def r_max(self) -> int:
        return max(self.ranks)


@dataclass(frozen=True)
class EncoderSize:
    tasks: tuple[str, ...]
    splits: dict[str, int]  # wanted examples per split; train shrinks if a pool is small
    adapters: AdapterPlan
    max_length: int = 32
    lora_layers: int = 2  # LoRA on the top layers only (the states entering them are cached)
    target_modules: tuple[str, ...] = ("query", "value")
    keep_min_gain: float | None = 0.03  # LoRA accuracy - base-head accuracy; None keeps every task


@dataclass(frozen=True)
class GenerativeSize:
    tasks: tuple[str, ...]
    splits: dict[str, int]  # examples per task and split (support/eval words are shared by tasks)
    adapters: AdapterPlan
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    pretrain_steps: int = 600
    pretrain_seq_len: int = 64
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    keep_min_loss_drop: float | None = 0.25  # relative answer-loss reduction vs the base


@dataclass(frozen=True)
class LabSize:
    name: str
    encoder: EncoderSize
    generative: GenerativeSize
    workers: int = 2  # processes (one torch thread each); 0 runs every job in this process

    def fingerprint(self, suite: str) -> str:
        """What a built suite depends on: its own configuration (not the other suite's, nor workers)."""
        return hashlib.sha256(repr(asdict(getattr(self, suite))).encode()).hexdigest()[:16]


# Tasks where a LoRA gains >= 10 accuracy points over the frozen base's linear head, so fusions
# can be told apart: phrase tasks (order, negation, comparison) a pooled sentence embedding cannot
# read, and word-level morphology / frequency. Longest jobs first, so the worker pool ends evenly.
ENCODER_TASKS = (
    "vader-contrast",
    "frequency-comparison",
    "vader-negation",
    "pair-pos",
    "word-language",
    "word-verb-form",
    "word-pos",
    "noun-number",
    "word-length",
    "word-frequency",
)
# BERT's linears in every layer: attention query/key/value/output and the MLP (intermediate and
# output dense); "output.dense" names both output projections.
ATTENTION_AND_MLP = ("query", "key", "value", "output.dense", "intermediate.dense")
GENERATIVE_TASKS = ("copy", "reverse", "sort", "shift", "dedupe", "upper", "devowel", "length")

SIZES: dict[str, LabSize] = {
    "standard": LabSize(
        name="standard",
        encoder=EncoderSize(
            tasks=ENCODER_TASKS,
            splits={"train": 1024, "support": 64, "eval": 1024},
            adapters=AdapterPlan(
                runs=3, steps=200, checkpoints=(50, 100, 150, 200), lr=1e-3, longtail=(12, 1)
            ),
            lora_layers=6,
            target_modules=ATTENTION_AND_MLP,
            keep_min_gain=0.10,
        ),
        generative=GenerativeSize(
            tasks=GENERATIVE_TASKS,
            splits={"train": 1024, "support": 64, "eval": 200},
            adapters=AdapterPlan(
                runs=3, steps=240, checkpoints=(60, 120, 180, 240), fewshot_steps=80, longtail=(12, 1)
            ),
        ),
    ),
    "tiny": LabSize(
        name="tiny",
        encoder=EncoderSize(
            tasks=("vader-sign", "word-pos"),
            splits={"train": 48, "support": 16, "eval": 32},
            adapters=AdapterPlan(
                runs=2,
                steps=4,
                checkpoints=(2, 4),
                fewshot_k=(8,),
                fewshot_seeds=1,
                fewshot_steps=2,
                longtail=(4, 1),
            ),
            max_length=16,
            lora_layers=1,
            target_modules=ATTENTION_AND_MLP,
            keep_min_gain=None,
        ),
        generative=GenerativeSize(
            tasks=("copy", "reverse"),
            splits={"train": 48, "support": 16, "eval": 16},
            adapters=AdapterPlan(
                runs=2,
                steps=4,
                checkpoints=(2, 4),
                fewshot_k=(8,),
                fewshot_seeds=1,
                fewshot_steps=2,
                longtail=(4, 1),
            ),
            hidden=32,
            layers=2,
            heads=2,
            pretrain_steps=10,
            pretrain_seq_len=32,
            pretrain_batch=8,
            keep_min_loss_drop=None,
        ),
        workers=0,
    ),
}


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for one component of the build (independent of scheduling order)."""
    key = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF
