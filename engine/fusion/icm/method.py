"""``icm``: ICM-Fusion — fusion by task-vector arithmetic in the latent space of a meta-trained
F-VAE (docs/design.md §2.6–2.7).

Each input adapter is put in the F-VAE's layout, normalised and encoded with its task's vector
(the one seen in meta-training, or — for a task the F-VAE never saw — the vector derived from
its adapter, so unseen tasks need only their adapter); the latents and task vectors are combined
(conflict projection, weights ``alpha`` = the fusion weights); the fused code is decoded,
de-normalised and — by default (``anchor``) — anchored on the inputs: each input's decoder
reconstruction error is added back, so a single input comes back exactly and an F-VAE whose
decoder ignores its code degrades to task arithmetic rather than to whatever the decoder emits.
The result is written back as a LoRA over the union of the inputs' modules, optionally truncated
to ``rank`` exactly.

By default (``familiarity_gate``) the F-VAE's displacement is scaled by how well it reconstructs
the least familiar input, so adapters it cannot represent (e.g. of tasks it never saw) fall back
towards task arithmetic rather than being pulled towards its training tasks; with ``gate_mode:
partial`` (the default) inputs it cannot represent at all are merged by task arithmetic with the
latent fusion of the others instead of switching the whole fusion to arithmetic (by default the
familiar inputs' displacement is added at full strength, ``partial_displacement``). An input of a
task the F-VAE was meta-trained on that it cannot reconstruct (a new training run of the task) is
encoded with its task's prototype code instead (``task_prototypes``) and counts as familiar.

Needs the context's ``fvae``: an :class:`engine.fvae.artifact.FVAEArtifact` (CLI: ``--model DIR``);
reads its ``task_vectors`` (stored in-context vectors of tasks the F-VAE never saw) and, with
``refine_steps``, its few-shot ``objective``. Optional ``icm_inputs_cache``: an
:class:`engine.fusion.icm.inputs.IcmInputsCache` that keeps each input's encoding across fusions (a server fusing new weights over the same
adapters then pays only for the latent combination, one decode and the anchored assembly);
results are bit-identical with and without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pydantic
import torch

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.icm.familiarity import reads_condition, training_error
from engine.fusion.icm.inputs import IcmInputsCache, PrototypeCode, encode_inputs, split_by_layout
from engine.fusion.icm.latent import anchored_factors, familiarity, fuse_latents, residual_weights
from engine.fusion.lowrank import lowrank_weighted_sum, truncate_lowrank
from engine.fusion.modulewise import folded, fused_adapter
from engine.fusion.registry import FusionConfigError, FusionInputs, fusion_method

if TYPE_CHECKING:
    from engine.fvae.artifact import FVAEArtifact
    from engine.tasks.fewshot import FewShotObjective


class IcmParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    combine: Literal["weighted", "mean", "sum", "slerp"] = "weighted"
    project: bool = True
    rank: int | None = pydantic.Field(None, gt=0, description="truncate each module to this rank")
    condition: Literal["trained", "adapter"] = pydantic.Field(
        "trained",
        # ``task_vectors``: its name before 2026-12, still read from older specs.
        validation_alias=pydantic.AliasChoices("condition", "task_vectors"),
        description="each input's condition: 'trained': meta-training's task vector when the task has "
        "one; 'adapter': always derive it from the adapter",
    )
    refine_steps: int = pydantic.Field(
        0,
        ge=0,
        description="few-shot latent refinement: at most this many Adam steps on the fused code and "
        "weights (fewer below refine_full_shots shots per task)",
    )
    refine_lr: float = pydantic.Field(0.05, gt=0, description="refinement step size")
    refine_reg: float = pydantic.Field(
        1e-3, ge=0, description="L2 pull of the refined code towards the fused one (per latent unit)"
    )
    refine_weights: bool = pydantic.Field(True, description="refine the fusion weights alpha too")
    refine_folds: int = pydantic.Field(
        4,
        ge=0,
        description="cross-validation folds over every task's shots that choose the refinement step "
        "(each shot held out once; capped at the smallest task's shots, i.e. leave-one-out); 0: keep "
        "the step with the lowest loss on the shots it was fitted to (overfits; for ablations)",
    )
    refine_confidence: float = pydantic.Field(
        2.0,
        ge=0,
        description="keep step 0 (no refinement) unless the cross-validated gain over it exceeds this "
        "many standard errors (2: about a one-sided 95 % test with the few (fold, task) pairs of a "
        "small fusion)",
    )
    refine_full_shots: int = pydantic.Field(
        32,
        gt=0,
        description="shots per task from which refine_steps and refine_lr apply in full; with fewer, "
        "the steps shrink in proportion and the step size with the square root",
    )
    refine_condition: bool = pydantic.Field(False, description="refine the fused task vector too")
    span_granularity: Literal["task", "module"] = pydantic.Field(
        "task", description="refine_span weights: one per input adapter, or one per adapter and module"
    )
    anchor: bool = pydantic.Field(
        True,
        description="decode relative to the inputs: D(z_f) + sum_t w_t (dW_t - D(mu_t)), so the F-VAE "
        "contributes the latent arithmetic's displacement, not its reconstruction error (output rank "
        "grows by the inputs' ranks plus r_max each unless `rank` truncates); false: D(z_f) alone",
    )
    refine_span: bool = pydantic.Field(
        False,
        description="add the input adapters' exact deltas with refined weights (output rank grows by "
        "the inputs' ranks unless `rank` truncates)",
    )
    familiarity_gate: bool = pydantic.Field(
        True,
        description="anchored only: scale the F-VAE's displacement by how well it reconstructs the "
        "least familiar input (1 for adapters like its training ones, 0 for ones it cannot represent, "
        "such as adapters of tasks it never saw), so on unfamiliar inputs it falls back towards task "
        "arithmetic instead of pulling them towards the tasks it was trained on (off by default "
        "only for an F-VAE whose artifact records no training reconstruction error)",
    )
    task_prototypes: bool = pydantic.Field(
        True,
        description="an input of a meta-training task that the F-VAE reconstructs worse than its "
        "training adapters (e.g. a new training run of a known task) is encoded with its code moved "
        "towards the task's prototype (the mean code of the task's training adapters) by its "
        "unfamiliarity, and counts as familiar; needs an artifact that records prototypes "
        "(task_latents) and a gate that reads reconstruction errors, otherwise nothing changes",
    )
    gate_mode: Literal["partial", "min"] = pydantic.Field(
        "partial",
        description="familiarity_gate: 'min' scales the whole displacement by the least familiar input's "
        "familiarity (one unfamiliar input turns the fusion into task arithmetic); 'partial' leaves the "
        "inputs the F-VAE cannot represent at all (familiarity 0) out of the latent fusion and merges "
        "them by task arithmetic with the latent fusion of the others (gated by the least familiar of "
        "those; refinement refines all weights). 'partial' needs combine 'weighted'; otherwise 'min' applies",
    )
    partial_displacement: Literal["full", "scaled"] = pydantic.Field(
        "full",
        description="gate_mode 'partial': how the familiar inputs' displacement enters. 'full': "
        "sum_t w_t dW_t over every input plus the displacement of the familiar inputs' latent fusion; "
        "'scaled': W_F * icm(F) + sum_u w_u dW_u, the latent fusion merged with the unfamiliar inputs "
        "as one adapter of weight W_F (the familiar inputs' total weight), its displacement scaled by W_F",
    )

    @pydantic.model_validator(mode="after")
    def _gate_needs_anchor(self) -> IcmParams:
        explicit = "familiarity_gate" in self.model_fields_set
        if self.familiarity_gate and not self.anchor and explicit:
            raise ValueError("familiarity_gate scales the anchored displacement: it needs anchor: true")
        return self

    @property
    def gated(self) -> bool:
        return self.familiarity_gate and self.anchor

    @property
    def required_context(self) -> tuple[str, ...]:
        """Refinement fits on few-shot examples: the context's objective is needed then only."""
        return ("objective",) if self.refine_steps else ()


@fusion_method("icm", IcmParams, reference="https://arxiv.org/abs/2508.04153 (ICM-Fusion)")
def icm(
    inputs: FusionInputs,
    params: IcmParams,
    *,
    fvae: FVAEArtifact,
    task_vectors: Mapping[str, torch.Tensor] | None = None,
    objective: FewShotObjective | None = None,
    icm_inputs_cache: IcmInputsCache | None = None,
) -> tuple[LoraAdapter, dict]:
    """Fuse in the latent space of a meta-trained F-VAE (ICM-Fusion)."""
    artifact = fvae
    layout, model = artifact.layout, artifact.model
    model.eval()
    tasks = inputs.tasks or [f"input{i}" for i in range(len(inputs.adapters))]
    # Inputs may come from a grown catalog layout: the F-VAE reads the modules of its own layout;
    # the others are merged by task arithmetic below and reported.
    split_inputs = [split_by_layout(a, layout) for a in inputs.adapters]
    empty = [i for i, (inside, _) in enumerate(split_inputs) if not inside.modules]
    if empty:
        raise FusionConfigError(
            f"input(s) {empty} target no module of the F-VAE's layout {layout.layout_id}; "
            "fuse them with another method (e.g. task_arithmetic) or retrain the F-VAE on the grown layout"
        )
    # The per-input half (canonical form, condition, encode, decode of mu, exact factors) is the
    # same whatever the other inputs and weights are: a server reuses it across specs.
    encoded = encode_inputs(
        artifact,
        [inside for inside, _ in split_inputs],
        tasks,
        task_vectors,
        params.condition,
        icm_inputs_cache,
    )
    # An input of a known task the F-VAE cannot reconstruct (a new run of the task): its code
    # moved towards the task's prototype, which the decoder was meta-trained to fuse.
    prototypes = [e.prototype if params.task_prototypes else None for e in encoded]
    latents = _Latents(
        mu=torch.stack([e.mu if p is None else p.mu for e, p in zip(encoded, prototypes, strict=True)]),
        cond=torch.stack([e.cond for e in encoded]),
        masks=torch.stack([e.mask for e in encoded]),
        decoded=torch.stack(
            [e.decoded if p is None else p.decoded for e, p in zip(encoded, prototypes, strict=True)]
        )
        if params.anchor
        else None,
        inputs_factors=[list(e.factors) for e in encoded],
    )
    alpha = torch.tensor(inputs.weights, dtype=torch.float32)
    details: dict = {}
    gate, split = 1.0, None
    if params.gated:
        gate, known, details["familiarity"] = _familiarity_gate(
            encoded, alpha, artifact, prototypes, required="familiarity_gate" in params.model_fields_set
        )
        split = _partial_split(known, alpha, params)
        if split is not None:
            details["familiarity"].update(
                mode="partial",
                arithmetic_inputs=split.unfamiliar,
                gate=split.gate,
                displacement=params.partial_displacement,
            )
    with torch.no_grad():
        factors = _fused_factors(artifact, latents, alpha, params, gate, split)
    if params.refine_steps:
        _check_objective(objective, layout, tasks)
        factors, refined = refine_latent(artifact, latents, alpha, objective, tasks, params, gate, split)
        details.update(refined)
    mask = latents.masks.any(dim=0)
    modules = {}
    for spec, (A, B) in zip(layout.modules, factors, strict=True):
        if not bool(mask[layout.index[spec.name]]):
            continue
        A, B = _drop_null_components(A.detach(), B.detach())
        if params.rank is not None:
            A, B = truncate_lowrank(A, B, params.rank)
        modules[spec.name] = LoraModule(A=A, B=B, scaling=1.0)
    outside = _outside_layout([o for _, o in split_inputs], inputs.weights, params.rank)
    if outside:
        modules.update(outside)
        details["outside_layout"] = {"merged_by": "task_arithmetic", "modules": sorted(outside)}
    return fused_adapter(inputs, modules), details


def _outside_layout(
    outside: list[dict[str, LoraModule]], weights: list[float], rank: int | None
) -> dict[str, LoraModule]:
    """Modules outside the F-VAE's layout, merged by task arithmetic: ``sum_t w_t dW_t`` over the
    inputs that target each (exact, or truncated to ``rank``), as the partial gate merges the
    inputs the F-VAE cannot represent."""
    merged = {}
    for name in Layout.sort_names({n for modules in outside for n in modules}):
        present = [(modules[name], w) for modules, w in zip(outside, weights, strict=True) if name in modules]
        A, B = lowrank_weighted_sum([folded(m) for m, _ in present], [w for _, w in present], rank)
        merged[name] = LoraModule(A=A.contiguous(), B=B.contiguous(), scaling=1.0)
    return merged


def _decoded_factors(fused, decoded, inputs_factors, masks, weights, layout, params: IcmParams, gate=1.0):
    """Per-module factors of the decoded fused adapter: anchored on the inputs (default; see
    :func:`engine.fusion.icm.latent.anchored_factors`), its displacement scaled by ``gate``, or the
    decoder's absolute output."""
    if decoded is None:
        return unflatten(fused, layout)
    residual = residual_weights(weights, len(inputs_factors), params.combine, fused)
    return anchored_factors(fused, decoded, inputs_factors, masks, residual, layout, displacement=gate)


def _familiarity_gate(
    encoded, alpha: torch.Tensor, artifact, prototypes: list[PrototypeCode | None], required: bool
) -> tuple[float, torch.Tensor | None, dict]:
    """The ``familiarity_gate`` factor: the lowest familiarity among the weighted inputs
    (:func:`engine.fusion.icm.latent.familiarity`, against :func:`training_error`). The lowest, not a
    mean: the fused code ``sum_t alpha_t mu_t`` is only as meaningful as its least meaningful term.
    Also returns each input's familiarity ``[K]`` (None when the gate is off) and the details.

    An F-VAE whose reconstructions explain nothing of its own training adapters
    (:func:`engine.fusion.icm.familiarity.reads_condition`: a fusion-trained decoder that learnt a
    displacement per task vector, not the adapters) has reconstruction errors that are the same
    for every adapter, so familiarity is read from the condition instead: 1 for an input
    conditioned on its task's meta-training vector, 0 otherwise (``basis: task`` in the details).

    An input encoded with its task's prototype (``prototypes[k]``, see
    :class:`engine.fusion.icm.inputs.PrototypeCode`) counts as familiar: its code is one the
    decoder was meta-trained on (``prototype_shares`` in the details)."""
    recorded = artifact.meta.familiarity
    if reads_condition(artifact):
        conditions = [e.condition for e in encoded]
        known = torch.tensor([1.0 if c == "trained" else 0.0 for c in conditions])
        basis = {"basis": "task", "conditions": conditions, "explained": recorded.explained}
        return _least_familiar(known, alpha, basis)
    reference = training_error(artifact)
    if reference is None and not required:  # the default on an artifact without the figure
        return 1.0, None, {"gate": 1.0, "reference_error": None}
    if reference is None:
        raise FusionConfigError(
            "familiarity_gate needs the F-VAE's training reconstruction error (familiarity.reference "
            "or metrics.recon in its artifact.json); this artifact has neither: retrain it with `icmf train`"
        )
    errors = torch.tensor([e.recon_error for e in encoded])
    known = familiarity(errors, float(reference))
    basis = {"basis": "reconstruction", "recon_errors": errors.tolist(), "reference_error": float(reference)}
    if any(p is not None for p in prototypes):
        known = torch.where(torch.tensor([p is not None for p in prototypes]), torch.ones_like(known), known)
        basis["prototype_shares"] = [0.0 if p is None else p.share for p in prototypes]
    return _least_familiar(known, alpha, basis)


def _least_familiar(
    known: torch.Tensor, alpha: torch.Tensor, basis: dict
) -> tuple[float, torch.Tensor, dict]:
    """The gate (the least familiarity among the weighted inputs; 1 with none), ``known`` and the
    details: ``basis`` plus each input's familiarity (``inputs``), the gate and its mode."""
    weighted = known[alpha != 0]
    gate = float(weighted.min()) if weighted.numel() else 1.0
    return gate, known, {"gate": gate, **basis, "inputs": known.tolist(), "mode": "min"}


@dataclass
class _Latents:
    """The encoded inputs of one fusion. Shapes: ``mu [K, latent]``, ``cond [K, d]``, ``masks
    [K, M]``, ``decoded [K, N]`` (de-normalised ``D(mu_t)``; None without ``anchor``);
    ``inputs_factors[t][m]`` = input t's exact ``(A, B)`` of module m."""

    mu: torch.Tensor
    cond: torch.Tensor
    masks: torch.Tensor
    decoded: torch.Tensor | None
    inputs_factors: list[list[tuple[torch.Tensor, torch.Tensor]]]

    def subset(self, index: list[int]) -> _Latents:
        return _Latents(
            self.mu[index],
            self.cond[index],
            self.masks[index],
            None if self.decoded is None else self.decoded[index],
            [self.inputs_factors[i] for i in index],
        )


@dataclass(frozen=True)
class _PartialSplit:
    """``gate_mode: partial``: the inputs fused in latent space, those merged by arithmetic, and
    the gate of the latent part (the least familiarity among its inputs)."""

    familiar: list[int]
    unfamiliar: list[int]
    gate: float


def _partial_split(
    known: torch.Tensor | None, alpha: torch.Tensor, params: IcmParams
) -> _PartialSplit | None:
    """The split ``gate_mode: partial`` makes (unfamiliar = familiarity 0), or None when it does
    not apply (gate off, 'min', another combine than 'weighted', no unfamiliar input or no familiar
    one, or familiar weights that do not sum to a positive total)."""
    if known is None or params.gate_mode != "partial" or params.combine != "weighted":
        return None
    used = alpha != 0
    unfamiliar, familiar = used & (known == 0), used & (known > 0)
    if not bool(unfamiliar.any()) or not bool(familiar.any()) or float(alpha[familiar].sum()) <= 0:
        return None
    index = familiar.nonzero().flatten().tolist()
    return _PartialSplit(index, unfamiliar.nonzero().flatten().tolist(), float(known[index].min()))


def _fused_factors(
    artifact,
    latents: _Latents,
    weights: torch.Tensor,
    params: IcmParams,
    gate: float,
    split: _PartialSplit | None,
    residual: torch.Tensor | None = None,
    cond_residual: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-module factors of the fusion of ``latents`` with ``weights`` (differentiable in the
    weights and the code / condition residuals that refinement adds).

    Without ``split``: decode ``z_f`` (+ residual) and assemble (:func:`_decoded_factors`, gated by
    ``gate``). With it: ``W_F * icm(F) + sum_{u unfamiliar} w_u dW_u``: the familiar inputs ``F``
    are fused as a fusion of their own, with weights ``w_F / W_F`` (``W_F = sum w_F``: the relative
    weights meta-training's episodes use) and the gate ``split.gate``, then merged by task
    arithmetic with the unfamiliar inputs' exact deltas; with ``partial_displacement: full`` (the
    default) the latent part's displacement is not scaled by ``W_F`` (its gate is divided by it),
    so the result is ``sum_t w_t dW_t`` over every input plus ``icm(F)``'s displacement.
    """
    layout, normalizer, model = artifact.layout, artifact.normalizer, artifact.model
    part, scale, gate_used = latents, None, gate
    relative = weights
    if split is not None:
        part, scale, gate_used = latents.subset(split.familiar), weights[split.familiar].sum(), split.gate
        if params.partial_displacement == "full":  # undo the W_F the merge below multiplies it by
            gate_used = split.gate / scale.clamp_min(1e-3)
        # refinement moves the weights: keep the division finite if their total heads for 0
        relative = weights[split.familiar] / scale.clamp_min(1e-3)
    z_f, v_f = fuse_latents(part.mu, part.cond, relative, combine=params.combine, project=params.project)
    if residual is not None:
        z_f = z_f + residual
    if cond_residual is not None:
        v_f = v_f + cond_residual
    fused = normalizer.denormalize(model.decode(z_f[None], v_f[None])[0])  # [N]
    factors = _decoded_factors(
        fused, part.decoded, part.inputs_factors, part.masks, relative, layout, params, gate_used
    )
    if split is None:
        return factors
    merged = []
    for m, (A, B) in enumerate(factors):
        A_parts, B_parts = [A], [B * scale]
        for u in split.unfamiliar:
            if bool(latents.masks[u, m]):
                A_u, B_u = latents.inputs_factors[u][m]
                A_parts.append(A_u.to(A.dtype))
                B_parts.append(B_u.to(B.dtype) * weights[u])
        merged.append((torch.cat(A_parts), torch.cat(B_parts, dim=1)))
    return merged


def _drop_null_components(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove rank components that add nothing (a zero row of ``A`` or zero column of ``B``, e.g.
    the layout's rank padding); at least one component stays."""
    keep = (A.abs().sum(dim=1) > 0) & (B.abs().sum(dim=0) > 0)
    if bool(keep.all()):  # the common case (anchored factors): no gather, no copy of fresh tensors
        return A.contiguous(), B.contiguous()
    if not bool(keep.any()):
        keep[0] = True
    return A[keep].clone(), B[:, keep].clone()


def _check_objective(objective: FewShotObjective, layout, tasks: list[str]) -> None:
    if objective.host.layout.layout_id != layout.layout_id:
        raise FusionConfigError(
            f"the few-shot objective uses layout {objective.host.layout.layout_id}, the F-VAE "
            f"{layout.layout_id}; build the objective on the F-VAE's layout"
        )
    missing = [t for t in tasks if t not in objective.shots]
    if missing:
        raise FusionConfigError(
            f"no few-shot examples for task(s) {missing}: refinement needs k examples each"
        )


def refine_budget(params: IcmParams, shots: int) -> tuple[int, float]:
    """The Adam steps and step size refinement may take with ``shots`` examples per task (the
    smallest task's count): ``refine_steps`` and ``refine_lr`` in full from ``refine_full_shots``
    on; below, the steps shrink in proportion and the step size with the square root, so a fusion
    with few examples can move its code and weights only a little way from the unrefined one."""
    share = min(1.0, shots / params.refine_full_shots)
    return math.ceil(params.refine_steps * share), params.refine_lr * math.sqrt(share)


def select_step(held_out: torch.Tensor, confidence: float = 2.0) -> tuple[int, dict]:
    """The refinement step to keep, from cross-validated losses ``held_out [folds, steps + 1,
    tasks]`` (fold ``f``'s held-out loss of each task after ``s`` steps fitted on the other folds).

    Each (fold, task) pair is one paired observation of the gain over step 0, ``d(s) = L(0) -
    L(s)``; ``gain(s)`` is their mean and ``se(s)`` its standard error. Step 0 (no refinement) is
    kept unless the best step's gain exceeds ``confidence`` standard errors; otherwise the
    one-standard-error rule shrinks towards step 0: the earliest step whose gain is within one
    standard error of the best and itself clears ``confidence`` standard errors. A gain of the
    size noise produces thus leaves the fusion as it was.

    Returns the step and a record (gain and standard error per step, best and kept step).
    """
    folds, steps, tasks = held_out.shape
    paired = (held_out[:, :1] - held_out).permute(1, 0, 2).reshape(steps, folds * tasks).double()
    gain = paired.mean(dim=1)
    units = paired.shape[1]
    se = paired.std(dim=1) / math.sqrt(units) if units > 1 else torch.full_like(gain, math.inf)
    best = int(gain.argmax())
    clears = gain > confidence * se
    kept = 0
    if best > 0 and bool(clears[best]):
        near = (gain >= gain[best] - se[best]) & clears
        near[0] = False
        kept = int(near.nonzero()[0])
    record = {
        "cv_gain": [round(float(g), 6) for g in gain],
        "cv_se": [round(float(s), 6) for s in se],
        "cv_best_step": best,
        "kept_step": kept,
    }
    return kept, record


class _Trajectory:
    """One refinement run: its trainable residuals, weights and span, and their Adam state."""

    def __init__(self, latents: _Latents, alpha: torch.Tensor, modules: int, params: IcmParams, lr: float):
        mu, cond = latents.mu, latents.cond
        self.params = params
        self.weights = alpha.clone().requires_grad_(params.refine_weights)
        self.residual = torch.zeros(mu.shape[1], requires_grad=True)
        self.cond_residual = torch.zeros(cond.shape[1], requires_grad=params.refine_condition)
        shape = (mu.shape[0], modules) if params.span_granularity == "module" else (mu.shape[0], 1)
        self.beta = torch.zeros(shape, requires_grad=params.refine_span)
        trainable = [self.residual] + ([self.weights] if params.refine_weights else [])
        trainable += [self.cond_residual] if params.refine_condition else []
        trainable += [self.beta] if params.refine_span else []
        self.optimizer = torch.optim.Adam(trainable, lr=lr)

    def factors(self, artifact, latents: _Latents, gate: float, split: _PartialSplit | None):
        params = self.params
        candidate = _fused_factors(
            artifact, latents, self.weights, params, gate, split, self.residual, self.cond_residual
        )
        if params.refine_span:
            candidate = _with_span(candidate, latents.inputs_factors, self.beta)
        return candidate

    def step(self, loss: torch.Tensor) -> None:
        reg = self.residual.pow(2).sum() + self.cond_residual.pow(2).sum()
        self.optimizer.zero_grad()
        (loss + self.params.refine_reg * reg).backward()
        self.optimizer.step()

    def snapshot(self, modules: int) -> dict:
        """The weights (and span weights) as they stand: what provenance records of the kept step."""
        out = {"weights": [float(w) for w in self.weights.detach()]}
        if self.params.refine_span:
            beta = self.beta.detach().expand(-1, modules)
            out["span_weights"] = (
                beta.tolist() if self.params.span_granularity == "module" else beta[:, 0].tolist()
            )
        return out


def refine_latent(
    artifact,
    latents: _Latents,
    alpha: torch.Tensor,
    objective,
    tasks,
    params: IcmParams,
    gate: float = 1.0,
    split: _PartialSplit | None = None,
):
    """Few-shot latent refinement (docs/design.md §2.6): Adam on the fusion weights and a residual of
    the fused code (and of the fused task vector with ``refine_condition``), minimising the fused
    adapter's support loss over all tasks plus an L2 pull towards the unrefined code. The decoder
    is frozen, so the adapter stays on the F-VAE's manifold. With ``decoded`` (the inputs' decoded
    reconstructions ``[K, N]``, ``anchor``), the fused adapter is anchored on the inputs
    (:func:`engine.fusion.icm.latent.anchored_factors`); with ``split`` (``gate_mode: partial``), the
    code is the familiar inputs' and the unfamiliar ones enter by arithmetic, their weights
    refined too (:func:`_fused_factors`).

    With ``refine_span``, the fused adapter is the decoded one plus ``sum_t beta_t dW_t`` over the
    input adapters' exact deltas (``inputs_factors``), ``beta`` starting at 0 and refined too: the
    search covers the generator's manifold and the span of the inputs.

    How far it may go is bounded by the number of shots (:func:`refine_budget`), and which step is
    kept is chosen by ``refine_folds``-fold cross-validation over every task's shots
    (:func:`select_step`): one run per fold fitted on the other folds, the step's gain over step 0
    measured on the held-out fold; step 0 (the unrefined fusion) is kept unless that gain exceeds
    ``refine_confidence`` standard errors. The kept step is then taken by a run on all shots. With
    ``refine_folds: 0`` nothing is held out and the step with the lowest support loss is kept (it
    can overfit: for tests and ablations).

    Shapes: see :class:`_Latents`; ``alpha [K]``. Returns the per-module factors of the kept
    step, detached, and a record whose weights are the kept step's.
    """
    artifact.model.requires_grad_(False)
    modules = objective.host.layout.num_modules
    shots = min(objective.shots[t].count for t in tasks)
    steps, lr = refine_budget(params, shots)
    folds = min(params.refine_folds, shots)
    record: dict = {"shots": shots, "steps": steps, "lr": lr, "folds": folds}

    def run(fit, held, length: int):
        """A trajectory of ``length`` steps on ``fit``; ``held``'s per-task losses at every step."""
        trajectory = _Trajectory(latents, alpha, modules, params, lr)
        curve = []
        for step in range(length + 1):
            candidate = trajectory.factors(artifact, latents, gate, split)
            if held is not None:
                curve.append(held.task_losses(candidate, tasks))
            if step == length:
                return trajectory, candidate, curve
            trajectory.step(fit.loss(candidate, tasks))

    if params.refine_folds == 0:
        kept = _refine_on_support(run, objective, steps, modules, record)
    elif folds < 2:  # one shot of some task: nothing to hold out, so nothing can be trusted
        record.update(selection="too few shots", kept_step=0)
        kept = 0
    else:
        held_out = torch.stack(
            [torch.stack(run(fit, held, steps)[2]) for fit, held in objective.folds(folds, seed=0)]
        )
        kept, chosen = select_step(held_out, params.refine_confidence)
        record.update(selection="cross-validation", confidence=params.refine_confidence, **chosen)
    trajectory, candidate, _ = run(objective, None, kept)
    with torch.no_grad():
        start = float(objective.loss(run(objective, None, 0)[1], tasks)) if kept else None
        final = float(objective.loss(candidate, tasks))
    record.update(
        support_loss_start=final if start is None else start,
        support_loss_kept=final,
        **trajectory.snapshot(modules),
    )
    return [(A.detach(), B.detach()) for A, B in candidate], {"refine": record}


def _refine_on_support(run, objective, steps: int, modules: int, record: dict) -> int:
    """``refine_folds: 0``: the step with the lowest loss on the very shots it was fitted to."""
    _, _, curve = run(objective, objective, steps)
    means = torch.stack(curve).mean(dim=1)
    kept = int(means.argmin())
    record.update(selection="support loss", kept_step=kept, support_losses=[float(v) for v in means])
    return kept


def _with_span(factors, inputs_factors, beta: torch.Tensor):
    """Per-module factors of ``decoded + sum_t beta_t dW_t`` (ranks concatenated; differentiable)."""
    out = []
    for m, (A, B) in enumerate(factors):
        A_parts = [A] + [f[m][0] for f in inputs_factors]
        B_parts = [B] + [f[m][1] * beta[t, min(m, beta.shape[1] - 1)] for t, f in enumerate(inputs_factors)]
        out.append((torch.cat(A_parts), torch.cat(B_parts, dim=1)))
    return out
