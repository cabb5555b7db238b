"""Does the F-VAE reconstruct? A fast in-process diagnostic (no Ray).

Builds the F-VAE and the per-slot normaliser from the engine's APIs, trains it on one lab suite's
catalog adapters for a few hundred episodes on reconstruction + beta KL only (episodes as in
meta-training: up to ``--batch`` adapters, one per task), and reports the relative reconstruction
error ``||D(mu) - x||^2 / ||x||^2`` (normalised space, present slots) and the cosine to the input on

* training adapters,
* held-out adapters of the training tasks (``--holdout`` per task, never trained on; or with
  ``--holdout-run run0`` every checkpoint of that run: a new training run of a known task),
* adapters of the suite's unseen tasks (kept out as the quality benchmark keeps them out),

plus the KL and how much the output moves when ``z`` does (``D(mu)`` vs ``D(0)``). ``pca`` rows give
the linear reference: the best rank-``k`` linear code fitted on the training adapters.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.fvae_recon --suite encoder \
        --set norm=none --set recon_reduction=sum [--pca] [--name fvae_geometry_encoder]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks._common import RESULTS, environment, write_json
from benchmarks.quality.icm import SUITE_TRAINING, unseen_tasks
from engine.catalog import Catalog
from engine.fusion.icm.projection import project
from engine.fvae.config import FVAEConfig, resolve_arch
from engine.fvae.model import FVAE
from engine.fvae.normalize import SlotNormalizer
from engine.fvae.recon import relative_error
from engine.fvae.tokens import ModuleTokens, delta_measures
from engine.meta.config import TrainSection
from engine.meta.schedule import learning_rate
from engine.meta.step import slot_mask

LAB = RESULTS / "lab" / "standard-seed0"


def load_suite(suite: str, holdout: int, seed: int, holdout_run: str | None = None):
    """The suite's catalog adapters and their split: ``(layout, stats, x [n, N], masks [n, M],
    tasks [n], split [n])`` with ``split`` one of ``train``, ``heldout``, ``unseen``. Held out per
    training task: ``holdout`` random adapters, or with ``holdout_run`` every checkpoint of that
    training run (``run0``): a new run of a known task, none of whose checkpoints was trained on."""
    catalog = Catalog(LAB / suite / "catalogs" / "main")
    layout = catalog.layout()
    stats = catalog.stats(layout.layout_id)
    if stats is None or stats.manifest_version != catalog.version():
        raise SystemExit(f"{catalog.uri}: statistics missing or stale; run `icmf catalog stats` first")
    runs = {}
    if holdout_run:
        lab = json.loads((LAB / "lab.json").read_text())["suites"][suite]["adapters"]
        runs = {i: info["run"] for i, info in lab.items()}
    x, masks, tasks, ids = [], [], [], []
    for entry in catalog.entries():
        ids.append(entry["id"])
        weights, mask, _ = catalog.read_vector(entry["id"])
        x.append(torch.from_numpy(weights.copy()))
        masks.append(torch.from_numpy(mask))
        tasks.append(entry["task"])
    x, masks, tasks = torch.stack(x), torch.stack(masks), np.array(tasks)
    unseen = unseen_tasks(suite, sorted(set(tasks)), seed)
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(tasks), dtype=object)
    for task in sorted(set(tasks)):
        index = np.flatnonzero(tasks == task)
        if task in unseen:
            split[index] = "unseen"
        else:
            if holdout_run:
                split[[i for i in index if runs.get(ids[i]) == holdout_run]] = "heldout"
            else:
                split[rng.choice(index, holdout, replace=False)] = "heldout"
    return layout, stats, x, masks, tasks, split


def evaluate(model, normalizer, layout, x, masks, cond, rows, slot_normalizer=None) -> dict[str, float]:
    """``rel_err``: the error the F-VAE is trained on and gated by (its normalised space, per slot
    or per module update); ``rel_err_slot``: in the per-slot normalised space (``slot_normalizer``)
    and ``rel_err_delta``: of the modules' updates ``B A`` (:func:`delta_errors`), where every
    arch's figures compare."""
    xn = normalizer.normalize(x[rows])
    weight = slot_mask(masks[rows], layout).float()
    with torch.no_grad():
        model.eval()
        mu, logvar = model.encode(xn, cond[rows])
        out = model.decode(mu, cond[rows])
        at_zero = model.decode(torch.zeros_like(mu), cond[rows])
        kl = float((-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean())
    err, _ = model.reconstruction_measures(out, xn, weight.bool())
    cos = (
        (out * xn * weight).sum(1) / ((out**2 * weight).sum(1).sqrt() * (xn**2 * weight).sum(1).sqrt())
    ).clamp(-1, 1)
    moved = ((out - at_zero) ** 2 * weight).sum(1) / ((out**2) * weight).sum(1).clamp_min(1e-12)
    row = {"rel_err": float(err.mean()), "cos": float(cos.mean()), "kl": kl, "z_moves": float(moved.mean())}
    row["rel_err_delta"] = float(
        delta_errors(layout, normalizer.denormalize(out), x[rows], masks[rows]).mean()
    )
    if slot_normalizer is not None:
        in_slots = slot_normalizer.normalize(normalizer.denormalize(out))
        row["rel_err_slot"] = float(
            relative_error(in_slots, slot_normalizer.normalize(x[rows]), weight).mean()
        )
    return row


def pca_reference(normalizer, layout, x, masks, split, ks=(8, 32, 10_000)) -> dict[str, dict[str, float]]:
    xn = normalizer.normalize(x) * slot_mask(masks, layout).float()
    train = xn[torch.as_tensor(split == "train")].double()
    center = train.mean(0)
    _, _, vt = torch.linalg.svd(train - center, full_matrices=False)
    out = {}
    for k in ks:
        basis = vt[: min(k, vt.shape[0])]
        row = {}
        for part in ("train", "heldout", "unseen"):
            h = xn[torch.as_tensor(split == part)].double()
            r = (h - center) - ((h - center) @ basis.T) @ basis
            row[part] = float(((r**2).sum(1) / (h**2).sum(1)).mean())
        out[f"pca{min(k, vt.shape[0])}"] = row
    return out


def delta_errors(layout, x_hat: torch.Tensor, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[n]`` per adapter, the mean over its present modules of the relative error of the module's
    update, ``||B_hat A_hat - B A||^2 / ||B A||^2`` (weight space, gauge-free)."""
    blocks = ModuleTokens.from_layout(layout).blocks
    errors = torch.stack(
        [delta_measures(*blocks(x_hat, m), *blocks(x, m))[0] for m in range(layout.num_modules)], dim=1
    )
    present = masks.to(errors.dtype)
    return (errors * present).sum(1) / present.sum(1).clamp_min(1.0)


def pca_delta_reference(grams: torch.Tensor, masks, split, ks=(8, 32, 10_000)) -> dict[str, dict[str, float]]:
    """The linear reference of :func:`pca_reference` for the updates: PCA of the training adapters'
    dense updates ``B A`` (every module's concatenated, centred on the training mean), scored as
    :func:`delta_errors` scores an F-VAE (each module's residual over its update's norm).

    Computed from ``grams``, the per-module Gram matrices of the updates
    (:func:`module_delta_grams`, ``[M, n, n]``, uncentred), never from the dense updates: a
    residual's norm per module is a quadratic form in those Grams (kernel PCA), so memory is
    ``modules x n x n``, not ``n x sum(d_out x d_in)``: the dense updates of a lab catalog at an
    all-linear layout do not fit in memory. Components the training
    updates do not span (zero singular values) are left out."""
    n = grams.shape[1]
    train = torch.as_tensor(split == "train")
    weights = train.double() / train.sum()
    centre = torch.eye(n, dtype=torch.float64) - weights[None, :]  # f_i - mean of the training f
    centred = centre @ grams @ centre.T  # [M, n, n]
    total = centred.sum(0)
    t = torch.nonzero(train).flatten()
    eigenvalues, vectors = torch.linalg.eigh(total[t][:, t])
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    spanned = eigenvalues > eigenvalues[0] * 1e-12
    to_train = centred[:, :, t]  # [M, n, |T|]
    among_train = to_train[:, t]  # [M, |T|, |T|]
    out = {}
    for k in ks:
        keep = min(k, len(t))
        use = (torch.arange(len(eigenvalues)) < keep) & spanned
        u, lam = vectors[:, use], eigenvalues[use]
        # Projection of row i onto the top components, written as training rows' combination:
        # p_i = sum_j beta[i, j] f_j (centred), beta = K[i, T] U diag(1 / lambda) U^T.
        beta = total[:, t] @ u @ torch.diag(1.0 / lam) @ u.T  # [n, |T|]
        cross = torch.einsum("mit,it->mi", to_train, beta)  # <f_i, p_i> per module
        within = torch.einsum("it,mts,is->mi", beta, among_train, beta)  # ||p_i||^2
        residual = centred.diagonal(dim1=1, dim2=2) - 2 * cross + within  # [M, n]
        errors = (residual.clamp_min(0.0) / grams.diagonal(dim1=1, dim2=2).clamp_min(1e-24)).T
        row = {}
        for part in ("train", "heldout", "unseen"):
            rows = np.flatnonzero(split == part)
            present = masks[rows].double()
            row[part] = float(((errors[rows] * present).sum(1) / present.sum(1)).mean())
        out[f"pca{keep}"] = row
    return out


def adapter_geometry(normalizer, layout, x, masks, tasks, grams: torch.Tensor) -> dict[str, float]:
    """Mean cosine between normalised adapters (present slots) of the same task and of different
    tasks: how much of an adapter a code of its task could predict at all. Adapters of one task
    from different seeds share little in weight space (each LoRA's factors live in the subspace
    its random initialisation picked), which bounds what any F-VAE reconstructs of an adapter it
    did not train on. ``grams``: :func:`module_delta_grams` of ``x``."""
    xn = normalizer.normalize(x) * slot_mask(masks, layout).float()
    unit = torch.nn.functional.normalize(xn.double(), dim=1)
    cos = unit @ unit.T
    same = torch.as_tensor(tasks[:, None] == tasks[None, :])
    off_diagonal = ~torch.eye(len(tasks), dtype=torch.bool)
    delta = grams.sum(0)  # summed over modules
    norms = delta.diagonal().clamp_min(1e-24).sqrt()
    delta_cos = delta / (norms[:, None] * norms[None, :])
    return {
        "within_task_cos": float(cos[same & off_diagonal].mean()),
        "cross_task_cos": float(cos[~same].mean()),
        # Gauge-free: the cosine of the weight updates themselves, sum over modules of B A.
        "within_task_delta_cos": float(delta_cos[same & off_diagonal].mean()),
        "cross_task_delta_cos": float(delta_cos[~same].mean()),
    }


def module_delta_grams(layout, x: torch.Tensor) -> torch.Tensor:
    """``[M, n, n]``: per module, the Frobenius inner products ``<B_i A_i, B_j A_j>`` of every pair
    of the adapters' updates, from the factor rows (the all-pairs form of
    :func:`engine.fvae.tokens.delta_inner`: two ``r x r`` Grams per pair, never a dense update)."""
    blocks = ModuleTokens.from_layout(layout).blocks
    x = x.double()
    grams = []
    for m in range(layout.num_modules):
        a, b = blocks(x, m)  # [n, r, d_in], [n, r, d_out]
        pairs = torch.einsum("ird,jsd->ijrs", b, b) * torch.einsum("ird,jsd->ijrs", a, a)
        grams.append(pairs.sum(dim=(2, 3)))
    return torch.stack(grams)


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITE_TRAINING), default="encoder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="default: the suite's meta-training lr")
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="engine.meta.schedule's rate per step (cosine: warm-up, then down to a tenth of --lr)",
    )
    parser.add_argument("--batch", type=int, default=6, help="adapters per episode (one per task)")
    parser.add_argument("--holdout", type=int, default=2, help="held-out adapters per training task")
    parser.add_argument(
        "--holdout-run", default=None, help="hold out this training run of every training task (e.g. run0)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="FVAEConfig field=value (repeatable)")
    parser.add_argument("--pca", action="store_true", help="also print the linear (PCA) reference")
    parser.add_argument("--every", type=int, default=100, help="print progress every this many steps")
    parser.add_argument("--name", default=None, help="also write results/<name>.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    suite_fvae = dict(SUITE_TRAINING[args.suite]["fvae"])
    suite_fvae.update({k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)})
    layout, stats, x, masks, tasks, split = load_suite(args.suite, args.holdout, args.seed, args.holdout_run)
    suite_fvae["arch"] = resolve_arch(
        suite_fvae.get("arch", "auto"), layout.size, suite_fvae.get("hidden", FVAEConfig.hidden)
    )
    if suite_fvae["arch"] == "tokens":
        suite_fvae["layout"] = layout.to_dict()
    config = FVAEConfig(input_dim=layout.size, cond_dim=64, **suite_fvae)
    normalizer = SlotNormalizer.for_config(config, layout, stats.mean, stats.std, stats.count)
    slot_normalizer = (
        SlotNormalizer.from_stats(stats.mean, stats.std, stats.count) if config.arch == "tokens" else None
    )
    # Adapter-derived task vectors from the training adapters (as meta-training derives them).
    xn_all = normalizer.normalize(x)
    vectors = {
        t: project(xn_all[torch.as_tensor((tasks == t) & (split == "train"))].mean(0), 64, args.seed)
        for t in sorted(set(tasks))
        if ((tasks == t) & (split == "train")).any()
    }
    for t in sorted(set(tasks) - set(vectors)):  # unseen: the vector of their adapters' mean
        vectors[t] = project(xn_all[torch.as_tensor(tasks == t)].mean(0), 64, args.seed)
    cond = torch.stack([vectors[t] for t in tasks])

    model = FVAE(config)
    lr = args.lr or SUITE_TRAINING[args.suite]["train"].get("lr", 2e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = TrainSection(steps=args.steps, lr=lr, lr_schedule=args.lr_schedule)
    train_tasks = sorted({t for t, s in zip(tasks, split, strict=True) if s == "train"})
    by_task = {t: np.flatnonzero((tasks == t) & (split == "train")) for t in train_tasks}
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.suite}: N={layout.size}, {len(train_tasks)} training tasks, {int((split == 'train').sum())} "
        f"training / {int((split == 'heldout').sum())} held-out / {int((split == 'unseen').sum())} unseen adapters; "
        f"{json.dumps(config.to_dict())}; lr {lr} ({args.lr_schedule})",
        flush=True,
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        chosen = rng.choice(train_tasks, min(args.batch, len(train_tasks)), replace=False)
        rows = np.array([rng.choice(by_task[t]) for t in chosen])
        xn = normalizer.normalize(x[rows])
        model.train()
        out = model(xn, cond[rows])
        terms = model.loss(out, xn, slot_mask(masks[rows], layout))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule)
        optimizer.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            print(
                f"  step {step}: recon {float(terms['recon'].detach()):.3f} kl {float(terms['kl'].detach()):.1f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    result = {
        "suite": args.suite,
        "config": config.to_dict(),
        "steps": args.steps,
        "lr": lr,
        "lr_schedule": args.lr_schedule,
        "holdout": args.holdout_run or args.holdout,
    }
    for part in ("train", "heldout", "unseen"):
        rows = np.flatnonzero(split == part)
        result[part] = evaluate(model, normalizer, layout, x, masks, cond, rows, slot_normalizer)
        print(f"  {part:8s} " + " ".join(f"{k} {v:.3f}" for k, v in result[part].items()))
    grams = module_delta_grams(layout, x)
    result["geometry"] = adapter_geometry(normalizer, layout, x, masks, tasks, grams)
    print("  geometry " + " ".join(f"{k} {v:.3f}" for k, v in result["geometry"].items()))
    if args.pca:
        result["pca"] = pca_reference(normalizer, layout, x, masks, split)
        result["pca_delta"] = pca_delta_reference(grams, masks, split)
        for kind in ("pca", "pca_delta"):
            for name, row in result[kind].items():
                print(f"  {kind} {name:8s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print(f"  seconds {time.perf_counter() - start:.0f}")
    if args.name:
        write_json(args.name, {**result, "seed": args.seed, "environment": environment()})
    return result


if __name__ == "__main__":
    main()
