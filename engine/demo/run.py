"""``icmf demo``: the pipeline end to end on an embedded local Ray.

Trains a few real PEFT LoRA adapters on a tiny Llama, ingests them into a catalog, streams the
catalog through Ray Data, computes per-slot statistics, and checks an exported adapter loads in
stock PEFT and still solves its task.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from rich.rule import Rule
from rich.table import Table

from engine._output import console, progress_bar
from engine._ray import ensure_ray
from engine.catalog import Catalog
from engine.demo.tiny import TASKS, build_tiny_llama, save_tiny_llama, task_loss, train_lora

BASE_MODEL_ID = "icmf-demo/tiny-llama"


def train_adapters(workdir: Path, tasks: list[str], per_task: int, steps: int) -> dict[str, list[Path]]:
    """Train ``per_task`` LoRA adapters per task (different seeds and ranks); return their dirs."""
    out: dict[str, list[Path]] = {}
    with progress_bar("train LoRA adapters", total=len(tasks) * per_task) as advance:
        for task in tasks:
            for seed in range(per_task):
                path = workdir / "adapters" / f"{task}-seed{seed}"
                if not (path / "adapter_model.safetensors").exists():
                    config = LoraConfig(
                        r=4 + 4 * (seed % 2),  # mixed ranks exercise padding to r_max
                        lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "o_proj"],
                    )
                    base = build_tiny_llama()
                    base.name_or_path = BASE_MODEL_ID  # PEFT records it in the adapter config
                    torch.manual_seed(seed)
                    model = get_peft_model(base, config)
                    train_lora(model, task, seed=seed, steps=steps)
                    model.save_pretrained(path, save_embedding_layers=False)  # no hub lookup
                out.setdefault(task, []).append(path)
                advance()
    return out


def run_demo(workdir: Path, per_task: int = 2, steps: int = 60, fvae_steps: int = 150) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = list(TASKS)
    save_tiny_llama(workdir / "base")

    console.print(Rule("1. real PEFT adapters on a tiny Llama"))
    adapters = train_adapters(workdir, tasks, per_task, steps)

    console.print(Rule("2. ingest into the catalog"))
    catalog = Catalog(workdir / "catalog")
    for task, paths in adapters.items():
        report = catalog.ingest(paths, task=task)
        console.print(
            f"{task}: {len(report.added)} added, {len(report.duplicates)} already present "
            f"(version {report.version})"
        )

    console.print(Rule("3. stream with Ray Data and compute per-slot statistics"))
    ensure_ray()
    layout = catalog.layout()
    t0 = time.perf_counter()
    rows = 0
    for batch in catalog.dataset().iter_batches(batch_size=64, batch_format="numpy"):
        assert batch["weights"].shape[1:] == (layout.size,)
        rows += len(batch["weights"])
    stream_s = time.perf_counter() - t0
    stats = catalog.compute_stats()

    console.print(Rule("4. the catalog"))
    table = Table(title=f"{catalog.uri} (version {catalog.version()}, layout {layout.layout_id})")
    table.add_column("id", no_wrap=True)
    for column in ("task", "rank", "params"):
        table.add_column(column)
    for e in catalog.entries():
        table.add_row(e["id"], e["task"], str(e["rank"]), f"{e['num_params']:,}")
    console.print(table)
    summary = stats.summary()
    console.print(
        f"layout: {layout.num_modules} modules, r_max {layout.r_max}, N = {layout.size} floats per adapter; "
        f"streamed {rows} adapters in {stream_s:.2f}s; slot std mean {summary['mean_std']:.4g} "
        f"(min {summary['min_std']:.3g}, max {summary['max_std']:.3g})"
    )

    console.print(Rule("5. export and check with stock PEFT"))
    losses = Table(title="answer-token loss on held-out examples (lower is better)")
    for column in ("task", "base model", "exported catalog adapter"):
        losses.add_column(column)
    base = build_tiny_llama()
    results = {}
    for task in tasks:
        entry = catalog.entries(task=task)[0]
        out = catalog.export(entry["id"], workdir / "exported" / entry["id"], overwrite=True)
        peft_model = PeftModel.from_pretrained(build_tiny_llama(), out).eval()
        results[task] = (task_loss(base, task), task_loss(peft_model, task))
        losses.add_row(task, f"{results[task][0]:.3f}", f"{results[task][1]:.3f}")
    console.print(losses)

    quality = {}
    if fvae_steps > 0:
        console.print(Rule("6. meta-train the F-VAE (Ray Train, 2 workers) and fuse all tasks"))
        register_tasks(catalog, workdir, tasks)
        compute_demo_task_vectors(catalog, tasks)
        artifact_dir = train_demo_fvae(catalog, workdir, fvae_steps)
        quality = compare_methods(catalog, workdir, tasks, artifact_dir)
    console.print(f"demo finished in {time.perf_counter() - start:.1f}s; artifacts in {workdir}")
    return {"adapters": rows, "losses": results, "stats": summary, "quality": quality}


def register_tasks(catalog: Catalog, workdir: Path, tasks: list[str]) -> None:
    """Task definitions (model spec + examples) so fused adapters can be evaluated."""
    from engine.demo.tasks import lab_model_spec, write_lab_examples
    from engine.tasks import TaskDefinition, save_task

    for i, task in enumerate(tasks):
        examples = write_lab_examples(workdir / "examples" / f"{task}.jsonl", task, 96, seed=500 + i)
        definition = TaskDefinition(
            name=task,
            model=lab_model_spec(),
            examples=str(examples),
            split={"eval": 64, "support": 16, "seed": 0},
        )
        save_task(catalog, definition, overwrite=True)


def compute_demo_task_vectors(catalog: Catalog, tasks: list[str], k: int = 16) -> None:
    """In-context task vectors: each task's adapter on k support examples, mean last hidden state,
    computed by a Ray Data actor pool and stored in the catalog (meta-training conditions on them)."""
    from engine.task_vectors import compute_task_vectors, save_task_vectors

    t0 = time.perf_counter()
    vectors = compute_task_vectors(catalog, tasks, k=k)
    save_task_vectors(catalog, vectors)
    norms = ", ".join(f"{t} |v|={float(v.vector.norm()):.2f}" for t, v in vectors.items())
    console.print(
        f"task vectors (k={k}, d={next(iter(vectors.values())).dim}) in {time.perf_counter() - t0:.1f}s: {norms}"
    )


def train_demo_fvae(catalog: Catalog, workdir: Path, steps: int) -> Path:
    from engine.meta.config import load_config
    from engine.meta.train import train_fvae

    out = workdir / "fvae"
    config = {
        "catalog": catalog.uri,
        "out": str(out),
        "fvae": {"depth": 8, "channels": 4, "max_channels": 32, "latent_dim": 64},
        "train": {
            "steps": steps,
            "checkpoint_every": steps,
            "report_every": max(1, steps // 5),
            "workers": 2,
            "lr": 1e-3,
        },
    }
    train_fvae(load_config(config))
    return out


DEMO_METHODS = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "svd": {},
    "lorahub": {"budget": 30},
    "icm": {},
    "icm+refine+span": {"refine_steps": 40, "refine_span": True},
}


def compare_methods(catalog: Catalog, workdir: Path, tasks: list[str], artifact_dir: Path) -> dict:
    """Fuse all tasks with each method, evaluate gap closure on held-out examples, chart it."""
    from engine.fusion import fuse_from_catalog, fusion_context
    from engine.fvae.artifact import FVAEArtifact
    from engine.tasks import evaluate_fusion

    artifact = FVAEArtifact.load(str(artifact_dir))
    table = Table(title=f"fusing {len(tasks)} tasks: gap closure G on held-out examples (1 = own adapter)")
    for column in ("method", "mean G", "worst G", "worst task"):
        table.add_column(column)
    quality = {}
    for label, params in DEMO_METHODS.items():
        method = label.split("+")[0]
        context = fusion_context(method, params, catalog=catalog, tasks=tasks, fvae=artifact)
        result = fuse_from_catalog(catalog, method, tasks=tasks, params=params, context=context)
        out = result.save(workdir / "fused" / label, overwrite=True)
        report = evaluate_fusion(catalog, tasks, out)
        quality[label] = {"mean_gap": report.mean_gap, "worst_gap": report.worst_gap}
        fmt = lambda g: "n/a" if g is None else f"{g:.3f}"  # noqa: E731
        table.add_row(label, fmt(report.mean_gap), fmt(report.worst_gap), str(report.worst_task))
    console.print(table)
    chart = write_chart(quality, workdir / "fusion_quality.png", len(tasks))
    console.print(f"chart: {chart}")
    return quality


def write_chart(quality: dict[str, dict], path: Path, k: int) -> Path:
    """Bar chart of mean G per method, worst-task G as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(quality)
    nan = float("nan")
    means = [quality[m]["mean_gap"] if quality[m]["mean_gap"] is not None else nan for m in labels]
    worst = [quality[m]["worst_gap"] if quality[m]["worst_gap"] is not None else nan for m in labels]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(labels, means, color=["tab:orange" if "icm" in m else "tab:blue" for m in labels])
    ax.scatter(labels, worst, marker="_", color="black", s=200, zorder=3, label="worst task")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("gap closure G (1 = each task's own adapter)")
    ax.set_title(f"icmf demo: fusing K = {k} tasks")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
