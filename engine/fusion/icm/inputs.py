"""The per-input half of ``icm`` fusion, and a cache that reuses it across fusion specs (pure
torch; no Ray, no I/O).

For one F-VAE and one input adapter, everything ICM-Fusion derives from that adapter alone —
its canonical normalised vector, its condition (task vector), the posterior mean ``mu``, the
decoded reconstruction ``D(mu)`` and the adapter's exact factors — depends on neither the other
inputs nor the fusion weights. :func:`encode_input` computes it once as a frozen
:class:`EncodedInput`; only the latent combination, the decode of the fused code and the
anchored assembly are left per fusion spec (:mod:`engine.fusion.icm.method`).

A server that fuses new weights over the same catalog adapters passes an
:class:`IcmInputsCache` as the fusion context's ``icm_inputs_cache``: a thread-safe, byte-bounded LRU
keyed by content — the F-VAE's fingerprint, the adapter's sha256 and where its condition comes
from (a training task's vector, a given vector's sha256, or the adapter-derived projection).
Each input is encoded on its own (a batch of one) with or without the cache, so a cached result
is bit-identical to a fresh one.

A gauge catalog stores each module in the canonical SVD gauge, and the adapters it loads say so
(:attr:`engine.adapters.lora.LoraModule.in_gauge`): their canonical form for an F-VAE of the same
gauge is the stored row itself, padded back to ``r_max`` without computing the gauge again (which
would move a third of its values by an ulp: the gauge is not idempotent in float32).

Inputs from a catalog whose layout grew may not fit the F-VAE's layout (the layout it was
trained on): :func:`split_by_layout` keeps the modules inside it for the F-VAE and sets the others
aside (``icm`` merges those by task arithmetic and reports them); a module of a higher rank than
the layout's ``r_max`` is encoded from its best rank-``r_max`` approximation, while the anchored
assembly keeps its exact factors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.adapters.codec import CanonicalAdapter, to_canonical, to_flat
from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.digest import update_with_tensor
from engine.fusion.icm.familiarity import reads_condition, training_error
from engine.fusion.icm.latent import familiarity
from engine.fusion.icm.projection import project
from engine.fusion.lowrank import truncate_lowrank
from engine.fusion.modulewise import folded
from engine.fusion.registry import FusionConfigError
from engine.lru import ByteBoundedLRU
from engine.tasks.functional import adapter_factors

DEFAULT_CACHE_BYTES = 256 * 2**20

TaskVectorMode = Literal["trained", "adapter"]


@dataclass(frozen=True)
class Condition:
    """Where one input's condition (task vector) comes from, resolved before any encoding.

    Attributes:
        kind: ``trained`` (meta-training's vector of the task), ``given`` (passed in the fusion
            context) or ``projection`` (derived from the adapter itself).
        key: what identifies the vector besides the F-VAE and the adapter: the task name
            (``trained``), the vector's sha256 (``given``), ``""`` (``projection``: the
            adapter and the F-VAE's projection settings determine it).
        vector: ``[d]`` the vector itself, except for ``projection`` (``None``).
    """

    kind: Literal["trained", "given", "projection"]
    key: str
    vector: torch.Tensor | None = None


@dataclass(frozen=True)
class EncodedInput:
    """Everything ``icm`` takes from one input adapter (the F-VAE's layout, ``M`` modules).

    Attributes:
        cond: ``[d]`` the condition the adapter was encoded with.
        mu: ``[latent]`` posterior mean of the adapter.
        decoded: ``[N]`` de-normalised reconstruction ``D(mu, cond)``.
        mask: ``[M]`` bool, the modules the adapter targets.
        factors: per layout module the exact ``(A [r, d_in], s·B [d_out, r])``
            (:func:`engine.tasks.functional.adapter_factors`).
        recon_error: the F-VAE's relative squared reconstruction error of the adapter in
            normalised space, over the slots (or, ``recon_space: delta``, the modules' updates) it
            occupies (:meth:`engine.fvae.model.FVAE.reconstruction_measures`):
            about the training level for an adapter like those it was trained on, about 1 for one
            it cannot represent.
        condition: the kind of the condition it was encoded with (:class:`Condition`): whether
            meta-training saw its task (``trained``).
        prototype: for an input of a meta-training task that the F-VAE reconstructs worse than
            its training adapters (familiarity below 1, read from reconstruction errors), its code
            moved towards the task's prototype (:func:`prototype_code`); None otherwise.

    Never written in place: cached entries are shared between fusions.
    """

    cond: torch.Tensor
    mu: torch.Tensor
    decoded: torch.Tensor
    mask: torch.Tensor
    factors: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    recon_error: float = float("nan")
    condition: str = "projection"
    prototype: PrototypeCode | None = None

    def nbytes(self) -> int:
        tensors = [self.cond, self.mu, self.decoded, self.mask, *(t for f in self.factors for t in f)]
        if self.prototype is not None:
            tensors += [self.prototype.mu, self.prototype.decoded]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class PrototypeCode:
    """The code ``icm`` uses for an input its F-VAE cannot reconstruct but whose task it was
    meta-trained on (a new training run of a known task): ``mu = f * mu_input + (1 - f) *
    prototype_task``, with ``f`` the input's familiarity and the prototype the mean code of the
    task's training adapters (:attr:`engine.fvae.artifact.FVAEArtifact.task_latents`).

    *Why:* such an input's own code is off the F-VAE's manifold (its reconstruction error is above
    1), so the displacement decoded from it is noise; its task's prototype is a code the decoder
    was meta-trained to fuse, and the anchored decode still adds the input's exact update.

    Attributes:
        mu: ``[latent]`` the blended code.
        decoded: ``[N]`` de-normalised ``D(mu, cond)``.
        share: ``1 - f``, the prototype's share of the code (0 < share <= 1).
    """

    mu: torch.Tensor
    decoded: torch.Tensor
    share: float


def resolve_condition(task: str, artifact, given: Mapping[str, Any], mode: TaskVectorMode) -> Condition:
    """The condition source of an input of ``task``: meta-training's vector of the task (unless
    ``mode`` is ``adapter``); else one in ``given`` (e.g. computed now from k in-context examples
    of an unseen task); else, for an F-VAE trained on adapter-derived vectors, the projection of
    the adapter itself.

    Raises:
        FusionConfigError: a given vector of the wrong size, or no source at all.
    """
    cond_dim = artifact.model.config.cond_dim
    if mode == "trained" and task in artifact.trained_vectors:
        return Condition("trained", task, artifact.trained_vectors[task])
    if task in given:
        vector = torch.as_tensor(given[task], dtype=torch.float32).flatten()
        if vector.numel() != cond_dim:
            raise FusionConfigError(
                f"task vector of {task!r} has {vector.numel()} values; this F-VAE is conditioned on {cond_dim}"
            )
        digest = hashlib.sha256()
        update_with_tensor(digest, "given", vector)
        return Condition("given", digest.hexdigest(), vector)
    if artifact.meta.task_vector_source.kind == "adapter_projection":
        return Condition("projection", "")
    raise FusionConfigError(
        f"task {task!r} has no task vector: this F-VAE was trained on in-context vectors; compute one "
        "from k examples with `icmf taskvec --task ...` (or pass the fusion context's task_vectors)"
    )


def split_by_layout(adapter: LoraAdapter, layout: Layout) -> tuple[LoraAdapter, dict[str, LoraModule]]:
    """``(the adapter restricted to the modules of layout, its other modules)``.

    A module of the layout with another shape stays inside (encoding then refuses it: the
    adapter belongs to another base model).
    """
    inside = {n: m for n, m in adapter.modules.items() if n in layout.index}
    outside = {n: m for n, m in adapter.modules.items() if n not in layout.index}
    if not outside:
        return adapter, {}
    restricted = LoraAdapter(modules=inside, config=adapter.config, extras={}, source=adapter.source)
    return restricted, outside


def _encodable(adapter: LoraAdapter, layout: Layout) -> LoraAdapter:
    """``adapter`` with every module above the layout's ``r_max`` replaced by its best rank-``r_max``
    approximation (what the F-VAE can read); the adapter itself when none is."""
    over = [n for n, m in adapter.modules.items() if m.rank > layout.r_max]
    if not over:
        return adapter
    modules = dict(adapter.modules)
    for name in over:
        A, B = truncate_lowrank(*folded(modules[name]), layout.r_max)
        modules[name] = LoraModule(A=A, B=B, scaling=1.0)
    return LoraAdapter(modules=modules, config=adapter.config, extras={}, source=adapter.source)


def encode_input(
    artifact, adapter: LoraAdapter, condition: Condition, own_factors: bool = False
) -> EncodedInput:
    """Encode one adapter with the F-VAE of ``artifact`` (an :class:`engine.fvae.artifact.FVAEArtifact`
    whose model is in eval mode) and decode its posterior mean, as a batch of one.

    ``own_factors``: the entry gets copies of the adapter's factors (an entry that outlives this
    fusion, e.g. in :class:`IcmInputsCache`, must not share tensors its caller may reuse);
    otherwise it holds the adapter's own tensors (or views of them) for the one fusion.

    Raises:
        AdapterError: the adapter targets a module outside the F-VAE's layout (see
            :func:`split_by_layout`) or one of another shape.
    """
    return _PreparedInput.of(artifact, adapter).encode(artifact, condition, own_factors=own_factors)


@dataclass
class _PreparedInput:
    """One adapter in the F-VAE's canonical form: what an encoding starts from."""

    adapter: LoraAdapter
    canonical: CanonicalAdapter
    xn: torch.Tensor  # [N] normalised flat vector

    @classmethod
    def of(cls, artifact, adapter: LoraAdapter) -> _PreparedInput:
        layout = artifact.layout
        canonical = to_canonical(_encodable(adapter, layout), layout, gauge=artifact.meta.gauge)
        return cls(adapter, canonical, artifact.normalizer.normalize(to_flat(canonical)))

    def encode(
        self, artifact, condition: Condition, projected: torch.Tensor | None = None, own_factors: bool = False
    ) -> EncodedInput:
        """The encoding under ``condition``; ``projected``: the condition's vector when it is the
        adapter's projection and the caller projected it already (with other inputs: one draw of
        the projection for all of them)."""
        layout, normalizer, model = artifact.layout, artifact.normalizer, artifact.model
        vector = condition.vector
        if vector is None:
            vector = projected if projected is not None else _projected(artifact, [self.xn])[0]
        cond = vector[None]  # [1, d]
        with torch.no_grad():
            mu, _ = model.encode(self.xn[None], cond)  # [1, latent]
            reconstruction = model.decode(mu, cond)  # [1, N], normalised
            decoded = normalizer.denormalize(reconstruction)
        present = torch.from_numpy(layout.slot_mask(self.canonical.mask.numpy()))  # [N]
        error = float(model.reconstruction_measures(reconstruction[0], self.xn, present)[0])
        factors = tuple(adapter_factors(self.adapter, layout))
        if own_factors:
            factors = tuple((A.clone(), B.clone()) for A, B in factors)
        prototype = prototype_code(artifact, condition, mu[0], cond[0], error)
        return EncodedInput(
            cond[0], mu[0], decoded[0], self.canonical.mask, factors, error, condition.kind, prototype
        )


def prototype_code(
    artifact, condition: Condition, mu: torch.Tensor, cond: torch.Tensor, error: float
) -> PrototypeCode | None:
    """The :class:`PrototypeCode` of an input encoded as ``mu [latent]`` under ``cond [d]`` with
    reconstruction error ``error``, or None: its condition is not a meta-training task's vector,
    the artifact records no prototype for that task, the gate reads familiarity from conditions
    (:func:`engine.fusion.icm.familiarity.reads_condition`: every such input counts as familiar
    already), or the input is as familiar as the F-VAE's training adapters."""
    reference = training_error(artifact)
    prototype = artifact.task_latents.get(condition.key) if condition.kind == "trained" else None
    if prototype is None or reference is None or reads_condition(artifact):
        return None
    known = float(familiarity(torch.tensor([error]), float(reference))[0])
    if known >= 1.0:
        return None
    code = known * mu + (1.0 - known) * prototype.to(mu.dtype)
    with torch.no_grad():
        decoded = artifact.normalizer.denormalize(artifact.model.decode(code[None], cond[None]))[0]
    return PrototypeCode(code, decoded, 1.0 - known)


def _projected(artifact, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, d]`` the adapter-derived conditions of normalised adapters ``rows`` (one draw of the
    seeded projection for all of them)."""
    source = artifact.meta.task_vector_source
    return project(rows, source.dim or artifact.model.config.cond_dim, source.seed)


def adapter_digest(adapter: LoraAdapter) -> str:
    """sha256 of what :func:`encode_input` reads from an adapter: every module's name, factors,
    scaling and whether it is in the canonical gauge already (not its config, source or
    ``modules_to_save`` weights)."""
    digest = hashlib.sha256()
    for name in sorted(adapter.modules):
        module = adapter.modules[name]
        # in_gauge: encoded as stored rather than re-gauged (equal up to float32 rounding, so
        # kept apart: a cached result is bit-identical to a fresh one)
        digest.update(f"{name}:{float(module.scaling)!r}:{module.in_gauge};".encode())
        update_with_tensor(digest, "A", module.A)
        update_with_tensor(digest, "B", module.B)
    return digest.hexdigest()


class IcmInputsCache:
    """Thread-safe, byte-bounded LRU of :class:`EncodedInput` entries, shareable across F-VAEs.

    Keyed by ``(F-VAE fingerprint, adapter sha256, condition kind, condition key)``, so a
    different F-VAE, adapter, task-vector mode or given vector never hits another's entry.

    Args:
        max_bytes: bytes of entries kept (least recently used go first; 0 keeps nothing).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self._lru = ByteBoundedLRU(max_bytes)

    @staticmethod
    def key(artifact, adapter: LoraAdapter, condition: Condition) -> tuple[str, str, str, str]:
        return (artifact.fingerprint, adapter_digest(adapter), condition.kind, condition.key)

    def encode(self, artifact, adapter: LoraAdapter, condition: Condition) -> EncodedInput:
        """The cached encoding of ``adapter`` under ``condition``, computed on a miss."""
        return _encode_all(artifact, [adapter], [condition], self)[0]

    def get(self, key: tuple[str, str, str, str]) -> EncodedInput | None:
        return self._lru.get(key)

    def put(self, key: tuple[str, str, str, str], entry: EncodedInput) -> None:
        self._lru.put(key, entry, entry.nbytes())

    def __len__(self) -> int:
        return len(self._lru)

    def describe(self) -> dict[str, int]:
        """Entries, bytes, capacity, hits, misses (for health endpoints and tests)."""
        return self._lru.describe()


def encode_inputs(
    artifact,
    adapters: Sequence[LoraAdapter],
    tasks: Sequence[str],
    given: Mapping[str, Any] | None = None,
    mode: TaskVectorMode = "trained",
    cache: IcmInputsCache | None = None,
) -> list[EncodedInput]:
    """:func:`encode_input` of every adapter (through ``cache`` when given), conditions resolved
    by :func:`resolve_condition`; ``tasks`` has one name per adapter."""
    conditions = [resolve_condition(t, artifact, given or {}, mode) for t in tasks]
    return _encode_all(artifact, adapters, conditions, cache)


def _encode_all(
    artifact, adapters: Sequence[LoraAdapter], conditions: Sequence[Condition], cache: IcmInputsCache | None
) -> list[EncodedInput]:
    """:func:`encode_input` of every adapter under its condition, through ``cache`` when given (its
    entries own their factors).

    The inputs conditioned on their own projection are projected together, so the seeded
    projection is drawn once per fusion rather than once per input (at an 8 B-class layout the
    draw costs more than the F-VAE); every other input is prepared and encoded one at a time, so
    at most those inputs' normalised vectors are held at once. Results are the same bits as
    :func:`encode_input` of each input alone.
    """
    cached = cache is not None  # not `if cache`: an empty cache is falsy (it has a length)
    keys = [cache.key(artifact, a, c) for a, c in zip(adapters, conditions, strict=True)] if cached else []
    entries: list[EncodedInput | None] = [cache.get(k) for k in keys] if cached else [None] * len(adapters)
    missing = [i for i, entry in enumerate(entries) if entry is None]
    projecting = [i for i in missing if conditions[i].vector is None]
    prepared = {i: _PreparedInput.of(artifact, adapters[i]) for i in projecting}
    vectors: dict[int, torch.Tensor] = {}
    if projecting:
        projected = _projected(artifact, [prepared[i].xn for i in projecting])
        vectors = {i: row.clone() for i, row in zip(projecting, projected, strict=True)}
    made: dict[tuple[str, str, str, str], EncodedInput] = {}
    for i in missing:
        if cached and keys[i] in made:  # the same adapter and condition twice in one call
            entries[i] = made[keys[i]]
            continue
        ready = prepared.pop(i, None) or _PreparedInput.of(artifact, adapters[i])
        entries[i] = ready.encode(artifact, conditions[i], vectors.get(i), own_factors=cached)
        if cached:
            made[keys[i]] = entries[i]
            cache.put(keys[i], entries[i])
    return entries
