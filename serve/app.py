"""The HTTP ingress (FastAPI on Ray Serve): OpenAI-compatible completions over the model deployment.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` for
server-sent events; chat only for a base whose tokenizer has a chat template, else 404),
``GET /v1/models``, ``GET /status`` (caches, base fingerprint), ``GET /metrics`` (Prometheus,
see :mod:`serve.metrics`), ``GET /openapi.json``,
``GET /docs`` and the open liveness probe ``GET /healthz`` (no ids, no hashing). With a bearer
token configured every route but ``/healthz`` needs it. The ``model`` field is ``base``, a
catalog adapter id, a fusion spec (JSON) or the ``fused-<hash>`` id of a spec served before.
Every bad request gets a 4xx JSON body ``{"error": {"message", "type", "code"}}`` and never
reaches the model; a server fault is a JSON 500, never a bare text page.

Build the application with :func:`build_app` (``import_path: serve.app:build_app`` in a Serve
config, see ``serve/configs/lab.yaml``).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import CatalogError, IcmfError, pydantic_faults
from engine.lru import ByteBoundedLRU
from engine.paths import absolute_location
from engine.tasks.tokenizers import load_tokenizer
from serve.config import PATH_FIELDS, ServeConfig
from serve.deployment import AdapterModel
from serve.metrics import AGGREGATOR_DEPLOYMENT, UNMATCHED_ROUTE, router_metrics
from serve.spec import (
    BASE_MODEL_ID,
    MAX_SEED,
    JsonError,
    ModelFieldError,
    Target,
    check_method_params,
    loads_strict,
    parse_model_field,
)

MAX_KNOWN_FUSIONS = 1024
# Catalog adapter ids already found in the catalog. A catalog only grows (ids are content hashes),
# so a found id stays valid and its check costs no manifest LIST per request (one per request on
# an object store); a removed one would still get its 404 from the model replica's load.
MAX_KNOWN_IDS = 4096
# A call whose model replica died under it is retried this often (Serve starts a new replica).
REPLICA_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.25
HEALTH_TIMEOUT_S = 5.0
MAX_STOP_SEQUENCES = 4
MAX_CHAT_MESSAGES = 64
logger = logging.getLogger(__name__)
# openapi_url=None: the schema and the docs are served by Router methods, behind the token.
api = FastAPI(title="ICM-Fusion serving", docs_url=None, redoc_url=None, openapi_url=None)


class CountResponses:
    """ASGI middleware: counts every response by route template and status, whatever produced it
    (an endpoint, an exception handler, an unknown path); a request that ends in an exception
    before any response started is counted as the 500 the client gets."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            # FastAPI's router puts the matched route in the (shared) scope; its path is the
            # template, never the client's path, so the label stays bounded.
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            router_metrics().count(route, status)


api.add_middleware(CountResponses)


class ApiError(IcmfError):
    """A request fault with its HTTP status and a reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class GenerationRequest(pydantic.BaseModel):
    """The OpenAI generation parameters this server honours, and those it refuses.

    Decoding is greedy unless ``temperature`` > 0 is given (then temperature / ``top_p``
    sampling, reproducible with ``seed``). ``stop`` ends the text at the first of up to four
    strings (not included). A parameter that is not supported, or unknown, is a 400 naming it
    (never silently ignored); a supported one left at its no-op value (``n: 1``,
    ``logprobs: null``, ``presence_penalty: 0``...) is accepted.
    """

    model_config = pydantic.ConfigDict(extra="allow")
    model: str
    max_tokens: int = pydantic.Field(16, ge=1)
    stream: bool = False
    temperature: float | None = pydantic.Field(None, ge=0, le=2)
    top_p: float | None = pydantic.Field(None, gt=0, le=1)
    seed: int | None = pydantic.Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: str | list[str] | None = None
    ignore_eos: bool = pydantic.Field(False, description="vLLM's extension: generate exactly max_tokens")
    user: str | None = None  # an end-user id for the operator's logs; no effect on the output
    # Accepted only at their no-op values (see NO_OP):
    n: int | None = 1
    best_of: int | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    stream_options: dict[str, Any] | None = None
    echo: bool | None = False
    suffix: str | None = None

    NO_OP: ClassVar[dict[str, tuple[Any, ...]]] = {
        "n": (1, None),
        "best_of": (1, None),
        "logprobs": (None, False, 0),
        "top_logprobs": (None, 0),
        "logit_bias": (None, {}),
        "presence_penalty": (0, None),
        "frequency_penalty": (0, None),
        "stream_options": (None,),
        "echo": (False, None),
        "suffix": (None, ""),
    }

    def unsupported(self) -> list[str]:
        """Names of the parameters asked for that this server does not implement, or does not know."""
        names = [k for k, allowed in self.NO_OP.items() if getattr(self, k) not in allowed]
        return names + sorted(self.model_extra or {})

    def sampling(self) -> dict[str, Any] | None:
        """``{"temperature", "top_p", "seed"}`` for the decode loop, or ``None`` (greedy)."""
        if not self.temperature:
            return None
        return {"temperature": self.temperature, "top_p": self.top_p or 1.0, "seed": self.seed}

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(0 < len(s) <= 64 for s in stops):
            raise ApiError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} strings of 1 to 64 characters")
        return stops


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"'prompt' must be one string (got a list of {len(self.prompt)})")
        return self.prompt[0]


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = pydantic.Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)

    @pydantic.model_validator(mode="after")
    def _newer_name(self) -> "ChatRequest":
        if self.max_completion_tokens is not None:  # the chat API's newer name for max_tokens
            self.max_tokens = self.max_completion_tokens
        return self


def parse_body(raw: bytes, kind: type[GenerationRequest]) -> GenerationRequest:
    """A request body as ``kind``: 400 for bytes that are not a strict JSON object or that ask
    for an unsupported parameter, 422 for invalid fields."""
    try:
        data = loads_strict(raw)
    except JsonError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ApiError(422, f"invalid request: {'; '.join(pydantic_faults(exc.errors()))}") from None
    except RecursionError:  # the fields' validators on a deep (but parseable) structure
        raise ApiError(400, "request body is nested too deeply") from None
    unsupported = body.unsupported()
    if unsupported:
        raise ApiError(
            400,
            f"unsupported parameter(s): {', '.join(unsupported)} (supported: model, prompt/messages, "
            "max_tokens, stream, temperature, top_p, seed, stop, user, ignore_eos)",
        )
    body.stop_list()
    return body


def parse_completion_body(raw: bytes) -> CompletionRequest:
    return parse_body(raw, CompletionRequest)  # type: ignore[return-value]


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, read in pieces and refused (413) as soon as it passes ``limit`` bytes,
    whatever ``Content-Length`` says or whether the body is chunked."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)`` after appending ``text``."""
        self.pending += text
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            emit, self.pending = self.pending[: min(cuts)], ""
            return emit, True
        hold = max((self._overlap(s) for s in self.stops), default=0)
        emit = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return emit, False

    def _overlap(self, stop: str) -> int:
        """The longest suffix of the pending text that is a proper prefix of ``stop``."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    emitted, stopped = StopMatcher(stops).feed(text)
    return (emitted, True) if stopped else (text, False)


def require_chat_template(tokenizer) -> None:
    """Raises ApiError 404 when the tokenizer has no chat template (chat is not served)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            404,
            "chat completions are not served: the base model's tokenizer has no chat template "
            "(use POST /v1/completions)",
        )


def chat_prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt token ids of a chat, rendered by the tokenizer's own chat template.

    Raises:
        ApiError: 404 when the tokenizer has no chat template (chat is not served).
    """
    require_chat_template(tokenizer)
    return tokenizer.encode_chat(messages)


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
    return error_response(422, f"invalid request: {'; '.join(pydantic_faults(exc.errors()))}")


@api.exception_handler(Exception)
async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return error_response(500, f"internal error ({type(exc).__name__})")


# Helpers come before the deployment: Serve pickles the class when it is decorated.
async def _first_item(generator):
    try:
        return await generator.__anext__()
    except StopAsyncIteration:
        return None


def _replica_gone(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError, WorkerCrashedError

    return isinstance(exc, RayActorError | WorkerCrashedError)


async def _call_with_retry(call, attempts: int = REPLICA_ATTEMPTS):
    """Await a handle call, retrying when the replica died under it (Serve restarts it)."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if not _replica_gone(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Format:
    """The OpenAI response shapes of one endpoint (``text_completion`` or ``chat.completion``)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._first_chunk = True

    def _body(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        if not self.chat:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            return self._body("text_completion", choice)
        delta = {"content": text} if text or finish is None else {}
        if self._first_chunk:
            delta["role"] = "assistant"
            self._first_chunk = False
        return self._body("chat.completion.chunk", {"index": 0, "delta": delta, "finish_reason": finish})

    def whole(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            body = self._body("chat.completion", choice)
        else:
            body = self.chunk(text, finish)
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


# One replica: it aggregates the model replicas' metrics, so a scrape of /metrics sees them all.
@serve.deployment(
    name=AGGREGATOR_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256
)
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

    # ------------------------------------------------------------------ endpoints
    async def _answer(self, route: str, request: Request, handler) -> Response:
        """Run ``handler`` behind the token; every outcome is a JSON response (counted by
        :class:`CountResponses`)."""
        try:
            self._authorize(request)
            response = await handler()
        except ApiError as exc:
            response = error_response(exc.status, str(exc))
        except Exception as exc:  # a server fault: still JSON, still counted
            logger.exception("%s failed", route)
            response = error_response(500, f"internal error ({type(exc).__name__})")
        return response

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def handler():
            body = parse_completion_body(await read_body_limited(request, self.limits.max_body_bytes))
            return await self._generate(body, self._encode(body.prompt_text()), chat=False)

        return await self._answer("/v1/completions", request, handler)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def handler():
            require_chat_template(self.tokenizer)  # 404 before reading the body
            body = parse_body(await read_body_limited(request, self.limits.max_body_bytes), ChatRequest)
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            chars = sum(len(m["content"]) for m in messages)
            if chars > self.limits.max_prompt_chars:
                raise ApiError(
                    400, f"messages hold {chars} characters; at most {self.limits.max_prompt_chars}"
                )
            return await self._generate(
                body, self._check_length(body, chat_prompt_ids(self.tokenizer, messages)), chat=True
            )

        return await self._answer("/v1/chat/completions", request, handler)

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handler():
            data = [_model_card(BASE_MODEL_ID, {"kind": "base"})]
            data += [
                _model_card(e["id"], {"kind": "adapter", "task": e["task"]}) for e in self.catalog.entries()
            ]
            data += [_model_card(k, {"kind": "fusion", "spec": v}) for k, v in reversed(self.fusions.items())]
            return JSONResponse({"object": "list", "data": data})

        return await self._answer("/v1/models", request, handler)

    @api.get("/status")
    async def status(self, request: Request):
        async def handler():
            try:
                state = await asyncio.wait_for(self.model.status.remote(), HEALTH_TIMEOUT_S)
            except Exception as exc:  # a replica is down, restarting or stuck
                raise ApiError(503, f"model deployment unavailable: {type(exc).__name__}") from None
            return JSONResponse({"status": "ok", "fusions_known": len(self.fusions), **state})

        return await self._answer("/status", request, handler)

    @api.get("/healthz")
    async def healthz(self):
        """Liveness, open to all: no ids, no counts, no hashing (the fingerprint is re-checked on
        the replica's own timer)."""
        try:
            healthy = await asyncio.wait_for(self.model.ping.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # a replica is down, restarting or stuck
            return error_response(503, f"model deployment unavailable: {type(exc).__name__}")
        if not healthy:
            return error_response(503, "the base weights changed since start-up")
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request):
        """Prometheus text: request counts and the model replicas' pushed metrics (auth as above)."""

        async def handler():
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(router_metrics().exposition(), media_type=CONTENT_TYPE_LATEST)

        return await self._answer("/metrics", request, handler)

    async def record_replica_metrics(self, replica: str, families: list[dict[str, Any]]) -> None:
        """A model replica's metric changes since its last push (called through its handle)."""
        router_metrics().replicas.add(replica, families)

    @api.get("/openapi.json")
    async def openapi(self, request: Request):
        return await self._answer("/openapi.json", request, self._openapi)

    async def _openapi(self):
        return JSONResponse(api.openapi())

    @api.get("/docs")
    async def docs(self, request: Request):
        async def handler():
            return get_swagger_ui_html(openapi_url="/openapi.json", title=api.title)

        return await self._answer("/docs", request, handler)

    # ------------------------------------------------------------------ request checks
    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")

    def _resolve(self, model: Any) -> Target:
        try:
            target = parse_model_field(model, tuple(self.config.base_aliases), self.limits.max_model_chars)
        except ModelFieldError as exc:
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
        try:
            check_method_params(spec)
        except ModelFieldError as exc:
            raise ApiError(exc.status, str(exc)) from None
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

    def _encode(self, text: str) -> list[int]:
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(text)} characters; at most {self.limits.max_prompt_chars}")
        return self.tokenizer.encode_with_specials(text)

    def _check_length(self, body: GenerationRequest, ids: list[int]) -> list[int]:
        if body.max_tokens > self.limits.max_tokens:
            raise ApiError(
                400, f"max_tokens {body.max_tokens} is over this server's limit {self.limits.max_tokens}"
            )
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

    # ------------------------------------------------------------------ generation
    async def _generate(self, body: GenerationRequest, prompt_ids: list[int], chat: bool) -> Response:
        self._check_length(body, prompt_ids)
        target = self._resolve(body.model)
        payload = {
            "prompt_ids": prompt_ids,
            "max_tokens": body.max_tokens,
            "ignore_eos": body.ignore_eos,
            "spec": target.spec,
            "sampling": body.sampling(),
        }
        handle = self.model.options(multiplexed_model_id=target.model_id)
        fmt = _Format(chat, target.model_id)
        if body.stream:
            return await self._stream(handle, payload, target, body, fmt)
        result = await _call_with_retry(lambda: handle.complete.remote(payload))
        if "error" in result:
            raise ApiError(result["error"]["status"], result["error"]["message"])
        self._remember(target)
        tokens = result["tokens"]
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens), body.stop_list())
        finish = "stop" if stopped or len(tokens) < body.max_tokens else "length"
        return JSONResponse(fmt.whole(text, finish, len(prompt_ids), len(tokens)))

    async def _open_stream(self, handle: DeploymentHandle, payload):
        """The replica's token stream and its first item; a stream that has produced nothing yet
        is retried like a whole request when its replica dies."""
        for attempt in range(REPLICA_ATTEMPTS):
            generator = handle.options(stream=True).stream.remote(payload)
            try:
                return generator, await _first_item(generator)
            except Exception as exc:
                if not _replica_gone(exc) or attempt == REPLICA_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def _stream(self, handle, payload, target: Target, body: GenerationRequest, fmt: _Format):
        generator, first = await self._open_stream(handle, payload)
        if first is not None and "error" in first:
            raise ApiError(first["error"]["status"], first["error"]["message"])
        self._remember(target)
        stops = StopMatcher(body.stop_list())

        async def events():
            count, stopped, item = 0, False, first
            try:
                while item is not None and not stopped:
                    if "error" in item:  # generation broke down after tokens were sent
                        raise RuntimeError(item["error"]["message"])
                    count += len(item["tokens"])
                    text, stopped = stops.feed(self.tokenizer.decode(item["tokens"]))
                    if text:
                        yield _sse(fmt.chunk(text, None))
                    if not stopped:
                        item = await _first_item(generator)
            except Exception as exc:
                # Tokens were sent already, so no retry: an OpenAI-style error event, then [DONE].
                logger.warning("stream %s cut: %s", fmt.id, exc)
                message = "the model replica failed mid-stream; the completion is incomplete"
                yield _sse({"error": {"message": message, "type": "server_error", "code": 503}})
                yield _sse("[DONE]")
                return
            finally:
                if stopped or item is not None:
                    generator.cancel()  # the client stopped or a stop string matched: free the replica
            tail = stops.flush()
            if tail:
                yield _sse(fmt.chunk(tail, None))
            finish = "stop" if stopped or count < body.max_tokens else "length"
            yield _sse(fmt.chunk("", finish))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from a Serve config's ``args`` (validated, every fault listed).

    Local relative paths resolve against the current directory; the bearer token (config or its
    environment variable) is read here, in the process that builds the application.
    """
    config = ServeConfig.from_args(args)
    resolved = config.model_dump()
    for name in PATH_FIELDS:
        if resolved[name]:
            resolved[name] = absolute_location(resolved[name])
    model = AdapterModel.options(
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": config.num_cpus},
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
    ).bind(resolved)
    return Router.bind(model, resolved, config.resolved_token())
