"""The model deployment: base model + adapter cache on each replica (Ray Serve edge).

Routing uses Serve model multiplexing: the router sends each request with
``multiplexed_model_id`` (catalog id or ``fused-<hash>``) so Serve prefers replicas that already
hold it, and :meth:`AdapterModel._register` (``@serve.multiplexed``) reports the ids a replica
holds. The weights themselves live in :class:`serve.cache.AdapterCache`, which has the load
semantics Serve's multiplexer lacks (see that module); ``_register`` only returns the id, so
Serve's own LRU never unloads weights.

Every model operation (load, unload, forward) runs on one worker thread: the host's adapter dicts
must not change under a running forward, and the event loop stays free for streaming.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from engine.errors import CatalogError, IcmfError
from serve.cache import AdapterCache, describe
from serve.config import ServeConfig
from serve.host import BASE_ADAPTER, LoraHost, load_causal_lm, load_tokenizer
from serve.metrics import ServeMetrics
from serve.spec import BASE_MODEL_ID

ROUTING_IDS_PER_REPLICA = 256


class LoadError(IcmfError):
    """An adapter could not be loaded; ``status`` is the HTTP status to report."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def error_result(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


# Helpers come before the deployment: Serve pickles the class when it is decorated.
def _generate_grouped(host: LoraHost, prompts, adapters, budgets, ignore) -> list[list[int]]:
    """One forward pass per distinct adapter in the batch (the alternative to mixed batches)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name]
        results = host.generate(
            [prompts[i] for i in idx], [name] * len(idx), [budgets[i] for i in idx], [ignore[i] for i in idx]
        )
        for i, result in zip(idx, results, strict=True):
            outputs[i] = result
    return outputs


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
        self.host = LoraHost(
            load_causal_lm(self.config.base_model), tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        self.fvae = None
        self.icm_inputs = None
        if self.config.fvae:
            from engine.fusion.icm_inputs import IcmInputsCache
            from engine.meta.artifact import FVAEArtifact

            self.fvae = FVAEArtifact.load(self.config.fvae)
            if self.config.icm_cache_mib:
                self.icm_inputs = IcmInputsCache(self.config.icm_cache_mib * 2**20)
                _ = self.fvae.fingerprint  # cache keys hash the F-VAE's weights: once, at start-up
        # Import every fusion method now (the registry pulls in PEFT's merge utilities, seconds
        # of imports) so the first fusion request does not pay for it.
        from engine.fusion.registry import list_methods

        list_methods()
        self.metrics = ServeMetrics()
        self.cache: AdapterCache = AdapterCache(
            loader=self._load,
            unloader=self._unload,
            capacity=self.config.cache_size,
            negative_ttl_s=self.config.negative_ttl_s,
            on_event=self.metrics.cache_event,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icmf-model")
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
        await self._run(self._load_sync, model_id, spec)
        self.metrics.load_seconds("fusion" if spec else "stored", time.perf_counter() - start)
        return model_id

    def _load_sync(self, model_id: str, spec: dict[str, Any] | None) -> None:
        from engine.fusion.api import fuse_from_catalog

        try:
            if spec is None:
                adapter = self.catalog.load_adapter(model_id)
            else:
                adapter = fuse_from_catalog(
                    self.catalog,
                    spec["method"],
                    adapter_ids=spec.get("adapters"),
                    tasks=spec.get("tasks"),
                    weights=spec["weights"],
                    params=spec["params"],
                    seed=spec["seed"],
                    context=self._fusion_context(),
                ).adapter
        except CatalogError as exc:
            raise LoadError(str(exc), 404) from None
        except ValueError as exc:  # fusion config faults, name rules
            raise LoadError(str(exc), 422) from None
        self.host.add(model_id, adapter)

    def _fusion_context(self) -> dict[str, Any] | None:
        if self.fvae is None:
            return None
        from engine.fusion.icm_inputs import CACHE_CONTEXT_KEY

        return {"fvae": self.fvae, CACHE_CONTEXT_KEY: self.icm_inputs}

    async def _unload(self, model_id: str, _value: str) -> None:
        await self._run(self.host.remove, model_id)

    # ------------------------------------------------------------------ requests
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """One completion: ``{"prompt_ids", "max_tokens", "spec"?}`` -> ``{"tokens"}`` or error."""
        model_id = serve.get_multiplexed_model_id() or BASE_MODEL_ID
        if model_id == BASE_MODEL_ID:
            return {"tokens": await self._generate_batch((BASE_ADAPTER, request))}
        await self._register(model_id)
        self._remember_spec(model_id, request.get("spec"))
        try:
            async with self.cache.lease(model_id):
                self.metrics.in_flight(model_id, self.cache.leases(model_id))
                try:
                    tokens = await self._generate_batch((model_id, request))
                finally:
                    self.metrics.in_flight(model_id, self.cache.leases(model_id) - 1)
        except LoadError as exc:
            return error_result(exc.status, str(exc))
        return {"tokens": tokens}

    async def stream(self, request: dict[str, Any]):
        """Streaming completion: yields ``{"tokens": [id]}`` per generated token (or one error)."""
        model_id = serve.get_multiplexed_model_id() or BASE_MODEL_ID
        if model_id == BASE_MODEL_ID:
            async for item in self._stream_tokens(BASE_ADAPTER, request):
                yield item
            return
        await self._register(model_id)
        self._remember_spec(model_id, request.get("spec"))
        try:
            async with self.cache.lease(model_id):
                async for item in self._stream_tokens(model_id, request):
                    yield item
        except LoadError as exc:
            yield error_result(exc.status, str(exc))

    async def _stream_tokens(self, adapter: str, request: dict[str, Any]):
        steps = self.host.steps(
            [request["prompt_ids"]], [adapter], [request["max_tokens"]], [bool(request.get("ignore_eos"))]
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
        self.metrics.batch_size(len(items))
        if self.config.batching == "mixed":
            return await self._run(self.host.generate, prompts, adapters, budgets, ignore)
        return await self._run(_generate_grouped, self.host, prompts, adapters, budgets, ignore)

    def _remember_spec(self, model_id: str, spec: dict[str, Any] | None) -> None:
        if spec is not None:
            if len(self._specs) > 16 * self.config.cache_size:
                self._specs.pop(next(iter(self._specs)))
            self._specs[model_id] = spec

    async def health(self) -> dict[str, Any]:
        """Cache state and the base weights' fingerprint (unchanged by any number of swaps)."""
        fingerprint = await self._run(self.host.base_fingerprint)
        return {
            "cache": describe(self.cache),
            "icm_inputs_cache": self.icm_inputs.describe() if self.icm_inputs is not None else None,
            "base_fingerprint": fingerprint,
            "adapters": sorted(self.host.names),
        }
