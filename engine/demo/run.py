"""``icmf demo``: the pipeline end to end on an embedded local Ray.

Trains a few real PEFT LoRA adapters on a tiny Llama, ingests them into a catalog, streams the
catalog through Ray Data, computes per-slot statistics, and checks an exported adapter loads in
stock PEFT and still solves its task.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from rich import box
from rich.rule import Rule
from rich.table import Table

from engine._output import console, progress_bar
from engine._ray import ensure_ray
from engine.catalog import Catalog
from engine.demo.tasks import save_demo_tokenizer
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
    """The demo in ``workdir``; returns its figures. Prints steps, tables and paths only: library
    and Ray output is the caller's to route (``icmf demo`` sends it to ``<workdir>/logs``)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = list(TASKS)
    save_tiny_llama(workdir / "base")
    save_demo_tokenizer(workdir / "base")

    console.print(Rule("1. real PEFT LoRA adapters on a tiny Llama"))
    t0 = time.perf_counter()
    adapters = train_adapters(workdir, tasks, per_task, steps)
    count = sum(len(paths) for paths in adapters.values())
    console.print(
        f"{count} adapters ({per_task} per task: {', '.join(tasks)}; ranks 4 and 8 on q, v, o) "
        f"in {time.perf_counter() - t0:.0f}s: {workdir / 'adapters'}"
    )

    console.print(Rule("2. the catalog: ingest, stream with Ray Data, per-slot statistics"))
    catalog = Catalog(workdir / "catalog")
    added = sum(len(catalog.ingest(paths, task=task).added) for task, paths in adapters.items())
    ensure_ray()
    layout = catalog.layout()
    t0 = time.perf_counter()
    rows = 0
    for batch in catalog.dataset().iter_batches(batch_size=64, batch_format="numpy"):
        assert batch["weights"].shape[1:] == (layout.size,)
        rows += len(batch["weights"])
    stream_s = time.perf_counter() - t0
    stats = catalog.compute_stats()
    summary = stats.summary()
    console.print(
        f"{added} new adapters in {workdir / 'catalog'} (version {catalog.version()}); layout "
        f"{layout.num_modules} modules, r_max {layout.r_max}, N = {layout.size} floats per adapter"
    )
    console.print(
        f"streamed {rows} adapters in {stream_s:.2f}s; slot std mean {summary['mean_std']:.4g} "
        f"(min {summary['min_std']:.3g}, max {summary['max_std']:.3g})"
    )

    console.print(Rule("3. export to stock PEFT and check"))
    losses = Table(title="answer-token loss on held-out examples (lower is better)", box=box.SIMPLE_HEAD)
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
    fvae_dir = None
    if fvae_steps > 0:
        console.print(Rule("4. ICM-Fusion: task vectors, F-VAE meta-training (Ray Train, 2 workers)"))
        register_tasks(catalog, workdir, tasks)
        compute_demo_task_vectors(catalog, tasks)
        fvae_dir = train_demo_fvae(catalog, workdir, fvae_steps)
        console.print(Rule(f"5. fuse all {len(tasks)} tasks and evaluate"))
        quality = compare_methods(catalog, workdir, tasks, fvae_dir)
    serve_file = write_serve_config(workdir, catalog, fvae_dir)
    console.print(Rule("done"))
    console.print(f"serve the result: icmf serve {serve_file}  (OpenAI API on http://127.0.0.1:8000/v1)")
    console.print(
        f"demo finished in {time.perf_counter() - start:.0f}s; artifacts in {workdir}, logs in {workdir / 'logs'}"
    )
    return {"adapters": rows, "losses": results, "stats": summary, "quality": quality, "serve": serve_file}


def write_serve_config(workdir: Path, catalog: Catalog, fvae_dir: Path | None) -> Path:
    """A Serve config for the demo's base model, tokenizer, catalog and F-VAE: ``workdir/serve.yaml``.

    Paths are stored absolute, so the file works from any directory and with Ray's own
    ``serve run`` too.
    """
    base = (workdir / "base").resolve()
    args = {
        "catalog": catalog.uri,
        "base_model": str(base),
        "tokenizer": str(base),
        "tokenizer_kind": "hf",
        "base_aliases": [BASE_MODEL_ID],
        "cache_size": 8,
        "limits": {"max_prompt_chars": 256, "max_tokens": 16},
    }
    if fvae_dir is not None:
        args["fvae"] = str(fvae_dir.resolve())
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {"name": "icmf", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}
        ],
    }
    path = workdir / "serve.yaml"
    header = "# Written by `icmf demo`: serve its result with `icmf serve " + str(path) + "`.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def register_tasks(catalog: Catalog, workdir: Path, tasks: list[str]) -> None:
    """Task definitions (model spec + examples) so fused adapters can be evaluated."""
    from engine.demo.tasks import demo_model_spec, write_demo_examples
    from engine.tasks import TaskDefinition, save_task

    for i, task in enumerate(tasks):
        examples = write_demo_examples(workdir / "examples" / f"{task}.jsonl", task, 96, seed=500 + i)
        definition = TaskDefinition(
            name=task,
            model=demo_model_spec(),
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
        "fvae": {"latent_dim": 64},  # the default arch (``auto``: the dense F-VAE at this size)
        "train": {
            "steps": steps,
            "checkpoint_every": steps,
            "report_every": max(1, steps // 5),
            "workers": 2,
            "lr": 1e-3,
        },
    }
    from engine._output import training_progress

    t0 = time.perf_counter()
    last: dict = {}
    with training_progress(steps, print_reports=False) as show:

        def record(report: dict) -> None:
            last.update(report)
            show(report)

        train_fvae(load_config(config), progress=record)
    console.print(
        f"F-VAE meta-trained for {steps} steps in {time.perf_counter() - t0:.0f}s"
        + (f" (last window: loss {last['loss']:.3f}, recon {last['recon']:.3f})" if last else "")
        + f": {out}"
    )
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
    table = Table(
        title=f"fusing {len(tasks)} tasks: gap closure G on held-out examples (1 = own adapter)",
        box=box.SIMPLE_HEAD,
    )
    for column in ("method", "mean G", "worst G", "worst task"):
        table.add_column(column)
    quality = {}
    with progress_bar("fuse and evaluate", total=len(DEMO_METHODS)) as advance:
        for label, params in DEMO_METHODS.items():
            method = label.split("+")[0]
            context = fusion_context(method, params, catalog=catalog, tasks=tasks, fvae=artifact)
            result = fuse_from_catalog(catalog, method, tasks=tasks, params=params, context=context)
            out = result.save(workdir / "fused" / label, overwrite=True)
            report = evaluate_fusion(catalog, tasks, out)
            quality[label] = {"mean_gap": report.mean_gap, "worst_gap": report.worst_gap}
            fmt = lambda g: "n/a" if g is None else f"{g:.3f}"  # noqa: E731
            table.add_row(label, fmt(report.mean_gap), fmt(report.worst_gap), str(report.worst_task))
            advance()
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
