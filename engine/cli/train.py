"""``icmf train CONFIG.yaml``: meta-train an F-VAE on a catalog with Ray Train."""

from __future__ import annotations


def register(commands) -> None:
    p = commands.add_parser("train", help="meta-train the F-VAE on a catalog (Ray Train)")
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see README)")
    p.add_argument("--resume", action="store_true", help="continue the latest run under the config's out")
    p.add_argument("--workers", type=int, help="training workers (overrides train.workers)")
    p.set_defaults(func=train)


def train(args) -> int:
    from engine._output import console, training_progress
    from engine._ray import ensure_ray
    from engine.meta.config import load_config
    from engine.meta.preflight import plan_training
    from engine.meta.train import fvae_config, train_fvae

    cfg = load_config(args.config)
    plan = plan_training(cfg, workers=args.workers)  # every fault listed before Ray starts
    fvae = fvae_config(cfg, plan.layout)
    space = f", reconstructing {fvae.recon_space}" if fvae.arch == "tokens" else ""
    console.print(
        f"F-VAE {fvae.arch}{' (auto)' if cfg.fvae.arch == 'auto' else ''}{space}: "
        f"{plan.memory.parameters / 1e6:.1f} M parameters for N = {plan.layout.size:,}; "
        f"a training worker needs about {plan.memory.describe()}"
    )
    ensure_ray()
    with training_progress(cfg.train.steps, print_reports=True) as show:
        path = train_fvae(cfg, resume=args.resume, plan=plan, progress=show)
    console.print(f"trained F-VAE written to {path}")
    return 0
