"""Losses, metrics, hidden-state pooling and gap closure (pure tensor math, no I/O, no models)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt and padding)
GAP_EPS = 1e-8  # below this, L_base - L_t is treated as zero and G is undefined


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood of every labelled position.

    Position ``p`` of ``logits`` predicts token ``p + 1``; positions whose label is
    ``IGNORE_INDEX`` (prompt, padding) get zero loss and ``mask`` False.

    Args:
        logits: ``[n, T, V]``.
        labels: ``[n, T]`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(nll, mask)``: ``[n, T - 1]`` float32 (differentiable) and ``[n, T - 1]`` bool.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
    )
    return nll * mask, mask


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all completion tokens of a batch (token-weighted, like transformers' ``labels``).

    Args:
        logits: ``[n, T, V]``.
        labels: ``[n, T]``, ``IGNORE_INDEX`` outside completions.

    Returns:
        Scalar tensor (differentiable).
    """
    nll, mask = shifted_token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def teacher_forced_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether the argmax at every completion position is the completion token.

    This is exactly "greedy decoding from the prompt reproduces the completion's tokens": each
    greedy step sees the true prefix as long as all earlier steps were right.

    Args:
        logits: ``[n, T, V]``.
        labels: ``[n, T]``.

    Returns:
        ``[n]`` bool (False for an example without completion tokens).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(dim=-1) == targets) | ~mask
    return correct.all(dim=1) & mask.any(dim=1)


def classification_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy.

    Args:
        logits: ``[n, C]``.
        labels: ``[n]`` class ids.

    Returns:
        ``[n]`` float32.
    """
    return F.cross_entropy(logits.float(), labels, reduction="none")


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick one position per example.

    Args:
        hidden: ``[n, T, d]``.
        positions: ``[n]`` indices in ``[0, T)``.

    Returns:
        ``[n, d]``.
    """
    index = positions.to(hidden.device).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set.

    Args:
        hidden: ``[n, T, d]``.
        mask: ``[n, T]`` (bool or 0/1).

    Returns:
        ``[n, d]``.
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [n, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def finalize_lm(sums: Mapping[str, float]) -> dict[str, float]:
    """Causal-LM metrics from accumulated sums (``nll``, ``tokens``, ``exact``, ``examples``).

    ``loss`` is the token-weighted mean NLL, ``perplexity = exp(loss)``, ``exact_match`` the
    fraction of examples whose completion is reproduced exactly (see
    :func:`teacher_forced_exact_match`).
    """
    loss = sums["nll"] / max(sums["tokens"], 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows float64 beyond ~709
        "exact_match": sums["exact"] / max(sums["examples"], 1),
        "examples": int(sums["examples"]),
        "tokens": int(sums["tokens"]),
    }


def classification_example_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example's share of the sums that :func:`finalize_classification` turns into metrics.

    Args:
        logits: ``[n, C]``.
        labels: ``[n]`` class ids.

    Returns:
        ``nll``, ``correct``, ``examples``: ``[n]`` float64 each.
    """
    return {
        "nll": classification_nll(logits, labels).double(),
        "correct": (logits.argmax(dim=-1) == labels).double(),
        "examples": torch.ones(len(labels), dtype=torch.float64),
    }


def lm_example_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example's share of the sums that :func:`finalize_lm` turns into metrics.

    Args:
        logits: ``[n, T, V]``.
        labels: ``[n, T]`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``nll``, ``tokens``, ``exact``, ``examples``: ``[n]`` float64 each.
    """
    nll, mask = shifted_token_nll(logits, labels)
    return {
        "nll": nll.double().sum(dim=1),
        "tokens": mask.sum(dim=1).double(),
        "exact": teacher_forced_exact_match(logits, labels).double(),
        "examples": torch.ones(len(labels), dtype=torch.float64),
    }


def finalize_classification(sums: Mapping[str, float]) -> dict[str, float]:
    """Classification metrics from sums (``nll``, ``correct``, ``examples``): mean loss, accuracy."""
    n = max(sums["examples"], 1)
    return {"loss": sums["nll"] / n, "accuracy": sums["correct"] / n, "examples": int(sums["examples"])}


def gap_closure(l_base: float, l_own: float, l_fused: float, eps: float = GAP_EPS) -> float | None:
    """``G = (L_base - L_fused) / (L_base - L_own)`` (docs/design.md §4).

    1.0 = the fused adapter is as good as the task's own adapter, 0.0 = as good as no adapter,
    negative = worse than no adapter.

    Returns:
        G, or None when ``L_base - L_own <= eps`` (the own adapter does not improve on the base,
        so there is no gap to close).
    """
    denominator = l_base - l_own
    if not denominator > eps:
        return None
    return (l_base - l_fused) / denominator


def summarize_gaps(gaps: Mapping[str, float | None]) -> tuple[float | None, float | None, str | None]:
    """``(mean G, worst G, worst task)`` over the tasks whose G is defined (all None if none is)."""
    defined = {task: g for task, g in gaps.items() if g is not None}
    if not defined:
        return None, None, None
    worst_task = min(defined, key=defined.__getitem__)
    return sum(defined.values()) / len(defined), defined[worst_task], worst_task
