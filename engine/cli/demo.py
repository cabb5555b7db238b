"""``icmf demo``: run the pipeline end to end on an embedded local Ray."""

from __future__ import annotations

from pathlib import Path


def register(commands) -> None:
    p = commands.add_parser("demo", help="run the end-to-end demo on an embedded local Ray")
    p.add_argument("--workdir", default="icmf-demo", help="where artifacts go (default ./icmf-demo)")
    p.add_argument("--per-task", type=int, default=2, help="adapters to train per task")
    p.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    p.add_argument("--fvae-steps", type=int, default=150, help="F-VAE meta-training steps (0 skips ICM)")
    p.set_defaults(func=demo, log_dir_of=lambda args: Path(args.workdir) / "logs")


def demo(args) -> int:
    from engine.demo.run import run_demo

    run_demo(Path(args.workdir), per_task=args.per_task, steps=args.steps, fvae_steps=args.fvae_steps)
    return 0
