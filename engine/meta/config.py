"""User-facing meta-training config (YAML, validated by pydantic; every fault listed at once)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pydantic
import yaml

from engine.errors import FaultsError, pydantic_faults
from engine.fvae.config import FVAEConfig
from engine.paths import absolute_location, folder_of

# FVAEConfig's defaults: the one place they are set
_FVAE = {f.name: f.default for f in dataclasses.fields(FVAEConfig) if f.default is not dataclasses.MISSING}


class MetaConfigError(FaultsError):
    """A training config with faults; the message lists all of them."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class FVAESection(_Strict):
    """The F-VAE's settings: defaults (and meanings) are :class:`engine.fvae.config.FVAEConfig`'s."""

    arch: Literal["auto", "conv", "chunked", "mlp", "tokens"] = pydantic.Field(
        _FVAE["arch"],
        description="'auto': 'mlp' while its 2 x N x hidden weights fit the dense limit, else 'tokens'; "
        "'tokens': the module-token F-VAE (one token per rank component of every module; "
        "parameters independent of depth and N; per-module-type scale normaliser)",
    )
    latent_dim: int = pydantic.Field(_FVAE["latent_dim"], gt=0)
    depth: int = pydantic.Field(_FVAE["depth"], gt=0, le=20)
    channels: int = pydantic.Field(_FVAE["channels"], gt=0)
    max_channels: int = pydantic.Field(_FVAE["max_channels"], gt=0)
    chunk_size: int = pydantic.Field(_FVAE["chunk_size"], gt=0)
    hidden: int = pydantic.Field(_FVAE["hidden"], gt=0)
    token_queries: int = pydantic.Field(
        _FVAE["token_queries"], gt=0, description="tokens only: attention-pooling queries"
    )
    kl_weight: float = pydantic.Field(_FVAE["kl_weight"], ge=0)
    norm: Literal["none", "instance", "batch", "group"] = _FVAE["norm"]
    recon_reduction: Literal["mean", "sum"] = pydantic.Field(
        _FVAE["recon_reduction"],
        description="'sum': the reference's balance, squared error summed over a sample's elements "
        "+ kl_weight x KL (divided through by the elements, so per element KL weighs kl_weight / N); "
        "'mean': per-element mean + kl_weight x KL, which on the lab suites collapses the posterior",
    )
    recon_space: Literal["auto", "factors", "delta"] = pydantic.Field(
        _FVAE["recon_space"],
        description="'auto': 'delta' for arch tokens, else 'factors'; 'delta' (tokens only) reads and "
        "reconstructs each module's update B A (the same whatever gauge the factors are written in); "
        "'factors': the canonical factors slot by slot",
    )


class TaskVectorSection(_Strict):
    """``source``: ``context`` — each task's in-context vector stored in the catalog (``icmf taskvec``:
    mean last-layer hidden state over k examples); ``adapter_projection`` — a seeded projection
    of the task's mean normalised adapter to ``dim`` (no examples needed); ``auto`` — context when
    every training task has a stored vector."""

    source: Literal["auto", "context", "adapter_projection"] = "auto"
    dim: int = pydantic.Field(64, gt=0, description="adapter_projection only: vector size")


class TrainSection(_Strict):
    steps: int = pydantic.Field(500, gt=0)
    lr: float = pydantic.Field(2e-4, gt=0)
    weight_decay: float = pydantic.Field(0.01, ge=0)
    lr_schedule: Literal["constant", "cosine"] = pydantic.Field(
        "constant",
        description="'constant': lr throughout (the reference's); 'cosine': linear warm-up, then a half "
        "cosine from lr down to min_lr_ratio x lr at the last step (engine.meta.schedule); constant is the "
        "default because it fitted the lab better (benchmarks/README.md)",
    )
    warmup_steps: int | None = pydantic.Field(
        None, ge=0, description="cosine only; default 5% of the steps, at most 100"
    )
    min_lr_ratio: float = pydantic.Field(0.1, ge=0, le=1, description="cosine only: final lr / lr")
    skip_spikes: float | None = pydantic.Field(
        10.0,
        gt=1,
        description="skip the update of an episode whose loss (averaged over the workers) exceeds this "
        "many times the median of the last 100 applied ones (after 20); non-finite losses are always "
        "skipped; null: apply every update",
    )
    max_tasks: int = pydantic.Field(4, gt=0, description="K_max: largest task subset of an episode")
    capacity_per_task: int = pydantic.Field(64, gt=0, description="adapters kept per task per worker")
    fusion_weight: float = pydantic.Field(1.0, ge=0)
    combine: Literal["weighted", "mean", "sum", "slerp"] = "weighted"
    project: bool = True
    anchor: bool = pydantic.Field(
        True,
        description="score the episode's fused adapter anchored on its inputs (D(z_f) + sum_t w_t "
        "(dW_t - D(mu_t)), as icm fuses); false: the decoder's absolute output, which the fusion loss "
        "can satisfy by memorising one adapter for the support examples whatever the inputs",
    )
    checkpoint_every: int = pydantic.Field(100, gt=0)
    report_every: int = pydantic.Field(10, gt=0)
    seed: int = 0
    workers: int = pydantic.Field(1, gt=0)
    use_gpu: bool = False
    data_split: Literal["disjoint", "full"] = pydantic.Field(
        "disjoint",
        description="'disjoint': each worker streams its own share of every task's adapters, so a "
        "worker's streaming work and traffic shrink as workers are added (a task with fewer adapters "
        "than workers goes to every worker, so every worker still covers every task); 'full': every "
        "worker streams all adapters (W x the catalog's bytes; pools are independent samples of it)",
    )
    cpus_per_worker: float | None = pydantic.Field(
        None, gt=0, description="default: leave one CPU for Ray Data, split the rest between workers"
    )
    max_failures: int = pydantic.Field(3, ge=0)
    fusion_loss: Literal["auto", "data", "proxy"] = pydantic.Field(
        "auto",
        description="'data': few-shot query loss of the fused adapter through the frozen base (needs "
        "task definitions in the catalog); 'proxy': data-free subspace proxy; 'auto': data when every "
        "training task has a definition",
    )
    fusion_examples: Literal["train", "support"] = pydantic.Field(
        "train",
        description="the tasks' split the data fusion loss scores: 'train' keeps the support split "
        "unseen until fusion, where refinement, fitted weights and few-shot baselines use it (a decoder "
        "meta-trained on the support shots has already fitted them, so they cannot pick or check "
        "anything); 'support': the few shots themselves",
    )
    heads: Literal["adapter", "task"] = pydantic.Field(
        "adapter",
        description="tasks whose adapters carry heads (modules_to_save): 'adapter' scores the fused "
        "adapter with the head of the adapter the episode fused (trained with that LoRA); 'task': "
        "with one head per task, its first catalog adapter's",
    )
    shots_per_task: int = pydantic.Field(16, gt=0, description="examples scored per task per episode")
    support_k: int | None = pydantic.Field(
        None, gt=0, description="use only the first k examples of the fusion_examples split"
    )
    inner_steps: int = pydantic.Field(0, ge=0, description="first-order inner adaptation steps (data loss)")
    inner_lr: float = pydantic.Field(0.01, gt=0, description="step size of the inner adaptation")


class MetaTrainConfig(_Strict):
    """The whole ``icmf train CONFIG.yaml`` file."""

    catalog: str
    out: str
    layout_id: str | None = None
    tasks: list[str] | None = pydantic.Field(None, description="train on these tasks only (default: all)")
    exclude_tasks: list[str] = pydantic.Field(
        default_factory=list, description="tasks kept out of meta-training (e.g. to measure unseen tasks)"
    )
    exclude_adapters: list[str] = pydantic.Field(
        default_factory=list,
        description="catalog ids of adapters kept out of meta-training (episodes, task vectors and "
        "familiarity), e.g. to measure fusion of new checkpoints of known tasks",
    )
    fvae: FVAESection = FVAESection()
    task_vectors: TaskVectorSection = TaskVectorSection()
    train: TrainSection = TrainSection()

    @pydantic.model_validator(mode="after")
    def _cross_checks(self) -> MetaTrainConfig:
        faults = []
        if self.train.checkpoint_every > self.train.steps:
            faults.append("train.checkpoint_every must be <= train.steps")
        if self.train.warmup_steps is not None and self.train.warmup_steps >= self.train.steps:
            faults.append("train.warmup_steps must be < train.steps")
        overlap = sorted(set(self.tasks or []) & set(self.exclude_tasks))
        if overlap:
            faults.append(f"tasks and exclude_tasks both name {overlap}; keep each task in one list")
        if faults:
            raise ValueError("; ".join(faults))
        return self

    def task_filter(self, available: list[str]) -> list[str]:
        """The training tasks among ``available`` (``tasks`` minus ``exclude_tasks``)."""
        chosen = [t for t in available if (self.tasks is None or t in self.tasks)]
        return [t for t in chosen if t not in self.exclude_tasks]


def load_config(source: str | Path | dict) -> MetaTrainConfig:
    """Parse and validate a config file (or dict); raise :class:`MetaConfigError` listing every fault.

    Relative ``catalog`` and ``out`` paths are relative to the YAML file's folder (to the current
    directory for a dict) and come back absolute.
    """
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise MetaConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MetaConfigError(f"{path}: invalid YAML ({exc})") from None
        where = str(path)
    if not isinstance(data, dict):
        raise MetaConfigError(f"{where}: must be a mapping of sections")
    # Resolved once, here on the driver: Ray Train workers run in another working directory.
    base = None if isinstance(source, dict) else folder_of(source)
    data = {
        **data,
        **{k: absolute_location(data[k], base) for k in ("catalog", "out") if isinstance(data.get(k), str)},
    }
    try:
        return MetaTrainConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise MetaConfigError(where, pydantic_faults(exc.errors())) from None
