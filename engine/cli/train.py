"""``icmf train CONFIG.yaml``: meta-train an F-VAE on a catalog with Ray Train."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def register(commands) -> None:
    p = commands.add_parser("train", help="meta-train the F-VAE on a catalog (Ray Train)")
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see README)")
    p.add_argument("--resume", action="store_true", help="continue the latest run under the config's out")
    p.add_argument("--workers", type=int, help="training workers (overrides train.workers)")
    p.set_defaults(func=train)


def report_line(report: dict[str, Any]) -> str:
    """One training report as the user reads it."""
    skipped = f" ({report['skipped']} spike(s) skipped)" if report.get("skipped") else ""
    return (
        f"step {report['step']}/{report['steps']} loss {report['loss']:.4f} recon {report['recon']:.4f} "
        f"kl {report['kl']:.2f} fusion {report['fusion']:.4f} {report['episodes_per_s']:.1f} episodes/s{skipped}"
    )


@contextmanager
def training_progress(steps: int, print_reports: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on a terminal; elsewhere (logs, CI) one line per report if ``print_reports``."""
    from engine._output import console, progress_bar

    with progress_bar("meta-train the F-VAE", total=steps) as advance:
        done = 0

        def show(report: dict[str, Any]) -> None:
            nonlocal done
            advance(report["step"] - done)
            done = report["step"]
            if print_reports and not console.is_terminal:
                console.print(report_line(report), highlight=False)

        yield show


def train(args) -> int:
    from engine._output import console
    from engine._ray import ensure_ray
    from engine.meta.config import load_config
    from engine.meta.train import train_fvae

    cfg = load_config(args.config)
    ensure_ray()
    with training_progress(cfg.train.steps, print_reports=True) as show:
        path = train_fvae(cfg, resume=args.resume, workers=args.workers, progress=show)
    console.print(f"trained F-VAE written to {path}")
    return 0
