"""Meta-training the F-VAE with Ray Train (docs/design.md §2.5).

Each worker streams its own share of the catalog (``train.data_split``: a disjoint, task-balanced
split of every task's adapters by default) into a bounded, task-balanced pool, then runs
episodes; gradients are averaged across workers each step. Checkpoints (model, optimiser, step)
go to ``<out>/runs/<run name>`` every ``checkpoint_every`` steps; a killed worker restarts the
group from the last checkpoint (``FailureConfig``); ``resume`` continues the latest run.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from engine.adapters.layout import Layout
from engine.catalog import fs as cfs
from engine.fusion.icm.projection import project
from engine.fvae.artifact import ArtifactMeta, FVAEArtifact
from engine.fvae.config import FVAEConfig
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer
from engine.fvae.recon import reconstruction_errors
from engine.meta.config import MetaConfigError, MetaTrainConfig
from engine.meta.episodes import TaskPool
from engine.meta.failures import fail_fast, fit_with_retries
from engine.meta.preflight import TrainingPlan, check_memory, plan_training
from engine.meta.schedule import SpikeGuard, learning_rate
from engine.meta.step import DataLoss, EpisodeBatch, EpisodeSettings, episode_loss, slot_mask

RUN_FILE = "current_run.json"
# Columns a Train worker streams (``id`` is a few bytes next to the [N] weights).
TRAIN_COLUMNS = ("id", "task", "weights", "mask")
HEAD_CACHE_SIZE = 1024  # adapters' heads a worker keeps loaded (a classifier head is a few KB)
FAMILIARITY_PER_TASK = 16  # pooled adapters per task whose reconstruction the artifact records
FAMILIARITY_QUANTILE = 0.9  # of those errors: the icm familiarity gate's reference
LOSS_TERMS = ("loss", "recon", "kl", "fusion")  # what episode_loss returns


def fvae_config(cfg: MetaTrainConfig, layout: Layout, cond_dim: int | None = None) -> FVAEConfig:
    # The module-token arch reads the layout's modules; the others only its size. ``auto`` may
    # resolve to it, and FVAEConfig drops the layout again when it does not.
    structure = {"layout": layout.to_dict()} if cfg.fvae.arch in ("tokens", "auto") else {}
    return FVAEConfig(
        input_dim=layout.size, cond_dim=cond_dim or cfg.task_vectors.dim, **cfg.fvae.model_dump(), **structure
    )


# ----------------------------------------------------------------------------- worker side
def fill_pool(
    shard, capacity: int, seed: int, tasks: set[str] | None = None
) -> tuple[TaskPool, dict[int, tuple[torch.Tensor, torch.Tensor, str]]]:
    """Stream a dataset shard (with an ``id`` column) into a per-task reservoir (bounded memory
    whatever the catalog size); adapters of tasks outside ``tasks`` (when given) are skipped. The
    store holds each kept adapter's ``(weights [N], mask [M], catalog id)``."""
    pool = TaskPool(capacity, seed=seed)
    store: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
        rows = zip(batch["id"], batch["task"], batch["weights"], batch["mask"], strict=True)
        for adapter_id, task, weights, mask in rows:
            if tasks is not None and str(task) not in tasks:
                continue
            slot = pool.add(str(task))
            if slot is not None:
                store[slot] = (
                    torch.from_numpy(np.array(weights, dtype=np.float32)),
                    torch.from_numpy(np.array(mask)),
                    str(adapter_id),
                )
    return pool, store


def pool_familiarity(
    model: FVAE,
    normalizer: SlotNormalizer,
    pool: TaskPool,
    store: dict[int, tuple[torch.Tensor, torch.Tensor, str]],
    vectors: dict[str, torch.Tensor],
    layout: Layout,
    seed: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """How well the trained F-VAE reconstructs its training adapters: the relative error
    (:func:`engine.fvae.recon.reconstruction_errors`, posterior mean, eval mode) of up to
    ``FAMILIARITY_PER_TASK`` pooled adapters per task, conditioned as in training; and each task's
    prototype code, the mean posterior mean of the same adapters.

    Measured on the final model, not taken from the training loss: the last report window's loss
    is a train-mode average over the window (and under a loss spike says nothing about the saved
    model), and fusion compares its inputs' errors with exactly this measure.

    Returns:
        ``({"reference", "explained", "quantile", "mean", "median", "max", "adapters", "per_task":
        {task: mean}}, {task: [latent] prototype code})``; ``reference`` is the
        ``FAMILIARITY_QUANTILE`` quantile of all the errors, ``explained`` the median explained
        fraction (:func:`engine.fvae.recon.explained_fraction`).
    """
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    per_task: dict[str, list[float]] = {}
    explained: list[float] = []
    prototypes: dict[str, torch.Tensor] = {}
    for task in pool.tasks():
        slots = pool.slots[task]
        chosen = rng.choice(slots, size=min(FAMILIARITY_PER_TASK, len(slots)), replace=False)
        x = normalizer.normalize(torch.stack([store[int(i)][0] for i in chosen]).to(device))
        present = slot_mask(torch.stack([store[int(i)][1] for i in chosen]).to(device), layout)
        cond = vectors[task].to(device).expand(len(chosen), -1)
        measured = reconstruction_errors(model, x, cond, present)
        per_task[task] = measured.errors.tolist()
        explained += measured.explained.tolist()
        prototypes[task] = measured.mu.mean(dim=0).cpu()
    model.train(was_training)
    errors = np.array([e for values in per_task.values() for e in values])
    summary = {
        "reference": float(np.quantile(errors, FAMILIARITY_QUANTILE)),
        "explained": float(np.median(explained)),
        "quantile": FAMILIARITY_QUANTILE,
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "max": float(errors.max()),
        "adapters": int(errors.size),
        "per_task": {task: float(np.mean(values)) for task, values in per_task.items()},
    }
    return summary, prototypes


def projected_task_vectors(
    dataset, normalizer: SlotNormalizer, dim: int, seed: int, tasks: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Adapter-derived task vectors of every task (of ``tasks``, when given): one streaming pass of
    per-task sums on Ray Data workers (the driver only merges ``tasks x N`` partial sums), the
    normalised mean ``(sum / count - mean) / std``, then the seeded projection (drawn once for
    all tasks)."""
    from engine.catalog.streaming import streaming_task_sums

    sums = streaming_task_sums(dataset, tasks)
    if not sums:
        return {}
    names, means = list(sums), []
    for task in names:  # each task's sums freed as its float32 mean is made: no higher peak than the sums
        total, count = sums.pop(task)
        means.append(normalizer.normalize(torch.as_tensor(total / count, dtype=torch.float32)[None])[0])
    # rows of one [T, d] tensor: cloned, since safetensors refuses tensors that share storage
    return {task: v.clone() for task, v in zip(names, project(means, dim, seed), strict=True)}


def data_fusion_loss(cfg: MetaTrainConfig, layout: Layout, tasks: list[str], seed: int) -> DataLoss:
    """The few-shot fusion loss of an episode: the fused adapter's query loss on every task of the
    subset through the frozen base (first-order). With ``inner_steps``, the fused adapter first
    takes that many gradient steps on a disjoint support half (gradients of the inner steps are
    not differentiated again: first-order MAML).

    Tasks whose adapters carry heads (``modules_to_save``, e.g. a classifier trained with the LoRA)
    are scored with the head of the adapter the episode fused, given its catalog id: a LoRA and
    its head are trained together, so scoring the fused adapter with another checkpoint's head
    (one fixed head per task) teaches the decoder to fit that head instead."""
    from engine.catalog import Catalog
    from engine.tasks.fewshot import FewShotObjective

    catalog = Catalog(cfg.catalog)
    objective = FewShotObjective.from_catalog(
        catalog, tasks, layout, k=cfg.train.support_k, split=cfg.train.fusion_examples
    )
    support, query = objective.split(0.5, seed) if cfg.train.inner_steps else (None, objective)
    generator = torch.Generator().manual_seed(seed)
    shots = cfg.train.shots_per_task
    per_adapter = cfg.train.heads == "adapter"
    headed = {t for t, shot in objective.shots.items() if shot.head is not None and per_adapter}
    adapter_head = functools.lru_cache(maxsize=HEAD_CACHE_SIZE)(
        lambda i: dict(catalog.load_adapter(i).extras)
    )

    def loss(fused, episode_tasks: tuple[str, ...], ids: tuple[str, ...] | None = None) -> torch.Tensor:
        # ``fused``: a flat [N] vector or per-module factors (anchored fusion); adapted alike.
        pairs = zip(episode_tasks, ids or (), strict=False)
        heads = {t: adapter_head(i) or None for t, i in pairs if t in headed}
        flat = isinstance(fused, torch.Tensor)
        adapted = [fused] if flat else [t for pair in fused for t in pair]
        pack = (lambda ts: ts[0]) if flat else (lambda ts: list(zip(ts[::2], ts[1::2], strict=True)))
        for _ in range(cfg.train.inner_steps):
            leaves = [t.detach().requires_grad_(True) for t in adapted]
            inner = support.loss(pack(leaves), episode_tasks, shots, generator, heads)
            grads = torch.autograd.grad(inner, leaves)
            adapted = [t - cfg.train.inner_lr * g for t, g in zip(adapted, grads, strict=True)]
        return query.loss(pack(adapted), episode_tasks, shots, generator, heads)

    return loss


def context_vectors(
    cfg: MetaTrainConfig, catalog, tasks: list[str]
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tasks' stored in-context vectors (``task_vectors.source``: context, or auto when every
    task has one), or None for adapter-derived vectors.

    Raises:
        MetaConfigError: source context with tasks lacking a vector, vectors of different sizes,
            or vectors of model specs that differ in the modules the adapters adapt (specs that
            differ elsewhere, e.g. one head per task, are fine: :mod:`engine.tasks.shared_base`).
    """
    from engine.task_vectors import load_task_vectors
    from engine.task_vectors.store import vector_tasks

    source = cfg.task_vectors.source
    if source == "adapter_projection":
        return None
    missing = [t for t in tasks if t not in set(vector_tasks(catalog))]
    if missing and source == "context":
        raise MetaConfigError(
            f"task_vectors.source is 'context' but task(s) {missing} have no stored vector in {cfg.catalog}; "
            "compute them with `icmf taskvec` or use source: adapter_projection"
        )
    if missing:
        return None
    stored = load_task_vectors(catalog, tasks)
    models = sorted({v.model for v in stored.values()})
    dims = {v.dim for v in stored.values()}
    if len(dims) != 1:
        raise MetaConfigError(
            f"the tasks' stored vectors have {len(dims)} sizes {sorted(dims)}; recompute them with "
            "models of one hidden size"
        )
    if len(models) > 1:
        shared_vector_models(catalog, stored, catalog.layout(cfg.layout_id))
    info = {
        "kind": "context",
        "dim": dims.pop(),
        "model": models[0] if len(models) == 1 else models,
        "k": {t: v.k for t, v in stored.items()},
    }
    return {t: v.vector.float() for t, v in stored.items()}, info


def shared_vector_models(catalog, stored: dict, layout: Layout) -> None:
    """Vectors of several model specs condition one F-VAE when each was computed with its task's
    current definition and the definitions agree on the adapted modules (e.g. one head per task).

    Raises:
        MetaConfigError: naming the stale vectors, or the tasks whose adapted modules differ.
    """
    from engine.task_vectors.vector import spec_hash
    from engine.tasks.errors import TaskError
    from engine.tasks.shared_base import check_shared_base
    from engine.tasks.store import load_task, task_names

    defined = set(task_names(catalog))
    specs = {t: load_task(catalog, t).model for t in stored if t in defined}
    stale = sorted(t for t, v in stored.items() if t not in specs or spec_hash(specs[t]) != v.model)
    if stale:
        raise MetaConfigError(
            f"the stored vectors of {stale} were computed with another model spec than their task "
            "definition's (the tasks' vectors come from several specs); recompute them with "
            "`icmf taskvec` or use task_vectors.source: adapter_projection"
        )
    try:
        check_shared_base(specs, [m.name for m in layout.modules])
    except TaskError as exc:
        raise MetaConfigError(f"stored task vectors: {exc}") from None


def resolve_fusion_loss(cfg: MetaTrainConfig, catalog, tasks: list[str]) -> str:
    """``data`` or ``proxy`` for ``train.fusion_loss`` (``auto``: data when every task is defined)."""
    from engine.tasks.store import task_names

    defined = set(task_names(catalog))
    missing = [t for t in tasks if t not in defined]
    if cfg.train.fusion_loss == "data" and missing:
        raise MetaConfigError(
            f"train.fusion_loss is 'data' but task(s) {missing} have no definition in {cfg.catalog}; "
            "add them with `icmf task add` or use fusion_loss: proxy"
        )
    if cfg.train.fusion_loss == "proxy" or missing:
        return "proxy"
    return "data"


def worker_shares(
    catalog, layout_id: str, tasks: list[str], workers: int, split: str, exclude: list[str] = ()
) -> list[pa.Table]:
    """The manifest rows (``id``, ``task``) each worker streams: ``disjoint``, one task-balanced
    share per worker (:func:`~engine.catalog.streaming.split_by_task`; tasks with fewer adapters
    than workers go to every worker); ``full``, one share of every adapter for all workers.
    Only the layout's adapters of the training ``tasks`` are streamed at all, and none of the
    ``exclude`` ids."""
    from engine.catalog.streaming import split_by_task

    table = catalog.manifest().select(["id", "task", "layout_id"])
    # Adapters stored in older versions of a grown layout stream padded into it (and train).
    readable = pa.array([lay.layout_id for lay in catalog.layouts_readable_in(catalog.layout(layout_id))])
    keep = pc.and_(pc.is_in(table["layout_id"], value_set=readable), pc.is_in(table["task"], pa.array(tasks)))
    if exclude:
        keep = pc.and_(keep, pc.invert(pc.is_in(table["id"], value_set=pa.array(list(exclude), pa.string()))))
    table = table.filter(keep).select(["id", "task"])
    return [table] if split == "full" else split_by_task(table, workers)


def worker_datasets(catalog, layout_id: str, shares: list[pa.Table]) -> dict[str, Any]:
    """One Ray dataset per share, named ``adapters-<i>``; a worker of rank r reads
    ``adapters-<r % len(shares)>`` (``full``: all workers read ``adapters-0``)."""
    return {
        dataset_name(i, len(shares)): catalog.dataset(layout_id, columns=TRAIN_COLUMNS, ids=share["id"])
        for i, share in enumerate(shares)
    }


def dataset_name(rank: int, num_shares: int) -> str:
    return f"adapters-{rank % num_shares}"


def split_summary(split: str, shares: list[pa.Table], workers: int) -> dict[str, Any]:
    """What each worker streams, for the artifact's metadata."""
    replicated: list[str] = []
    if len(shares) > 1:
        # split_by_task puts a task's rows in two shares only when it gives them to every share.
        shared = pc.is_in(shares[0]["id"], value_set=shares[1]["id"])
        replicated = sorted(set(shares[0]["task"].filter(shared).to_pylist()))
    return {
        "mode": split,
        "adapters_per_worker": [shares[r % len(shares)].num_rows for r in range(workers)],
        "replicated_tasks": replicated,
    }


def _average_gradients(model: torch.nn.Module, loss: torch.Tensor) -> float:
    """Average the gradients and the episode ``loss`` over the workers; returns the mean loss
    (what every worker's spike guard then decides on, so they skip the same steps)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(loss.detach())
    # One all-reduce of all gradients flattened together (and the loss as one more element): one
    # collective (one barrier between the workers) per step instead of one per parameter tensor.
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1).to(params[0].grad)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return float(flat[-1])


def _load_checkpoint(model, optimizer) -> int:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _report(step: int, metrics: dict[str, float], model, optimizer, extra: dict, checkpoint: bool) -> None:
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        if ray.train.get_context().get_world_rank() == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save(state, Path(directory) / "state.pt")
            torch.save(extra, Path(directory) / "extra.pt")
            (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


def worker_shard(num_shares: int, rank: int, world_size: int):
    """This worker's dataset (:func:`worker_datasets`).

    Raises:
        RuntimeError: the group's size is not the one the shares were cut for.
    """
    import ray.train

    if num_shares > 1 and num_shares != world_size:
        raise RuntimeError(f"the catalog was split for {num_shares} workers but {world_size} are running")
    return ray.train.get_dataset_shard(dataset_name(rank, num_shares))


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop (one process per worker)."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Errors that would repeat (config, data, shapes) end the run at once (engine.meta.failures);
    # streaming and the collectives stay outside, where a failure may be a peer's death.
    with fail_fast(f"training worker {rank}, setting up"):
        cfg = MetaTrainConfig.model_validate(config["cfg"])
        layout = Layout.from_dict(config["layout"])
        # Copies: the arrays arrive read-only from Ray's object store.
        normalizer = SlotNormalizer(torch.tensor(config["mean"]), torch.tensor(config["std"]))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    # Each worker streams its own share of the catalog (train_fvae: one dataset per share, every
    # task in every share) into its own bounded pool, so each samples episodes over all tasks;
    # episodes differ across workers by their shares and RNG seeds.
    vectors = config["task_vectors"]
    fill_start = time.perf_counter()
    pool, store = fill_pool(
        worker_shard(config["num_shares"], rank, context.get_world_size()),
        cfg.train.capacity_per_task,
        cfg.train.seed + rank,
        set(vectors),
    )
    fill_s = time.perf_counter() - fill_start
    device = ray.train.torch.get_device()
    with fail_fast(f"training worker {rank}, setting up"):
        data_loss = None
        if config["fusion_loss"] == "data":
            data_loss = data_fusion_loss(cfg, layout, sorted(vectors), cfg.train.seed + rank)
        model = FVAE(fvae_config(cfg, layout, config.get("cond_dim"))).to(device)
        normalizer = SlotNormalizer(normalizer.mean.to(device), normalizer.std.to(device))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
    start = _load_checkpoint(model, optimizer)
    settings = EpisodeSettings(
        cfg.train.fusion_weight, cfg.train.combine, cfg.train.project, cfg.train.anchor
    )
    rng = np.random.default_rng([cfg.train.seed, rank, start])
    sums: dict[str, float] = {}
    window_start, window_steps, skipped = time.perf_counter(), 0, 0
    guard = SpikeGuard(cfg.train.skip_spikes)
    for step in range(start + 1, cfg.train.steps + 1):
        with fail_fast(f"training worker {rank}, step {step}"):
            episode = pool.sample(cfg.train.max_tasks, rng)
            batch = EpisodeBatch(
                x=torch.stack([store[i][0] for i in episode.adapter_index]).to(device),
                mask=torch.stack([store[i][1] for i in episode.adapter_index]).to(device),
                cond=torch.stack([vectors[t] for t in episode.tasks]).to(device),
                tasks=episode.tasks,
                ids=tuple(store[i][2] for i in episode.adapter_index),
            )
            model.train()
            rate = learning_rate(step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = rate
            losses = episode_loss(model, normalizer, batch, layout, settings, data_loss)
            optimizer.zero_grad()
            losses["loss"].backward()
        if guard.accept(_average_gradients(model, losses["loss"])):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        else:
            skipped += 1
        window_steps += 1
        is_checkpoint = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
        if step % cfg.train.report_every == 0 or is_checkpoint:
            elapsed = time.perf_counter() - window_start
            # loss terms: means over the window's applied episodes
            applied = window_steps - skipped
            metrics = {k: sums[k] / applied if applied else float("nan") for k in LOSS_TERMS}
            metrics.update(
                skipped=skipped,
                step=step,
                start_step=start,  # > 0 when this attempt continued from a checkpoint
                episodes_per_s=window_steps * context.get_world_size() / max(elapsed, 1e-9),
                lr=rate,
            )
            if rank == 0:
                print(
                    f"[icmf train] step {step}/{cfg.train.steps} loss {metrics['loss']:.4f} "
                    f"recon {metrics['recon']:.4f} kl {metrics['kl']:.2f} fusion {metrics['fusion']:.4f} "
                    f"{metrics['episodes_per_s']:.1f} episodes/s"
                    + (f" ({skipped} spike(s) skipped)" if skipped else ""),
                    flush=True,
                )
                if config.get("progress") is not None:  # the driver's progress display
                    config["progress"].put_nowait({"step": step, "steps": cfg.train.steps, **metrics})
            extra = {
                "pool_sizes": {t: len(s) for t, s in pool.slots.items()},
                "streamed": dict(pool.seen),
                "fill_s": fill_s,
            }
            if step == cfg.train.steps and rank == 0:
                extra["familiarity"], extra["task_latents"] = pool_familiarity(
                    model, normalizer, pool, store, vectors, layout, cfg.train.seed
                )
            _report(step, metrics, model, optimizer, extra, is_checkpoint)
            sums, window_start, window_steps, skipped = {}, time.perf_counter(), 0, 0


# ----------------------------------------------------------------------------- driver side
def _run_name(out: str, resume: bool) -> tuple[str, bool]:
    """A fresh unique run name (Ray silently resumes a reused name), or the latest one to resume."""
    fs, root = cfs.resolve_uri(out)
    marker = cfs.join(root, RUN_FILE)
    if resume:
        if not cfs.exists(fs, marker):
            raise MetaConfigError(f"--resume: no run to resume under {out} (missing {RUN_FILE})")
        return json.loads(cfs.read_bytes(fs, marker))["name"], True
    name = f"fvae-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    cfs.write_bytes_atomic(fs, marker, json.dumps({"name": name}).encode())
    return name, False


def _storage_path(out: str) -> str:
    fs, root = cfs.resolve_uri(out)
    if cfs.is_local(fs):
        return cfs.join(root, "runs")
    # "/runs" goes into the path, before any "?region=...&endpoint_override=..." query.
    path, sep, query = out.partition("?")
    return path.rstrip("/") + "/runs" + sep + query


@contextmanager
def _forward_progress(queue, progress: Callable[[dict[str, Any]], None] | None):
    """While the block runs, hand each report put on ``queue`` by rank 0 to ``progress``."""
    if queue is None or progress is None:
        yield
        return
    from ray.util.queue import Empty

    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                progress(queue.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shutting down): stop showing progress
                return

    thread = threading.Thread(target=drain, name="icmf-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        import ray

        ray.kill(queue.actor)


def train_fvae(
    cfg: MetaTrainConfig,
    resume: bool = False,
    workers: int | None = None,
    plan: TrainingPlan | None = None,
    log=print,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Meta-train an F-VAE on a catalog with Ray Train; returns the artifact location.

    Needs a running Ray (``engine._ray.ensure_ray``). Everything checkable on the driver is
    checked first (:func:`engine.meta.preflight.plan_training`; pass ``plan`` when the caller
    already did, e.g. before starting Ray). Statistics are recomputed when stale. A worker error
    that would repeat ends the run at once; a dead worker or node restarts the group from the
    latest checkpoint, at most ``train.max_failures`` times (:mod:`engine.meta.failures`).

    Raises:
        MetaConfigError: the setup's faults, all listed; or the workers' deterministic error.

    ``progress`` is called on the driver with each report of rank 0 (``step``, ``steps`` and the
    window's metrics), from a background thread.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = plan or plan_training(cfg, workers)
    check_memory(plan)
    catalog, layout, tasks, shares = plan.catalog, plan.layout, plan.tasks, plan.shares
    num_workers, fusion_loss = plan.workers, plan.fusion_loss
    stats = catalog.stats(layout.layout_id)
    if stats is None or stats.manifest_version != catalog.version():
        stats = catalog.compute_stats(layout.layout_id)
    # ``auto`` resolved for this layout
    normalizer = SlotNormalizer.for_config(
        fvae_config(cfg, layout), layout, stats.mean, stats.std, stats.count
    )
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    # Leave a CPU for Ray Data: with every CPU held by workers the dataset never streams and fit() hangs.
    cpus = cfg.train.cpus_per_worker or max(0.25, min(1.0, (total_cpus - 1) / num_workers))
    # ``columns``, not ``select_columns``: a fused projection would coalesce blocks to whole shards.
    # Kept-out adapters must not shape their task's vector either: then only the training ones.
    ids = pa.concat_tables(shares)["id"].unique() if cfg.exclude_adapters else None
    dataset = catalog.dataset(layout.layout_id, columns=["task", "weights", "mask"], ids=ids)
    in_context = context_vectors(cfg, catalog, tasks)
    if in_context is not None:
        vectors, vector_source = in_context
    else:
        vectors = projected_task_vectors(
            dataset, normalizer, cfg.task_vectors.dim, cfg.train.seed, set(tasks)
        )
        vector_source = {"kind": "adapter_projection", "dim": cfg.task_vectors.dim, "seed": cfg.train.seed}
    name, resuming = _run_name(cfg.out, resume)
    progress_queue = None
    if progress is not None:
        from ray.util.queue import Queue

        # No CPU: the training workers and Ray Data hold them all.
        progress_queue = Queue(actor_options={"num_cpus": 0})

    def trainer() -> TorchTrainer:
        # A fresh trainer per attempt on the same run name: Ray Train resumes it from its latest
        # checkpoint. Its own retries are off (max_failures=0): fit_with_retries decides.
        return TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg.model_dump(),
                "layout": layout.to_dict(),
                "mean": normalizer.mean.numpy(),
                "std": normalizer.std.numpy(),
                "threads": max(1, int(cpus)),
                "task_vectors": vectors,
                "cond_dim": int(vector_source["dim"]),
                "fusion_loss": fusion_loss,
                "num_shares": len(shares),
                "progress": progress_queue,
            },
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker={"CPU": cpus}
            ),
            # Our own split (not Ray Train's ``streaming_split``, which hands out blocks as workers
            # ask and so cannot promise every worker every task: shards often hold one task each).
            # Each dataset is configured only when a worker first asks for it, i.e. once per share.
            datasets=worker_datasets(catalog, layout.layout_id, shares),
            dataset_config=DataConfig(datasets_to_split=[]),
            run_config=RunConfig(
                name=name,
                storage_path=_storage_path(cfg.out),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=0),
            ),
        )

    with _forward_progress(progress_queue, progress):
        result = fit_with_retries(trainer, cfg.train.max_failures, log)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", weights_only=True)
        extra = torch.load(Path(directory) / "extra.pt", weights_only=True)
        metrics = json.loads((Path(directory) / "metrics.json").read_text())
    model = FVAE(fvae_config(cfg, layout, int(vector_source["dim"])))
    model.load_state_dict(state["model"])
    artifact = FVAEArtifact(
        model=model.eval(),
        normalizer=normalizer,
        layout=layout,
        trained_vectors=vectors,
        task_latents=extra.get("task_latents") or {},
        meta=ArtifactMeta(
            run=name,
            resumed=resuming,
            steps=int(state["step"]),
            workers=num_workers,
            catalog=cfg.catalog,
            catalog_version=catalog.version(),
            gauge=bool((catalog.settings() or {}).get("gauge", True)),
            config=cfg.model_dump(mode="json"),
            metrics=metrics,
            familiarity=extra.get("familiarity"),
            task_vector_source=vector_source,
            pool_sizes=extra["pool_sizes"],
            data_split=dict(
                split_summary(cfg.train.data_split, shares, num_workers),
                rank0_streamed=extra["streamed"],
                rank0_fill_s=extra["fill_s"],
            ),
            fusion_loss=fusion_loss,
            tasks=tasks,
            created=datetime.now(timezone.utc).isoformat(),
            pid=os.getpid(),
        ),
    )
    return artifact.save(cfg.out)
