"""The ``features`` suite: a custom classifier with per-task heads and 16 support shots per task.

Off the lab's two suites on purpose, so that few-shot refinement is measured where it is hardest
(few shots, a model family of its own): the base is a plain ``torch.nn.Module`` given to the
engine by factory (task model kind ``custom``), an MLP ``fc1 -> fc2 -> classifier`` over fixed
hashed character n-gram features of a word (no pretrained weights: a seeded random trunk, like a
random-feature model, that the LoRA adapts). Tasks are six of the encoder suite's human-labelled
lexicon tasks (TextBlob, wordfreq; :mod:`benchmarks.lab.encoder_tasks`), so everything is
built offline from installed packages, in about a minute on two cores.

Per task: class-balanced train / support / eval splits (2048 / 16 / 256), the "frozen base +
trained linear head" baseline (the encoder suite's L2-tuned logistic probe, on the trunk's
output), and 2 seeds of PEFT LoRA (rank 4 on ``fc1``, ``fc2``; the head in ``modules_to_save``,
started from the probe: LP-FT) saved at 3 checkpoints: 6 adapters per task in one catalog. A task
is kept when its run-0 adapter beats the probe by >= 2 accuracy points.

:func:`build_features_suite` caches everything under ``<out>`` and returns the suite in the
shape of a ``lab.json`` suite (absolute paths), which :mod:`benchmarks.fusion_quality` scores
like the lab's.
"""

from __future__ import annotations

import json
import random
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.lab.encoder import fit_linear_probe
from benchmarks.lab.encoder_tasks import TASKS as LEXICON_TASKS
from benchmarks.lab.encoder_tasks import split_examples
from benchmarks.lab.examples import read_jsonl, write_jsonl
from benchmarks.lab.jobs import save_peft_checkpoint
from benchmarks.lab.training import run_training

SUITE = "features"
KIND = "custom-classification"
BASE_ID = "lab/features-mlp"
TASKS = (
    "word-pos",
    "word-verb-form",
    "word-language",
    "word-frequency",
    "gloss-polarity",
    "gloss-subjectivity",
)
SPLITS = {"train": 2048, "support": 16, "eval": 256}
DIM, HIDDEN, NUM_LABELS = 256, 128, 8
RANK, SEEDS, STEPS, CHECKPOINTS, LR, BATCH = 4, 2, 200, (100, 150, 200), 3e-3, 64
KEEP_GAIN = 0.02
FORMAT = 1


class FeatureMLP(nn.Module):
    """``x [n, DIM] -> logits [n, NUM_LABELS]``; the head ``classifier`` reads ``fc2``'s output."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN, num_labels: int = NUM_LABELS):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(x))


def base_model(path: str) -> FeatureMLP:
    """The suite's base (the ``custom`` task model's factory): weights from a safetensors file."""
    model = FeatureMLP()
    model.load_state_dict(load_file(path))
    return model.eval()


def word_features(word: str, dim: int = DIM) -> list[float]:
    """Signed feature hashing of the character 1-, 2- and 3-grams of ``^word$``, L2-normalised
    (crc32, so the same word has the same features in every process and build)."""
    text = f"^{word}$"
    vector = [0.0] * dim
    for n in (1, 2, 3):
        for i in range(len(text) - n + 1):
            h = zlib.crc32(f"{n}:{text[i : i + n]}".encode())
            vector[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [round(v / norm, 5) for v in vector]


def _tensors(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([r["input"] for r in rows]), torch.tensor([r["label"] for r in rows])


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(x)
    return {
        "accuracy": float((logits.argmax(-1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }


def _task(out: Path, base_path: Path, task: str, seed: int) -> dict[str, Any]:
    """Examples, probe head and adapters of one task (cached by its ``task.json``)."""
    from peft import LoraConfig, get_peft_model

    done = out / "tasks" / f"{task}.json"
    if done.is_file():
        return json.loads(done.read_text())
    spec = LEXICON_TASKS[task]
    splits = split_examples(spec.pool(), spec.num_classes, SPLITS, random.Random(f"{SUITE}-{seed}-{task}"))
    files = {}
    for split, pairs in splits.items():
        files[split] = out / "examples" / task / f"{split}.jsonl"
        write_jsonl(files[split], [{"input": word_features(w), "label": c, "text": w} for w, c in pairs])
    (train_x, train_y), (eval_x, eval_y) = (_tensors(read_jsonl(files[s])) for s in ("train", "eval"))
    base = base_model(str(base_path))
    with torch.no_grad():
        probe = fit_linear_probe(base.trunk(train_x), train_y, base.trunk(eval_x), eval_y, NUM_LABELS, seed)
    head_path = out / "heads" / f"{task}.safetensors"
    head_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"classifier.weight": probe["weight"].contiguous(), "classifier.bias": probe["bias"]}, head_path
    )
    adapters = []
    for run in range(SEEDS):
        torch.manual_seed(seed * 100 + run)
        model = base_model(str(base_path))
        with torch.no_grad():
            model.classifier.weight.copy_(probe["weight"])
            model.classifier.bias.copy_(probe["bias"])
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=["fc1", "fc2"], modules_to_save=["classifier"]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)

        def save(step: int, run: int = run, peft_model=peft_model) -> None:
            path = out / "adapters" / task / f"run{run}-step{step}"
            meta = {
                "task": task,
                "variant": "main",
                "run": f"run{run}",
                "seed": run,
                "rank": RANK,
                "step": step,
            }
            meta["eval"] = _accuracy(peft_model, eval_x, eval_y)
            save_peft_checkpoint(peft_model, path, BASE_ID, meta)
            adapters.append({**meta, "path": str(path)})

        run_training(
            peft_model,
            torch.arange(len(train_y)),
            STEPS,
            list(CHECKPOINTS),
            seed * 100 + run,
            LR,
            BATCH,
            save,
            lambda rows, m=peft_model: F.cross_entropy(m(train_x[rows]), train_y[rows]),
        )
    own = max((a for a in adapters if a["run"] == "run0"), key=lambda a: a["step"])
    report = {
        "kept": own["eval"]["accuracy"] - probe["accuracy"] >= KEEP_GAIN,
        "num_classes": spec.num_classes,
        "labels": list(spec.labels),
        "source": spec.source,
        "description": f"{spec.description} (hashed character n-grams)",
        "examples": {s: str(p) for s, p in files.items()},
        "base_head": {"path": str(head_path), "accuracy": probe["accuracy"], "loss": probe["loss"]},
        "lora_accuracy": own["eval"]["accuracy"],
        "gain": own["eval"]["accuracy"] - probe["accuracy"],
        "adapters": adapters,
    }
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(report, indent=1))
    return report


def build_features_suite(out: str | Path, seed: int = 0, log=print) -> dict[str, Any]:
    """Build (or load) the suite under ``out``; returns it in the shape of a ``lab.json`` suite."""
    from engine.catalog import Catalog
    from engine.catalog.catalog import adapter_id, file_sha256

    out = Path(out).resolve()
    manifest = out / "suite.json"
    if manifest.is_file():
        suite = json.loads(manifest.read_text())
        if suite.get("format") == FORMAT and suite.get("seed") == seed:
            return suite
    out.mkdir(parents=True, exist_ok=True)
    base_path = out / "base" / "model.safetensors"
    if not base_path.is_file():
        torch.manual_seed(seed)
        base_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(FeatureMLP().state_dict(), base_path)
    reports = {}
    for task in TASKS:
        reports[task] = r = _task(out, base_path, task, seed)
        r["kept"] = r["gain"] >= KEEP_GAIN  # decided here, so the rule can change without retraining
        log(
            f"features {task}: probe {r['base_head']['accuracy']:.3f} lora {r['lora_accuracy']:.3f} kept={r['kept']}"
        )
    catalog_dir = out / "catalogs" / "main"
    catalog = Catalog(catalog_dir)
    ids: dict[str, list[str]] = {}
    adapters: dict[str, dict] = {}
    for task, report in reports.items():
        if not report["kept"]:
            continue
        dirs = [Path(a["path"]) for a in report["adapters"]]
        known = {e["id"] for e in catalog.entries(task=task)}
        ids[task] = [adapter_id(task, file_sha256(d)) for d in dirs]
        if not set(ids[task]) <= known:
            catalog.ingest(dirs, task=task, r_max=RANK, tags=["lab", f"suite={SUITE}", "variant=main"])
        adapters.update(
            {i: {**a, "in_catalogs": True} for i, a in zip(ids[task], report["adapters"], strict=True)}
        )
    suite = {
        "format": FORMAT,
        "seed": seed,
        "kind": KIND,
        "base_model": {"id": BASE_ID, "path": str(base_path), "factory": f"{__name__}:base_model"},
        "num_labels": NUM_LABELS,
        "lora": {"target_modules": ["fc1", "fc2"], "rank": RANK, "modules_to_save": ["classifier"]},
        "splits": SPLITS,
        "tasks": {t: {k: v for k, v in r.items() if k != "adapters"} for t, r in reports.items()},
        "catalogs": {"main": {"uri": str(catalog_dir), "version": catalog.version(), "adapters": ids}},
        "adapters": adapters,
    }
    manifest.write_text(json.dumps(suite, indent=1))
    return suite
