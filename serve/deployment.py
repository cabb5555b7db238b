"""The model deployment: base model + adapter cache on each replica (Ray Serve edge).

Routing uses Serve model multiplexing: the router sends each request with
``multiplexed_model_id`` (catalog id or ``fused-<hash>``) so Serve prefers replicas that already
hold it, and :meth:`AdapterModel._register` (``@serve.multiplexed``) reports the ids a replica
holds. The weights themselves live in :class:`serve.cache.AdapterCache`, which has the load
semantics Serve's multiplexer lacks (see that module); ``_register`` only returns the id, so
Serve's own LRU never unloads weights.

Every model operation (load, unload, forward) runs on one worker thread: the host's adapter dicts
must not change under a running forward, and the event loop stays free for streaming.

A load that fails because of the request (unknown input, invalid spec, a fusion that breaks down
or gives a non-finite or out-of-bounds adapter) is a :class:`LoadError` with a 4xx status and is
negative-cached; anything else is a server fault, answered 500 and retried by the next request.
The base weights' fingerprint is taken once at start-up and re-checked every
``fingerprint_check_s`` in the background, never per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from engine.errors import CatalogError, IcmfError
from engine.tasks.tokenizers import load_tokenizer
from serve.cache import AdapterCache, describe
from serve.config import ServeConfig
from serve.host import BASE_ADAPTER, MultiLoraHost, load_causal_lm
from serve.metrics import AGGREGATOR_DEPLOYMENT, PUSH_PERIOD_S, ReplicaMetrics
from serve.spec import BASE_MODEL_ID, FUSED_PREFIX

ROUTING_IDS_PER_REPLICA = 256
# Largest |entry| of a servable LoRA factor (A, or B times its scaling): trained and fused adapters
# stay orders of magnitude below; beyond it the activations overflow and the output is garbage.
MAX_FACTOR_ABS = 1e4
logger = logging.getLogger(__name__)


class LoadError(IcmfError):
    """An adapter could not be loaded; ``status`` is the HTTP status to report."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    @staticmethod
    def is_user_fault(exc: BaseException) -> bool:
        """Whether ``exc`` is deterministic for its id (a 4xx): only those are negative-cached."""
        return isinstance(exc, LoadError) and exc.status < 500


def check_servable(adapter) -> None:
    """Refuse an adapter whose factors are not finite or exceed :data:`MAX_FACTOR_ABS`.

    Raises:
        LoadError: 422, naming the first offending module.
    """
    import torch

    for name, module in adapter.modules.items():
        for label, factor in (("A", module.A), ("B", module.B * module.scaling)):
            if not torch.isfinite(factor).all():
                raise LoadError(f"the fused adapter is not finite (module {name!r}, {label})", 422)
            peak = float(factor.abs().max()) if factor.numel() else 0.0
            if peak > MAX_FACTOR_ABS:
                raise LoadError(
                    f"the fused adapter is out of bounds (module {name!r}, |{label}| = {peak:.3g} > "
                    f"{MAX_FACTOR_ABS:g}); use smaller weights or parameters",
                    422,
                )


def error_result(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


# Helpers come before the deployment: Serve pickles the class when it is decorated.
def fuse_spec(catalog, spec: dict[str, Any], fvae=None, icm_inputs=None):
    """The adapter a canonical fusion spec names, fused as ``icmf fuse`` fuses it (one
    :func:`engine.fusion.fusion_context`: the F-VAE, the catalog's stored task vectors and Gram
    matrices, and hyperparameters picked on the tasks' support examples unless the spec says
    ``"support_selection": false``)."""
    from engine.fusion.api import fuse_from_catalog, fusion_context

    selection = {"adapter_ids": spec.get("adapters"), "tasks": spec.get("tasks")}
    context = fusion_context(
        spec["method"],
        spec["params"],
        catalog=catalog,
        fvae=fvae,
        support_selection=spec.get("support_selection", True),
        icm_inputs_cache=icm_inputs,
        **selection,
    )
    return fuse_from_catalog(
        catalog,
        spec["method"],
        weights=spec["weights"],
        params=spec["params"],
        seed=spec["seed"],
        context=context,
        **selection,
    ).adapter


def _generate_grouped(host: MultiLoraHost, prompts, adapters, budgets, ignore, sampling) -> list[list[int]]:
    """One forward pass per distinct adapter in the batch (the alternative to mixed batches)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name]
        results = host.generate(
            [prompts[i] for i in idx],
            [name] * len(idx),
            [budgets[i] for i in idx],
            [ignore[i] for i in idx],
            [sampling[i] for i in idx],
        )
        for i, result in zip(idx, results, strict=True):
            outputs[i] = result
    return outputs


def _kind(model_id: str) -> str:
    """The metric label of a model id (a fixed set: ids themselves are client-chosen)."""
    if model_id == BASE_MODEL_ID:
        return "base"
    return "fusion" if model_id.startswith(FUSED_PREFIX) else "stored"


# Health-check period and timeout come from the serving config (build_app sets them).
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class AdapterModel:
    """Hosts the base model once and serves completions for base, stored and fused adapters."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from engine.catalog.catalog import Catalog

        self.config = ServeConfig.from_args(config, check_paths=False)
        torch.set_num_threads(self.config.torch_threads)
        self.catalog = Catalog(self.config.catalog, adapter_cache_bytes=self.config.read_cache_mib * 2**20)
        tokenizer = load_tokenizer(self.config.tokenizer, self.config.tokenizer_kind)
        self.host = MultiLoraHost(
            load_causal_lm(self.config.base_model), tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        self.fvae = None
        self.icm_inputs = None
        if self.config.fvae:
            from engine.fusion.icm.inputs import IcmInputsCache
            from engine.fvae.artifact import FVAEArtifact

            self.fvae = FVAEArtifact.load(self.config.fvae)
            if self.config.icm_cache_mib:
                self.icm_inputs = IcmInputsCache(self.config.icm_cache_mib * 2**20)
                _ = self.fvae.fingerprint  # cache keys hash the F-VAE's weights: once, at start-up
        # Import every fusion method now (the registry pulls in PEFT's merge utilities, seconds
        # of imports) so the first fusion request does not pay for it.
        from engine.fusion.registry import list_methods

        list_methods()
        self.metrics = ReplicaMetrics()
        self.cache: AdapterCache = AdapterCache(
            loader=self._load,
            unloader=self._unload,
            capacity=self.config.cache_size,
            negative_ttl_s=self.config.negative_ttl_s,
            on_event=self.metrics.cache_event,
            remember_failure=LoadError.is_user_fault,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icmf-model")
        self.base_fingerprint = self.host.base_fingerprint()  # once; re-checked by _watch_base
        self._fingerprint_state = {"ok": True, "checked_at": time.time(), "checks": 1}
        self._background: list[asyncio.Task] = []
        self._specs: dict[str, dict[str, Any]] = {}  # model id -> canonical fusion spec (bounded below)
        self._generate_batch.set_max_batch_size(self.config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    # ------------------------------------------------------------------ routing and loading
    # A routing hint only: Serve remembers the last ids this replica served (strings, no weights)
    # and prefers it for them; an id our cache has evicted since is just a miss here.
    @serve.multiplexed(max_num_models_per_replica=ROUTING_IDS_PER_REPLICA)
    async def _register(self, model_id: str) -> str:
        return model_id

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _load(self, model_id: str) -> str:
        spec = self._specs.get(model_id)
        start = time.perf_counter()
        try:
            await self._run(self._load_sync, model_id, spec)
        finally:
            if self.icm_inputs is not None:  # a failed icm fusion may have used the cache too
                icm = self.icm_inputs.describe()
                self.metrics.icm_inputs(icm["hits"], icm["misses"])
        self.metrics.load_seconds("fusion" if spec else "stored", time.perf_counter() - start)
        return model_id

    def _load_sync(self, model_id: str, spec: dict[str, Any] | None) -> None:
        import torch

        try:
            catalog = self.catalog.at()  # one manifest listing per load, whatever the inputs
            if spec is None:
                adapter = catalog.load_adapter(model_id)
            else:
                adapter = fuse_spec(catalog, spec, self.fvae, self.icm_inputs)
        except CatalogError as exc:
            raise LoadError(str(exc), 404) from None
        except ValueError as exc:  # fusion config faults, name rules
            raise LoadError(str(exc), 422) from None
        except torch.linalg.LinAlgError as exc:  # an SVD or solve that the inputs and weights break
            raise LoadError(f"fusion failed on these inputs and weights: {exc}", 422) from None
        if spec is not None:
            check_servable(adapter)
        try:
            self.host.add(model_id, adapter)
        except ValueError as exc:  # does not fit this base model
            raise LoadError(str(exc), 422) from None

    async def _unload(self, model_id: str, _value: str) -> None:
        await self._run(self.host.remove, model_id)

    # ------------------------------------------------------------------ requests
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One completion: ``{"prompt_ids", "max_tokens", "spec"?, "sampling"?}`` -> ``{"tokens"}``
        or ``{"error": {"status", "message"}}``."""
        model_id = serve.get_multiplexed_model_id() or BASE_MODEL_ID
        self.metrics.in_flight(_kind(model_id), +1)
        try:
            if model_id == BASE_MODEL_ID:
                return {"tokens": await self._generate_batch((BASE_ADAPTER, request))}
            await self._register(model_id)
            self._remember_spec(model_id, request.get("spec"))
            async with self.cache.lease(model_id):
                return {"tokens": await self._generate_batch((model_id, request))}
        except LoadError as exc:
            return error_result(exc.status, str(exc))
        except Exception as exc:  # a server fault: a JSON 500 for this request, the replica serves on
            logger.exception("completion failed for %s", model_id)
            return error_result(500, f"internal error ({type(exc).__name__}); retry later")
        finally:
            self.metrics.in_flight(_kind(model_id), -1)

    async def stream(self, request: dict[str, Any]):
        """Streaming completion: yields ``{"tokens": [id]}`` per generated token, or an error item
        (first, when nothing was generated; last, when generation broke down mid-stream)."""
        model_id = serve.get_multiplexed_model_id() or BASE_MODEL_ID
        self.metrics.in_flight(_kind(model_id), +1)
        try:
            if model_id == BASE_MODEL_ID:
                async for item in self._stream_tokens(BASE_ADAPTER, request):
                    yield item
                return
            await self._register(model_id)
            self._remember_spec(model_id, request.get("spec"))
            async with self.cache.lease(model_id):
                async for item in self._stream_tokens(model_id, request):
                    yield item
        except LoadError as exc:
            yield error_result(exc.status, str(exc))
        except Exception as exc:
            logger.exception("stream failed for %s", model_id)
            yield error_result(500, f"internal error ({type(exc).__name__}); retry later")
        finally:
            self.metrics.in_flight(_kind(model_id), -1)

    async def _stream_tokens(self, adapter: str, request: dict[str, Any]):
        steps = self.host.steps(
            [request["prompt_ids"]],
            [adapter],
            [request["max_tokens"]],
            [bool(request.get("ignore_eos"))],
            [request.get("sampling")],
        )
        while True:
            step = await self._run(next, steps, None)
            if step is None or step[0] is None:
                return
            yield {"tokens": [step[0]]}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, items: list[tuple[str, dict[str, Any]]]) -> list[list[int]]:
        adapters = [a for a, _ in items]
        prompts = [r["prompt_ids"] for _, r in items]
        budgets = [r["max_tokens"] for _, r in items]
        ignore = [bool(r.get("ignore_eos")) for _, r in items]
        sampling = [r.get("sampling") for _, r in items]
        self.metrics.batch_size(len(items))
        if self.config.batching == "mixed":
            return await self._run(self.host.generate, prompts, adapters, budgets, ignore, sampling)
        return await self._run(_generate_grouped, self.host, prompts, adapters, budgets, ignore, sampling)

    def _remember_spec(self, model_id: str, spec: dict[str, Any] | None) -> None:
        if spec is not None:
            if len(self._specs) > 16 * self.config.cache_size:
                self._specs.pop(next(iter(self._specs)))
            self._specs[model_id] = spec

    # ------------------------------------------------------------------ health
    def _start_background(self) -> None:
        """Start the base watcher and the metrics push (on the replica's event loop, which
        ``__init__`` does not run on)."""
        if self._background:
            return
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._push_metrics()))
        if self.config.fingerprint_check_s > 0:
            self._background.append(loop.create_task(self._watch_base()))

    async def _push_metrics(self) -> None:
        """Send the router this replica's metric changes every ``PUSH_PERIOD_S``; it serves the
        application's totals at ``/metrics`` (see :mod:`serve.metrics`)."""
        context = serve.get_replica_context()
        router = serve.get_deployment_handle(AGGREGATOR_DEPLOYMENT, context.app_name)
        replica = context.replica_id.unique_id
        while True:
            await asyncio.sleep(PUSH_PERIOD_S)
            changes = self.metrics.changes()
            try:
                await router.record_replica_metrics.remote(replica, changes)
            except Exception as exc:  # the router is restarting: these changes go with the next push
                logger.warning("metrics push to the router failed: %s", exc)
                continue
            self.metrics.acknowledge(changes)

    async def _watch_base(self) -> None:
        """Re-hash the base weights every ``fingerprint_check_s`` (on the model thread, between
        forwards); a change marks the replica unhealthy so Serve replaces it."""
        while True:
            await asyncio.sleep(self.config.fingerprint_check_s)
            fingerprint = await self._run(self.host.base_fingerprint)
            self._fingerprint_state = {
                "ok": fingerprint == self.base_fingerprint,
                "checked_at": time.time(),
                "checks": self._fingerprint_state["checks"] + 1,
            }
            if not self._fingerprint_state["ok"]:
                logger.error("base weights changed: %s != %s", fingerprint, self.base_fingerprint)

    async def check_health(self) -> None:
        """Serve's periodic health check (cheap: no hashing here)."""
        self._start_background()
        if not self._fingerprint_state["ok"]:
            raise RuntimeError("the base weights changed since start-up")

    async def ping(self) -> bool:
        """Liveness for ``/healthz``: no ids, no hashing."""
        self._start_background()
        return self._fingerprint_state["ok"]

    async def status(self) -> dict[str, Any]:
        """Cache state and the base weights' fingerprint (taken at start-up, re-checked on a timer)."""
        self._start_background()
        return {
            "cache": describe(self.cache),
            "icm_inputs_cache": self.icm_inputs.describe() if self.icm_inputs is not None else None,
            "base_fingerprint": self.base_fingerprint,
            "base_fingerprint_check": dict(self._fingerprint_state, every_s=self.config.fingerprint_check_s),
            "adapters": sorted(self.host.names),
        }
