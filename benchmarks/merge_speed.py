"""merge_speed: exact low-rank ``task_arithmetic``/``svd`` vs PEFT's dense ``svd`` merge.

For K adapters of rank r on one ``d x d`` linear layer, times (same process, same inputs):

- ``peft_svd``: ``PeftModel.add_weighted_adapter(combination_type="svd")`` — forms the dense
  ``d x d`` weighted sum and runs a full SVD (PEFT's defaults);
- ``icmf_svd``: ``engine.fusion`` ``svd`` — QR of the stacked factors + ``Kr x Kr`` SVD;
- ``icmf_task_arithmetic``: ``engine.fusion`` ``task_arithmetic`` truncated to rank r.

Reports time ratios (goal: >= 20x at d = 2048) and the relative difference of the merged
``dW`` against PEFT's (goal: <= 1e-4). Writes results/merge_speed.json and .png.

The 2025 merges that decompose all K updates together, next to the exact ``svd``
(``--methods 2025``; results/merge_speed_2025.json and .png; ``--dense-max`` bounds the dims where
their full-space versions run; the merged ``dW`` must agree to <= 1e-4):

- ``icmf_core_space``: ``core_space`` (inner ``tsv``, alpha 1) in the ``Kr x Kr`` core, against
  TSV-M computed in full space (a ``d x d`` SVD per task, polar factors of ``d x Kr``); the same
  merge when ``K r <= d`` (otherwise the core is ``d x d`` and keeps ``d/K`` triplets per task);
- ``icmf_knots``: ``knots`` (TIES, density 0.2, alpha 1) from QR factors, against KnOTS in full
  space (the SVD of the dense ``d x K d`` concatenation, then the same TIES step).

``--layout llama3-8b`` times the low-rank merges on each distinct module shape of Llama-3-8B with
LoRA on all seven linears (K adapters of rank r) and totals them over its 32 layers.

    .venv/bin/python benchmarks/merge_speed.py [--dims 1024 2048 4096] [--k 8] [--rank 16]
        [--methods classic|2025|both]
    .venv/bin/python benchmarks/merge_speed.py --layout llama3-8b --k 8 --rank 16
        (results/merge_speed_llama3_8b.json)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model

from benchmarks._common import RESULTS, environment, write_json
from engine.adapters import LoraAdapter, LoraModule
from engine.adapters.presets import model_layout
from engine.fusion import fuse_adapters
from engine.fusion.subspace import ties_rows, tsv_dense


class OneLayer(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def make_inputs(d: int, k: int, rank: int, seed: int):
    """A PEFT model holding K random adapters, and the same adapters as LoraAdapters."""
    g = torch.Generator().manual_seed(seed)
    model = None
    adapters = []
    for i in range(k):
        A = torch.randn(rank, d, generator=g) / d**0.5
        B = torch.randn(d, rank, generator=g) / rank**0.5
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"])
        if model is None:
            model = get_peft_model(OneLayer(d), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
        layer = model.base_model.model.proj
        layer.lora_A[f"a{i}"].weight.data.copy_(A)
        layer.lora_B[f"a{i}"].weight.data.copy_(B)
        adapters.append(LoraAdapter({"proj": LoraModule(A, B, scaling=2.0)}, {"peft_type": "LORA"}))
    return model, adapters


def time_call(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_dim(d: int, k: int, rank: int, seed: int, repeats: int) -> dict:
    model, adapters = make_inputs(d, k, rank, seed)
    weights = [1.0 / k] * k
    names = [f"a{i}" for i in range(k)]
    counter = iter(range(1000))

    def peft_svd():
        name = f"merged{next(counter)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(names, weights, name, combination_type="svd", svd_rank=rank)
        delta = model.base_model.model.proj.get_delta_weight(name)
        model.delete_adapter(name)
        return delta

    peft_s, peft_delta = time_call(peft_svd, max(1, repeats if d < 4096 else 1))
    svd_s, svd_out = time_call(lambda: fuse_adapters(adapters, "svd", weights).adapter, repeats)
    ta_s, ta_out = time_call(
        lambda: fuse_adapters(adapters, "task_arithmetic", weights, params={"rank": rank}).adapter, repeats
    )
    reference = peft_delta.double()

    def rel(adapter):
        delta = adapter.modules["proj"].delta()
        return float((delta - reference).norm() / reference.norm())

    return {
        "d": d,
        "peft_svd_s": peft_s,
        "icmf_svd_s": svd_s,
        "icmf_task_arithmetic_s": ta_s,
        "speedup_svd": peft_s / svd_s,
        "speedup_task_arithmetic": peft_s / ta_s,
        "rel_diff_svd": rel(svd_out),
        "rel_diff_task_arithmetic": rel(ta_out),
    }


def random_adapters(d_out: int, d_in: int, k: int, rank: int, seed: int) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraAdapter(
            {
                "proj": LoraModule(
                    torch.randn(rank, d_in, generator=g) / d_in**0.5,
                    torch.randn(d_out, rank, generator=g) / rank**0.5,
                    scaling=2.0,
                )
            },
            {"peft_type": "LORA"},
        )
        for _ in range(k)
    ]


CORE_PARAMS = {"inner": "tsv", "alpha": 1.0}
KNOTS_PARAMS = {"density": 0.2, "alpha": 1.0}


def dense_tsv(adapters: list[LoraAdapter], rank: int) -> torch.Tensor:
    """TSV-M in full space: the merge Core Space computes in its core (tasks enter as K w_i dW_i = dW_i)."""
    deltas = [a.modules["proj"].delta() for a in adapters]
    return tsv_dense(deltas, keep=rank)


def dense_knots(adapters: list[LoraAdapter], density: float) -> torch.Tensor:
    """KnOTS in full space: SVD of the dense ``d_out x K d_in`` concatenation, TIES on ``diag(s) V_i^T``."""
    deltas = [a.modules["proj"].delta() for a in adapters]
    U, s, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = s > 1e-6 * s[0]
    U, s, Vh = U[:, keep], s[keep], Vh[keep]
    blocks = torch.split(Vh, deltas[0].shape[1], dim=1)
    merged = ties_rows(torch.stack([(s[:, None] * b).flatten() for b in blocks]), density)
    return U @ merged.view(s.shape[0], -1)


def bench_2025(d: int, k: int, rank: int, seed: int, repeats: int, dense: bool) -> dict:
    """core_space and knots against exact svd, and against their full-space versions when ``dense``."""
    adapters = random_adapters(d, d, k, rank, seed)
    weights = [1.0 / k] * k
    for method, params in (("svd", {}), ("core_space", CORE_PARAMS), ("knots", KNOTS_PARAMS)):
        fuse_adapters(adapters, method, weights, params)  # warm-up: registry import, first-call costs
    svd_s, _ = time_call(lambda: fuse_adapters(adapters, "svd", weights).adapter, repeats)
    core_s, core = time_call(
        lambda: fuse_adapters(adapters, "core_space", weights, CORE_PARAMS).adapter, repeats
    )
    knots_s, knots = time_call(
        lambda: fuse_adapters(adapters, "knots", weights, KNOTS_PARAMS).adapter, repeats
    )
    row = {"d": d, "icmf_svd_s": svd_s, "icmf_core_space_s": core_s, "icmf_knots_s": knots_s}
    if dense:

        def rel(adapter, reference):
            delta = adapter.modules["proj"].delta()
            return float((delta - reference).norm() / reference.norm())

        dense_tsv_s, tsv_ref = time_call(lambda: dense_tsv(adapters, rank), 1)
        dense_knots_s, knots_ref = time_call(lambda: dense_knots(adapters, KNOTS_PARAMS["density"]), 1)
        row.update(
            full_space_tsv_s=dense_tsv_s,
            full_space_knots_s=dense_knots_s,
            speedup_core_space=dense_tsv_s / core_s,
            speedup_knots=dense_knots_s / knots_s,
            rel_diff_core_space=rel(core, tsv_ref),
            rel_diff_knots=rel(knots, knots_ref),
        )
    return row


def llama3_8b_kinds() -> tuple[dict[str, tuple[int, int]], int]:
    """``(d_out, d_in)`` per module kind of Llama-3-8B with LoRA on all seven linears (the
    ``llama3-8b-all-r16`` preset, built from its published config), and its number of layers."""
    layout = model_layout("llama3-8b-all-r16")
    kinds = {m.name.rsplit(".", 1)[-1]: (m.d_out, m.d_in) for m in layout.modules}
    return kinds, len(layout.modules) // len(kinds)


def bench_layout(k: int, rank: int, seed: int, repeats: int) -> dict:
    """Seconds per module kind for the low-rank merges, and the whole model's total (x its layers)."""
    weights = [1.0 / k] * k
    per_module = {}
    warm = random_adapters(64, 64, k, rank, seed)
    for method, params in (("svd", {}), ("core_space", CORE_PARAMS), ("knots", KNOTS_PARAMS)):
        fuse_adapters(warm, method, weights, params)  # warm-up: registry import, first-call costs
    kinds, layers = llama3_8b_kinds()
    for kind, (d_out, d_in) in kinds.items():
        adapters = random_adapters(d_out, d_in, k, rank, seed)
        per_module[kind] = {
            method: time_call(
                lambda m=method, p=params, a=adapters: fuse_adapters(a, m, weights, p), repeats
            )[0]
            for method, params in (("svd", {}), ("core_space", CORE_PARAMS), ("knots", KNOTS_PARAMS))
        }
        print(f"{kind:9s} {d_out}x{d_in}: " + "  ".join(f"{m} {t:.3f}s" for m, t in per_module[kind].items()))
    totals = {m: layers * sum(row[m] for row in per_module.values()) for m in ("svd", "core_space", "knots")}
    return {
        "layout": f"llama3-8b-all-r{rank}",
        "layers": layers,
        "per_module_s": per_module,
        "model_s": totals,
    }


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = [str(r["d"]) for r in rows]
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.27
    for offset, key, label in (
        (-width, "peft_svd_s", "PEFT dense svd"),
        (0, "icmf_svd_s", "icmf svd (low-rank)"),
        (width, "icmf_task_arithmetic_s", "icmf task_arithmetic"),
    ):
        left.bar([i + offset for i in x], [r[key] for r in rows], width, label=label)
    left.set_yscale("log")
    left.set_xticks(list(x), dims)
    left.set_xlabel("d (layer is d x d)")
    left.set_ylabel("seconds per merge (log)")
    left.legend()
    right.bar([i - 0.2 for i in x], [r["speedup_svd"] for r in rows], 0.4, label="svd")
    right.bar(
        [i + 0.2 for i in x], [r["speedup_task_arithmetic"] for r in rows], 0.4, label="task_arithmetic"
    )
    right.axhline(20, color="red", linestyle="--", label="goal 20x")
    right.set_xticks(list(x), dims)
    right.set_xlabel("d")
    right.set_ylabel("speed-up vs PEFT dense svd")
    right.legend()
    fig.suptitle("merge_speed: K adapters, rank r, one d x d layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_2025(rows_2025: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, spectral = plt.subplots(figsize=(7, 4))
    width = 0.16
    for n, (key, label) in enumerate(
        (
            ("icmf_svd_s", "icmf svd"),
            ("icmf_core_space_s", "icmf core_space (tsv)"),
            ("full_space_tsv_s", "TSV-M in full space"),
            ("icmf_knots_s", "icmf knots (ties)"),
            ("full_space_knots_s", "KnOTS in full space"),
        )
    ):
        xs = [i + (n - 2) * width for i, r in enumerate(rows_2025) if key in r]
        spectral.bar(xs, [r[key] for r in rows_2025 if key in r], width, label=label)
    spectral.set_yscale("log")
    spectral.set_xticks(range(len(rows_2025)), [str(r["d"]) for r in rows_2025])
    spectral.set_xlabel("d")
    spectral.set_ylabel("seconds per merge (log)")
    spectral.set_title("2025 merges: low-rank vs full space")
    spectral.legend(fontsize=7)
    fig.suptitle("merge_speed: K adapters, rank r, one d x d layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dense-max", type=int, default=2048, help="largest d where the full-space 2025 merges also run"
    )
    parser.add_argument("--layout", choices=("llama3-8b",), help="time the low-rank merges on a model layout")
    parser.add_argument(
        "--methods",
        choices=("classic", "2025", "both"),
        default="both",
        help="classic: PEFT svd vs icmf svd/task_arithmetic (merge_speed.json); 2025: core_space and "
        "knots (merge_speed_2025.json)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (on a shared, oversubscribed machine 1 avoids OpenMP spin-waiting)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layout:
        result = {"benchmark": "merge_speed_layout", "k": args.k, "rank": args.rank, "seed": args.seed}
        result.update(bench_layout(args.k, args.rank, args.seed, args.repeats))
        result["environment"] = environment()
        write_json("merge_speed_llama3_8b", result)
        print(f"whole model (32 layers): {result['model_s']}")
        return
    if args.methods in ("classic", "both"):
        rows = []
        for d in args.dims:
            row = bench_dim(d, args.k, args.rank, args.seed, args.repeats)
            rows.append(row)
            print(
                f"d={d:5d}  peft svd {row['peft_svd_s']:.3f}s  icmf svd {row['icmf_svd_s']:.4f}s "
                f"({row['speedup_svd']:.0f}x, rel diff {row['rel_diff_svd']:.1e})  task_arithmetic "
                f"{row['icmf_task_arithmetic_s']:.4f}s ({row['speedup_task_arithmetic']:.0f}x, "
                f"rel diff {row['rel_diff_task_arithmetic']:.1e})"
            )
        result = {"benchmark": "merge_speed", "k": args.k, "rank": args.rank, "seed": args.seed, "rows": rows}
        result["environment"] = environment()
        write_json("merge_speed", result)
        plot(rows, RESULTS / "merge_speed.png")
        print(f"wrote {RESULTS / 'merge_speed.json'} and .png")
    if args.methods in ("2025", "both"):
        rows_2025 = []
        for d in args.dims:
            row = bench_2025(d, args.k, args.rank, args.seed, args.repeats, dense=d <= args.dense_max)
            rows_2025.append(row)
            print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        result = {"benchmark": "merge_speed_2025", "k": args.k, "rank": args.rank, "seed": args.seed}
        result.update(rows=rows_2025, environment=environment())
        write_json("merge_speed_2025", result)
        plot_2025(rows_2025, RESULTS / "merge_speed_2025.png")
        print(f"wrote {RESULTS / 'merge_speed_2025.json'} and .png")


if __name__ == "__main__":
    main()
