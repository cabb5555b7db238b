"""``lorahub``: gradient-free search of the fusion weights on few-shot examples (LoRAHub).

LoRAHub (Huang et al., 2024) composes LoRAs with weights ``w`` and searches ``w`` without
gradients to minimise ``few-shot loss(w) + alpha * sum |w_i|``. Its reference code sums the A
factors and the B factors separately (``compose="factors"``, ranks zero-padded); this project
defaults to the exact weighted sum of the deltas (``compose="delta"``, any ranks). Either way the
candidate targets the union of the inputs' modules (see :mod:`engine.fusion.modulewise`). The search is a small
(mu, lambda) evolution strategy with step-size adaptation (the reference uses nevergrad's Shiwa),
seeded by the fusion's ``seed``, within ``[lower, upper]`` per weight.

The method needs the context's ``loss_fn``: ``LoraAdapter -> float``, the fused candidate's mean
loss on the few-shot examples of all tasks (the few-shot objective's, by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pydantic

from engine.adapters.lora import LoraAdapter
from engine.fusion.registry import FusionInputs, fusion_method


class LoraHubParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    budget: int = pydantic.Field(40, gt=0, description="loss evaluations (LoRAHub's max_inference_step)")
    l1: float = pydantic.Field(0.05, ge=0, description="weight of the L1 penalty on w")
    lower: float = -1.5
    upper: float = 1.5
    sigma: float = pydantic.Field(0.5, gt=0, description="initial search step")
    compose: Literal["delta", "factors"] = "delta"


def evolve(
    objective: Callable[[np.ndarray], float],
    start: np.ndarray,
    budget: int,
    sigma: float,
    bounds: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, list[float]]:
    """Minimise ``objective`` with a (mu, lambda) evolution strategy within ``bounds``.

    Returns:
        ``(best point, best value, best-so-far value after each evaluation)``.
    """
    dim = start.size
    popsize = max(4, 4 + int(3 * np.log(dim)))
    mu = popsize // 2
    recombination = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    recombination /= recombination.sum()
    mean, best_x = start.copy(), start.copy()
    best_f = objective(start)
    history = [best_f]
    while len(history) < budget:
        count = min(popsize, budget - len(history))
        points = np.clip(mean + sigma * rng.standard_normal((count, dim)), *bounds)
        values = np.array([objective(p) for p in points])
        for v in values:
            history.append(min(history[-1], float(v)))
        order = np.argsort(values)
        if values[order[0]] < best_f:
            best_f, best_x = float(values[order[0]]), points[order[0]].copy()
        elite = points[order[: min(mu, count)]]
        weights = recombination[: len(elite)] / recombination[: len(elite)].sum()
        improved = (values < best_f + 1e-12).mean()
        mean = weights @ elite
        sigma *= np.exp(0.6 * (improved - 0.2))  # 1/5th success rule, smoothed
    return best_x, best_f, history


@fusion_method("lorahub", LoraHubParams, reference="https://arxiv.org/abs/2307.13269 (LoraHub)")
def lorahub(
    inputs: FusionInputs, params: LoraHubParams, *, loss_fn: Callable[[LoraAdapter], float]
) -> tuple[LoraAdapter, dict]:
    """Search the fusion weights on few-shot examples without gradients (LoRAHub)."""
    from engine.fusion.registry import get_method

    compose = get_method("cat" if params.compose == "delta" else "linear")

    def build(w: np.ndarray) -> LoraAdapter:
        candidate = FusionInputs(inputs.adapters, [float(x) for x in w], inputs.tasks, inputs.seed)
        adapter, _ = compose.fuse(candidate, compose.parse_params({}))
        return adapter

    def objective(w: np.ndarray) -> float:
        return float(loss_fn(build(w))) + params.l1 * float(np.abs(w).sum())

    rng = np.random.default_rng(inputs.seed)
    start = np.asarray(inputs.weights, dtype=np.float64)
    best, best_value, history = evolve(
        objective, start, params.budget, params.sigma, (params.lower, params.upper), rng
    )
    details = {
        "weights": best.tolist(),
        "objective": best_value,
        "start_objective": history[0],
        "evaluations": len(history),
    }
    return build(best), details
