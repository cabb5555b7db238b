"""The lab's units of work, run in worker processes (or inline): one per task, plus pretraining.

A job writes only under its own task's directories, so jobs of different tasks run in parallel.
Every adapter directory appears atomically (written beside it, then renamed) with its
``lab_adapter.json`` sidecar inside: a directory that exists is finished, and a rerun skips it.
A run whose checkpoints all exist is skipped whole; a partly finished run is retrained from its
seed (deterministic, so the finished checkpoints are reproduced). A task whose ``tasks/<task>.json``
report exists, with every adapter it lists, is skipped without loading a model.

Progress goes to ``events`` (anything with ``put``): ``("adapter", suite, task)`` per adapter
finished or found, ``("skip", suite, n)`` when a rejected task will not train ``n`` planned
adapters, and ``("pretrain", step, total)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.lab.config import AdapterPlan, EncoderSize, GenerativeSize, derive_seed
from benchmarks.lab.examples import example_paths, read_jsonl

SIDECAR = "lab_adapter.json"


def setup_process(threads: int = 1) -> None:
    """Quiet, offline, single-threaded torch: deterministic, and fair to a shared machine."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------ shared helpers
def planned_adapters(plan: AdapterPlan) -> int:
    return plan.runs * len(plan.checkpoints) + len(plan.fewshot_k) * plan.fewshot_seeds


def read_sidecar(path: Path) -> dict | None:
    file = path / SIDECAR
    return json.loads(file.read_text()) if file.is_file() else None


def save_peft_checkpoint(peft_model, path: Path, base_id: str, meta: dict) -> None:
    """``save_pretrained`` (no embedding layers, base id pinned) + sidecar, appearing atomically
    (:func:`engine.adapters.io.staged_dir`)."""
    from engine.adapters.io import staged_dir

    with staged_dir(path) as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        # PEFT keeps target_modules as a set, so its JSON order follows the process's string hash
        # seed; sort it, or the same weights would get another sha256 (and catalog id) per build.
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base_id
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing here
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=1) + "\n")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _indices_digest(index: torch.Tensor) -> str:
    return hashlib.sha256(json.dumps(index.tolist()).encode()).hexdigest()[:16]


def _subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor(sorted(rng.sample(range(n), max(1, round(fraction * n)))))


def _stratified(labels: list[int], k: int, seed: int) -> torch.Tensor:
    """``k`` indices drawn round-robin over the classes (every class present when k allows)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_class.items())]
    chosen: list[int] = []
    while len(chosen) < min(k, len(labels)):
        for pool in pools:
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    return torch.tensor(sorted(chosen))


@dataclass(frozen=True)
class RunSpec:
    """One training run of a task; it saves an adapter at each of ``checkpoints``."""

    variant: str  # main | fewshot-k<k>
    name: str  # run<i> | seed<s>
    seed: int
    rank: int
    index: torch.Tensor  # rows of the train split it trains on
    steps: int
    checkpoints: tuple[int, ...]
    batch_size: int


def _run_specs(plan: AdapterPlan, n_train: int, labels: list[int] | None, seed: int, suite: str, task: str):
    """Every run of a task: the main runs first (the keep decision is taken on them), then few-shot."""
    specs = []
    for i in range(plan.runs):
        run_seed = derive_seed(seed, suite, task, "main", i)
        index = torch.arange(n_train) if i == 0 else _subset(n_train, plan.subset_fraction, run_seed)
        rank = plan.ranks[i % len(plan.ranks)]
        specs.append(
            RunSpec("main", f"run{i}", run_seed, rank, index, plan.steps, plan.checkpoints, plan.batch_size)
        )
    for k in plan.fewshot_k:
        for s in range(plan.fewshot_seeds):
            run_seed = derive_seed(seed, suite, task, f"fewshot-k{k}", s)
            if labels is not None:
                index = _stratified(labels, k, run_seed)
            else:
                index = torch.tensor(sorted(random.Random(run_seed).sample(range(n_train), min(k, n_train))))
            rank = plan.ranks[s % len(plan.ranks)]
            steps = plan.fewshot_steps
            batch = min(plan.batch_size, k)
            specs.append(RunSpec(f"fewshot-k{k}", f"seed{s}", run_seed, rank, index, steps, (steps,), batch))
    return specs


def _adapter_dir(suite_dir: Path, task: str, spec: RunSpec, step: int) -> Path:
    return suite_dir / "adapters" / task / spec.variant / f"{spec.name}-step{step}"


def final_main(metas: list[dict]) -> list[dict]:
    """The last checkpoint of every main run."""
    return [m for m in metas if m["variant"] == "main" and m["step"] == m["steps"]]


def _finished_report(report_path: Path, suite_dir: Path) -> dict | None:
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    if all((suite_dir / a["path"] / SIDECAR).is_file() for a in report["adapters"]):
        return report
    return None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class _Saver:
    """``on_checkpoint(step, model, metrics)`` of one run: saves the adapter and its sidecar."""

    spec: RunSpec
    suite_dir: Path
    suite: str
    task: str
    base_id: str
    events: Any
    metas: list[dict] = field(default_factory=list)

    def __call__(self, step: int, model, metrics: dict[str, float]) -> None:
        path = _adapter_dir(self.suite_dir, self.task, self.spec, step)
        meta = {
            "suite": self.suite,
            "task": self.task,
            "variant": self.spec.variant,
            "run": self.spec.name,
            "seed": self.spec.seed,
            "rank": self.spec.rank,
            "step": step,
            "steps": self.spec.steps,
            "n_train": len(self.spec.index),
            "train_indices_sha": _indices_digest(self.spec.index),
            "batch_size": self.spec.batch_size,
            "base_model": self.base_id,
            "eval": metrics,
            "path": str(path.relative_to(self.suite_dir)),
        }
        save_peft_checkpoint(model, path, self.base_id, meta)
        self.metas.append(meta)
        self.events.put(("adapter", self.suite, self.task))


def _train_runs(
    specs, suite_dir, suite, task, base_id, events, train_one, keep_after_main
) -> tuple[list, bool]:
    """Train (or find) every run with ``train_one(spec, on_checkpoint)``. Once the main runs are
    done, ``keep_after_main(final adapter metas of the main runs)`` decides whether the task is
    kept; a rejected task trains nothing more. Returns ``(adapter metas, kept)``."""
    metas: list[dict] = []
    kept = True
    main_count = sum(spec.variant == "main" for spec in specs)
    for number, spec in enumerate(specs):
        found = [read_sidecar(_adapter_dir(suite_dir, task, spec, s)) for s in spec.checkpoints]
        if all(found):
            run_metas = found
            for _ in found:
                events.put(("adapter", suite, task))
        else:
            saver = _Saver(spec, suite_dir, suite, task, base_id, events)
            train_one(spec, saver)
            run_metas = saver.metas
        metas.extend(run_metas)
        if number == main_count - 1:
            kept = keep_after_main(final_main(metas))
            if not kept:
                events.put(("skip", suite, sum(len(s.checkpoints) for s in specs[main_count:])))
                break
    return metas, kept


# ------------------------------------------------------------------ encoder suite
def encoder_task_job(lab_dir: str, task: str, size: EncoderSize, seed: int, events) -> dict:
    """Probe, adapters and report of one encoder task."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    from benchmarks.lab import encoder as E
    from benchmarks.lab.encoder_tasks import TASKS

    suite_dir = Path(lab_dir) / "encoder"
    report_path = suite_dir / "tasks" / f"{task}.json"
    if (done := _finished_report(report_path, suite_dir)) is not None:
        for _ in done["adapters"]:
            events.put(("adapter", "encoder", task))
        if not done["kept"]:
            events.put(("skip", "encoder", planned_adapters(size.adapters) - len(done["adapters"])))
        return {**done, "cached": True}
    setup_process()
    started, cpu0 = time.time(), time.process_time()
    plan = size.adapters
    examples = {s: read_jsonl(p) for s, p in example_paths(suite_dir, task).items()}
    tokenizer = E.load_tokenizer()
    base = E.load_base()
    start = E.NUM_LAYERS - size.lora_layers
    data = {
        s: E.frozen_states(
            base,
            tokenizer,
            [r["text"] for r in examples[s]],
            [r["label"] for r in examples[s]],
            start,
            size.max_length,
        )
        for s in ("train", "eval")
    }
    train, held = data["train"], data["eval"]
    probe_seed = derive_seed(seed, "encoder", task, "probe")
    probe = E.fit_linear_probe(train.pooled, train.labels, held.pooled, held.labels, E.NUM_LABELS, probe_seed)
    mean_probe = E.fit_linear_probe(
        train.mean_pooled, train.labels, held.mean_pooled, held.labels, E.NUM_LABELS, probe_seed
    )
    head_path = suite_dir / "heads" / f"{task}.safetensors"
    head_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"classifier.weight": probe["weight"].contiguous(), "classifier.bias": probe["bias"].contiguous()},
        str(head_path),
        metadata={"task": task, "base_model": E.BASE_ID, "eval_accuracy": str(probe["accuracy"])},
    )

    def train_one(spec: RunSpec, on_checkpoint) -> None:
        model = E.load_base()
        # Linear probing, then LoRA (LP-FT): the run's head starts from a probe fit on its own data.
        head = E.fit_logistic(train.pooled[spec.index], train.labels[spec.index], E.NUM_LABELS, probe["l2"])
        E.set_head(model, *head)
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, E.lora_config(spec.rank, size.lora_layers, size.target_modules))
        E.train_lora(
            peft_model,
            train,
            spec.index,
            start,
            spec.steps,
            list(spec.checkpoints),
            spec.seed,
            plan.lr,
            spec.batch_size,
            lambda step: on_checkpoint(step, peft_model, E.evaluate(peft_model, held, start)),
            warmup=round(plan.warmup_fraction * spec.steps),
        )

    def keep(finals: list[dict]) -> bool:
        gain = _mean(m["eval"]["accuracy"] for m in finals) - probe["accuracy"]
        return size.keep_min_gain is None or gain >= size.keep_min_gain

    specs = _run_specs(plan, len(train), train.labels.tolist(), seed, "encoder", task)
    metas, kept = _train_runs(specs, suite_dir, "encoder", task, E.BASE_ID, events, train_one, keep)
    spec = TASKS[task]
    finals = [m["eval"]["accuracy"] for m in final_main(metas)]
    report = {
        "suite": "encoder",
        "task": task,
        "labels": list(spec.labels),
        "num_classes": spec.num_classes,
        "source": spec.source,
        "description": spec.description,
        "sizes": {s: len(v) for s, v in examples.items()},
        "chance_accuracy": E.chance_accuracy(held.labels),
        "base_head": {
            "accuracy": probe["accuracy"],
            "loss": probe["loss"],
            "l2": probe["l2"],
            "path": str(head_path.relative_to(suite_dir)),
            "features": "pooler output of the frozen base (the head's input in BertForSequenceClassification)",
        },
        "mean_pool_probe_accuracy": mean_probe["accuracy"],
        "lora_accuracy": _mean(finals),
        "lora_final_accuracies": finals,
        "gain": _mean(finals) - probe["accuracy"],
        "keep_rule": None
        if size.keep_min_gain is None
        else f"mean final accuracy of the main LoRA runs - base-head accuracy >= {size.keep_min_gain}",
        "kept": kept,
        "adapters": metas,
        "seconds": {"wall": time.time() - started, "cpu": time.process_time() - cpu0},
    }
    _write_json(report_path, report)
    return {**report, "cached": False}


# ------------------------------------------------------------------ generative suite
def generative_pretrain_job(lab_dir: str, size: GenerativeSize, seed: int, events) -> dict:
    """Pretrain the character-level Llama on generic text and save it with its tokenizer."""
    from benchmarks.lab import generative as G
    from benchmarks.lab import generative_tasks
    from benchmarks.lab.examples import generative_words
    from engine.tasks.chartok import CharTokenizer

    suite_dir = Path(lab_dir) / "generative"
    base_dir, record_path = suite_dir / "base", suite_dir / "pretrain.json"
    if record_path.is_file() and (base_dir / "model.safetensors").is_file():
        record = json.loads(record_path.read_text())
        events.put(("pretrain", record["steps"], record["steps"]))
        return {**record, "cached": True}
    setup_process()
    started, cpu0 = time.time(), time.process_time()
    tokenizer = CharTokenizer()
    words = generative_words(size, seed)
    corpus = generative_tasks.pretraining_corpus(  # no support/eval word
        sorted(words["train"]), random.Random(derive_seed(seed, "generative", "corpus"))
    )
    model = G.build_model(
        G.llama_config(tokenizer, size.hidden, size.layers, size.heads),
        derive_seed(seed, "generative", "init"),
    )
    losses = G.pretrain(
        model,
        tokenizer,
        corpus,
        size.pretrain_steps,
        size.pretrain_seq_len,
        size.pretrain_batch,
        size.pretrain_lr,
        derive_seed(seed, "generative", "pretrain"),
        on_step=lambda step, _loss: events.put(("pretrain", step, size.pretrain_steps)),
    )
    tmp = base_dir.with_name(f".base.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save(tmp)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.replace(tmp, base_dir)
    tail = losses[-max(1, len(losses) // 10) :]
    record = {
        "steps": size.pretrain_steps,
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_lines": len(corpus),
        "corpus_chars": sum(map(len, corpus)),
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": {"wall": time.time() - started, "cpu": time.process_time() - cpu0},
    }
    _write_json(record_path, record)
    return {**record, "cached": False}


def generative_task_job(lab_dir: str, task: str, size: GenerativeSize, seed: int, events) -> dict:
    """Base scores, adapters and report of one generative task."""
    from peft import get_peft_model

    from benchmarks.lab import generative as G
    from benchmarks.lab.generative_tasks import DESCRIPTIONS
    from engine.tasks.chartok import CharTokenizer

    suite_dir = Path(lab_dir) / "generative"
    report_path = suite_dir / "tasks" / f"{task}.json"
    if (done := _finished_report(report_path, suite_dir)) is not None:
        for _ in done["adapters"]:
            events.put(("adapter", "generative", task))
        if not done["kept"]:
            events.put(("skip", "generative", planned_adapters(size.adapters) - len(done["adapters"])))
        return {**done, "cached": True}
    setup_process()
    started, cpu0 = time.time(), time.process_time()
    plan = size.adapters
    base_dir = suite_dir / "base"
    tokenizer = CharTokenizer.load(base_dir)
    examples = {s: read_jsonl(p) for s, p in example_paths(suite_dir, task).items()}
    train = G.encode_examples(tokenizer, examples["train"])
    base_scores = G.evaluate(G.load_base(base_dir), tokenizer, examples["eval"])

    def train_one(spec: RunSpec, on_checkpoint) -> None:
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(G.load_base(base_dir), G.lora_config(spec.rank))
        G.train_lora(
            peft_model,
            train,
            spec.index,
            spec.steps,
            list(spec.checkpoints),
            spec.seed,
            plan.lr,
            spec.batch_size,
            lambda step: on_checkpoint(step, peft_model, G.evaluate(peft_model, tokenizer, examples["eval"])),
            warmup=round(plan.warmup_fraction * spec.steps),
        )

    def keep(finals: list[dict]) -> bool:
        drop = 1 - _mean(m["eval"]["loss"] for m in finals) / base_scores["loss"]
        return size.keep_min_loss_drop is None or drop >= size.keep_min_loss_drop

    specs = _run_specs(plan, len(examples["train"]), None, seed, "generative", task)
    metas, kept = _train_runs(specs, suite_dir, "generative", task, G.BASE_ID, events, train_one, keep)
    finals = [m["eval"] for m in final_main(metas)]
    lora = {k: _mean(f[k] for f in finals) for k in ("loss", "exact_match")}
    report = {
        "suite": "generative",
        "task": task,
        "description": DESCRIPTIONS[task],
        "sizes": {s: len(v) for s, v in examples.items()},
        "base": base_scores,
        "lora": lora,
        "lora_final": finals,
        "loss_drop": 1 - lora["loss"] / base_scores["loss"],
        "keep_rule": None
        if size.keep_min_loss_drop is None
        else f"1 - mean final answer loss of the main LoRA runs / base answer loss >= {size.keep_min_loss_drop}",
        "kept": kept,
        "adapters": metas,
        "seconds": {"wall": time.time() - started, "cpu": time.process_time() - cpu0},
    }
    _write_json(report_path, report)
    return {**report, "cached": False}
