"""Hyperparameters picked on the tasks' support examples, as the merging papers pick them on
validation data.

A method declares its knobs (scaling ``alpha``, a density, a shrinkage...) with the paper's default
and a grid over the range its authors searched. A knob the caller sets is used as given. A knob
left unset is searched on the grid when the fusion context has ``loss_fn`` (``LoraAdapter ->
float``, the fused candidate's mean loss on the few-shot support examples of the fused tasks, the
callable ``lorahub`` minimises, by default the few-shot ``objective``'s; never the eval split), and
takes the paper's default otherwise. What was used, and where it came from,
goes to the provenance's ``details``.

``alpha`` scales the whole merged update, so its candidates cost one fusion in total: the method
builds the merge at ``alpha = 1`` and the candidates rescale the ``B`` factors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.adapters.lora import LoraAdapter, LoraModule


@dataclass(frozen=True)
class Knob:
    """A hyperparameter: its name, the paper's default, and the grid searched on support examples."""

    name: str
    default: float
    grid: tuple[float, ...]


def support_wanted(*knob_values: float | None) -> tuple[str, ...]:
    """A params model's ``wanted_context``: the support loss while any of its knobs is unset."""
    return ("loss_fn",) if any(value is None for value in knob_values) else ()


def scaled(adapter: LoraAdapter, alpha: float) -> LoraAdapter:
    """``alpha`` times every module's update (the ``B`` factors are scaled)."""
    modules = {n: LoraModule(m.A, m.B * alpha, m.scaling) for n, m in adapter.modules.items()}
    return LoraAdapter(modules=modules, config=dict(adapter.config), source=adapter.source)


def pick_on_support(
    loss_fn: Callable[[LoraAdapter], float] | None,
    params: Any,
    alpha: Knob | None,
    build: Callable[[dict[str, float]], LoraAdapter],
    knobs: tuple[Knob, ...] = (),
) -> tuple[LoraAdapter, dict]:
    """Fuse with ``params``' knobs, searching the unset ones on the support examples if possible.

    Args:
        loss_fn: the context's few-shot support loss; enables the search (None: defaults).
        params: the method's parameters; a knob whose attribute is ``None`` is unset.
        alpha: the global scale (applied by rescaling, not passed to ``build``); None for a
            method without one.
        build: ``values of the other knobs -> merged adapter at alpha = 1``.
        knobs: the other knobs (each unset one multiplies the number of fusions by its grid size).

    Returns:
        ``(fused adapter, details)``: details record the values used, their source (``given``,
        ``support`` or ``default``) and, after a search, every candidate's loss.
    """
    every = (*knobs, alpha) if alpha is not None else knobs
    given = {k.name: getattr(params, k.name) for k in every if getattr(params, k.name) is not None}
    unset = [k for k in every if k.name not in given]
    source = {name: "given" for name in given}

    def scale(values: dict[str, float]) -> float:
        return 1.0 if alpha is None else values[alpha.name]

    def structural(values: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in values.items() if alpha is None or k != alpha.name}

    if not unset or loss_fn is None:
        values = {**{k.name: k.default for k in unset}, **given}
        source.update({k.name: "default" for k in unset})
        fused = scaled(build(structural(values)), scale(values))
        return fused, {"hyperparameters": values, "source": source}
    searched = [k for k in knobs if k.name not in given]
    if alpha is None:
        scales = [{}]
    else:
        grid = [given[alpha.name]] if alpha.name in given else list(alpha.grid)
        scales = [{alpha.name: a} for a in grid]
    trials, best = [], None
    for combination in itertools.product(*(k.grid for k in searched)):
        others = {**{k.name: v for k, v in zip(searched, combination, strict=True)}, **structural(given)}
        base = build(others)
        for choice in scales:
            values = {**others, **choice}
            candidate = scaled(base, scale(values))
            loss = float(loss_fn(candidate))
            loss = loss if math.isfinite(loss) else math.inf  # a diverging candidate never wins
            trials.append({**values, "loss": loss})
            if best is None or loss < best[0]:
                best = (loss, candidate, values)
    loss, fused, values = best
    source.update({k.name: "support" for k in unset})
    return fused, {"hyperparameters": values, "source": source, "support_loss": loss, "candidates": trials}
