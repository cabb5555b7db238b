"""The HTTP ingress (FastAPI on Ray Serve): OpenAI-compatible completions over the model deployment.

Endpoints: ``POST /v1/completions`` (``stream: true`` for server-sent events), ``GET /v1/models``,
``GET /healthz``. The ``model`` field is ``base``, a catalog adapter id, a fusion spec (JSON) or
the ``fused-<hash>`` id of a spec served before. Every bad request gets a 4xx JSON body
``{"error": {"message", "type", "code"}}`` and never reaches the model.

Build the application with :func:`build_app` (``import_path: serve.app:build_app`` in a Serve
config, see ``serve/configs/lab.yaml``).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import hmac
import json
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import CatalogError, IcmfError
from engine.lru import ByteBoundedLRU
from serve.config import ServeConfig
from serve.deployment import AdapterModel
from serve.host import load_tokenizer
from serve.metrics import RequestMetrics
from serve.spec import BASE_MODEL_ID, SpecError, Target, parse_model_field

MAX_KNOWN_FUSIONS = 1024
# Catalog adapter ids already found in the catalog. A catalog only grows (ids are content hashes),
# so a found id stays valid and its check costs no manifest LIST per request (one per request on
# an object store); a removed one would still get its 404 from the model replica's load.
MAX_KNOWN_IDS = 4096
api = FastAPI(title="ICM-Fusion serving", docs_url=None, redoc_url=None)


class ApiError(IcmfError):
    """A request fault with its HTTP status and a reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CompletionRequest(pydantic.BaseModel):
    """The subset of OpenAI's completion request this server honours (greedy decoding)."""

    model_config = pydantic.ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    max_tokens: int = pydantic.Field(16, ge=1)
    stream: bool = False
    n: int = pydantic.Field(1, ge=1, le=1, description="one completion per request")
    echo: bool = False
    ignore_eos: bool = pydantic.Field(False, description="vLLM's extension: generate exactly max_tokens")

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"'prompt' must be one string (got a list of {len(self.prompt)})")
        return self.prompt[0]


def error_response(status: int, message: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))  # e.g. 404 unknown route, 405


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, f"invalid request: {exc.errors()}")


# Helpers come before the deployment: Serve pickles the class when it is decorated.
async def _first_item(generator):
    try:
        return await generator.__anext__()
    except StopAsyncIteration:
        return None


async def _call_with_retry(call, attempts: int = 3):
    """Await a handle call, retrying when the replica died under it (Serve restarts it)."""
    from ray.exceptions import RayActorError

    for attempt in range(attempts):
        try:
            return await call()
        except RayActorError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


def _completion(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int):
    body = _chunk(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, text, finish)
    body["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return body


def _model_card(model_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "icmf", **meta}


def _context_size(base_model: str) -> int:
    config = json.loads((Path(base_model) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Router:
    """Validates requests, resolves the ``model`` field and forwards to :class:`AdapterModel`."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any], token: str | None):
        from engine.catalog.catalog import Catalog

        self.model = model
        self.config = ServeConfig.from_args(config, check_paths=False)
        self.limits = self.config.limits
        self.catalog = Catalog(self.config.catalog)
        self.tokenizer = load_tokenizer(self.config.tokenizer, self.config.tokenizer_kind)
        self.context_size = _context_size(self.config.base_model)
        self.token = token
        self.fusions: OrderedDict[str, dict[str, Any]] = OrderedDict()  # served specs, newest last
        self._known_ids = ByteBoundedLRU(MAX_KNOWN_IDS)  # count-bounded: each id "weighs" 1
        self._known_tasks: set[str] = set()
        self.metrics = RequestMetrics()

    # ------------------------------------------------------------------ endpoints
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            self._authorize(request)
            body = await self._read_body(request)
            target = self._resolve(body.model)
            prompt_ids = self._encode(body)
        except ApiError as exc:
            self.metrics.count(exc.status)
            return error_response(exc.status, str(exc))
        payload = {
            "prompt_ids": prompt_ids,
            "max_tokens": body.max_tokens,
            "ignore_eos": body.ignore_eos,
            "spec": target.spec,
        }
        handle = self.model.options(multiplexed_model_id=target.model_id)
        if body.stream:
            return await self._stream(handle, payload, target, body)
        result = await _call_with_retry(lambda: handle.complete.remote(payload))
        if "error" in result:
            self.metrics.count(result["error"]["status"])
            return error_response(result["error"]["status"], result["error"]["message"])
        self._remember(target)
        self.metrics.count(200)
        tokens = result["tokens"]
        finish = "length" if len(tokens) >= body.max_tokens else "stop"
        return _completion(
            target.model_id, self.tokenizer.decode(tokens), finish, len(prompt_ids), len(tokens)
        )

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as exc:
            return error_response(exc.status, str(exc))
        data = [_model_card(BASE_MODEL_ID, {"kind": "base"})]
        data += [_model_card(e["id"], {"kind": "adapter", "task": e["task"]}) for e in self.catalog.entries()]
        data += [_model_card(k, {"kind": "fusion", "spec": v}) for k, v in reversed(self.fusions.items())]
        return {"object": "list", "data": data}

    @api.get("/healthz")
    async def healthz(self):
        try:
            state = await self.model.health.remote()
        except Exception as exc:  # a replica is down or restarting
            return error_response(503, f"model deployment unavailable: {type(exc).__name__}")
        return {"status": "ok", **state}

    # ------------------------------------------------------------------ request checks
    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")

    async def _read_body(self, request: Request) -> CompletionRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.limits.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.limits.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            return CompletionRequest.model_validate(data)
        except pydantic.ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ApiError(422, f"invalid request: {reasons}") from None

    def _resolve(self, model: Any) -> Target:
        try:
            target = parse_model_field(model, tuple(self.config.base_aliases), self.limits.max_model_chars)
        except SpecError as exc:
            raise ApiError(exc.status, str(exc)) from None
        if target.kind == "adapter" and target.model_id in self.fusions:
            return Target("fusion", target.model_id, self.fusions[target.model_id])
        if target.kind == "adapter":
            self._check_adapter(target.model_id)
        elif target.kind == "fusion":
            self._check_spec(target.spec)
        return target

    def _check_adapter(self, adapter_id: str) -> None:
        if self._known_ids.get(adapter_id):
            return
        try:
            self.catalog.get(adapter_id)
        except CatalogError:
            raise ApiError(
                404,
                f"unknown model {adapter_id!r}: not 'base', a catalog adapter or a served fusion "
                "(see GET /v1/models)",
            ) from None
        self._known_ids.put(adapter_id, True, 1)

    def _check_spec(self, spec: dict[str, Any]) -> None:
        from engine.fusion.registry import get_method

        try:
            get_method(spec["method"])
        except ValueError as exc:
            raise ApiError(422, f"invalid fusion spec: {exc}") from None
        if spec["method"] == "icm" and not self.config.fvae:
            raise ApiError(422, "method 'icm' needs an F-VAE and this server has none (config: fvae)")
        if "tasks" in spec:
            unknown = set(spec["tasks"]) - self._known_tasks
            if unknown:  # tasks only ever appear: re-read the catalog's only for a new name
                self._known_tasks = set(self.catalog.tasks())
                unknown = sorted(unknown - self._known_tasks)
            if unknown:
                raise ApiError(404, f"unknown task(s) {', '.join(unknown)} in fusion spec")
        else:
            for adapter_id in spec["adapters"]:
                self._check_adapter(adapter_id)

    def _encode(self, body: CompletionRequest) -> list[int]:
        if body.echo:
            raise ApiError(400, "'echo' is not supported")
        text = body.prompt_text()
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(text)} characters; at most {self.limits.max_prompt_chars}")
        if body.max_tokens > self.limits.max_tokens:
            raise ApiError(
                400, f"max_tokens {body.max_tokens} is over this server's limit {self.limits.max_tokens}"
            )
        ids = self.tokenizer.encode(text)
        if len(ids) + body.max_tokens > self.context_size:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) exceed the context {self.context_size}",
            )
        return ids

    def _remember(self, target: Target) -> None:
        if target.kind != "fusion":
            return
        self.fusions[target.model_id] = target.spec
        self.fusions.move_to_end(target.model_id)
        while len(self.fusions) > MAX_KNOWN_FUSIONS:
            self.fusions.popitem(last=False)

    # ------------------------------------------------------------------ streaming
    async def _stream(self, handle: DeploymentHandle, payload, target: Target, body: CompletionRequest):
        generator = handle.options(stream=True).stream.remote(payload)
        first = await _first_item(generator)
        if first is not None and "error" in first:
            self.metrics.count(first["error"]["status"])
            return error_response(first["error"]["status"], first["error"]["message"])
        self._remember(target)
        self.metrics.count(200)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        async def events():
            count = 0
            item = first
            while item is not None:
                count += len(item["tokens"])
                text = self.tokenizer.decode(item["tokens"])
                yield _sse(_chunk(cid, created, target.model_id, text, None))
                item = await _first_item(generator)
            finish = "length" if count >= body.max_tokens else "stop"
            yield _sse(_chunk(cid, created, target.model_id, "", finish))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from a Serve config's ``args`` (validated, every fault listed).

    Local relative paths resolve against the current directory; the bearer token (config or its
    environment variable) is read here, in the process that builds the application.
    """
    config = ServeConfig.from_args(args)
    resolved = config.model_dump()
    for name in ("catalog", "base_model", "tokenizer", "fvae"):
        value = resolved[name]
        if value and "://" not in value:
            resolved[name] = str(Path(value).resolve())
    model = AdapterModel.options(
        num_replicas=config.num_replicas, ray_actor_options={"num_cpus": config.num_cpus}
    ).bind(resolved)
    return Router.bind(model, resolved, config.resolved_token())
