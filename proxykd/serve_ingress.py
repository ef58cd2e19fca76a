"""The HTTP front of `proxykd serve`: API keys, request limits and OpenAI-shaped errors in front of
Ray Serve LLM's model deployments (`LLMServer`, one vLLM engine per replica).

`create_app(backend, limits, api_key_env)` is a plain FastAPI app over any *backend* (an object with
`model_ids()`, `async model_card(id)` and `generate(kind, body, request)`, an async iterator of the
engine's results); `ProxyKDIngress` is the Ray Serve deployment whose replicas build that app around
Ray Serve LLM's `OpenAiIngress` (which routes each request to the model's `LLMServer` replicas).
The logic here runs and is tested without Ray or vLLM.

What every request meets, in order:
  1. `Guard` (ASGI, before routing): with `serve.api_key_env` set, `Authorization: Bearer KEY` must
     carry one of the keys in that environment variable (comma-separated), on every route (401
     otherwise); the body is read up to `serve.max_body_bytes` (400 above it).
  2. FastAPI parses the body into vLLM's request models (malformed JSON, wrong types: 400).
  3. `check_request`: the model must be served (404), n <= serve.max_n, max_tokens /
     max_completion_tokens <= serve.max_tokens and <= the context length (400, naming the limit);
     a chat request without max_tokens gets serve.max_tokens (a completion request vLLM's default
     of 16, as in OpenAI's API); vLLM then caps it by the room the prompt leaves in the context.
  4. The engine's own refusals (an over-long prompt, logprobs over vLLM's max) come back as 400 with
     vLLM's message, stripped of Ray's internal exception text; anything unexpected is a 500
     whose body says only "internal server error" and the request id (the traceback goes to the log).
  5. `serve.request_timeout_s` bounds the whole request: 408 before the first token, and a stream
     that runs over ends with an error event and `[DONE]`; the engine request is cancelled either way.
Every error body has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol

log = logging.getLogger("proxykd.serve")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                   429: "rate_limit_error", 503: "server_error"}


@dataclass(frozen=True)
class Limits:
    """The request limits of `serve` (see ServeConfig); `max_model_len` per served model, when known."""

    max_tokens: int = 512
    max_n: int = 4
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 120.0
    max_model_len: Optional[dict] = None  # {model name: context length in tokens}

    @classmethod
    def from_config(cls, serve_cfg, max_model_len: Optional[dict] = None) -> "Limits":
        return cls(max_tokens=serve_cfg.max_tokens, max_n=serve_cfg.max_n, max_body_bytes=serve_cfg.max_body_bytes,
                   request_timeout_s=serve_cfg.request_timeout_s, max_model_len=max_model_len)


class ApiError(Exception):
    """An error the client gets, in OpenAI's shape. `message` must never carry secrets or internals."""

    def __init__(self, status: int, message: str, *, type: Optional[str] = None, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: ApiError, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=headers)


_RAY_WRAPPED = re.compile(r"^Message: (?P<msg>.*?), Internal exception: ", re.S)
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")
_INTERNAL = ("Traceback", "ray.llm._internal", "ray.exceptions", "File \"", "site-packages")


def clean_message(message: Any, fallback: str = "the request failed") -> str:
    """The client-facing part of an engine or Ray error message: Ray Serve LLM wraps errors as
    "Message: M, Internal exception: ..., original exception: ..."; only M is kept, without Ray's
    request-id suffix. A message that still shows internals (a traceback, module paths) becomes
    `fallback`."""
    text = str(message or "").strip()
    wrapped = _RAY_WRAPPED.match(text)
    if wrapped:
        text = wrapped.group("msg")
    text = _REQUEST_ID.sub("", text).strip()
    if not text or any(s in text for s in _INTERNAL):
        return fallback
    return text[:2000]


def load_keys(api_key_env: Optional[str]) -> Optional[list[bytes]]:
    """The accepted keys from the environment variable `api_key_env` (comma-separated); None when
    auth is off. A name that is unset or empty is an error (fail closed); the message names the
    variable, never a key."""
    if not api_key_env:
        return None
    raw = os.environ.get(api_key_env, "")
    keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
    if not keys:
        raise RuntimeError(f"serve.api_key_env is {api_key_env!r}, but that environment variable is unset or "
                           "empty where the server runs: set it to the accepted key(s), comma-separated")
    return keys


def _bearer(headers: list) -> Optional[bytes]:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class Guard:
    """Pure ASGI middleware (streams pass straight through): API keys, then the body size. The
    body is read whole (it is at most `max_body_bytes`) and replayed to the app."""

    def __init__(self, app, *, api_key_env: Optional[str] = None, max_body_bytes: int = 1_000_000):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.keys = load_keys(api_key_env)

    async def _send_error(self, send, err: ApiError, headers: Optional[dict] = None) -> None:
        body = json.dumps(err.body()).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": err.status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if self.keys is not None:
            token = _bearer(headers)
            if token is None or not any(hmac.compare_digest(token, k) for k in self.keys):
                what = "no API key given" if token is None else "the API key is not valid"
                return await self._send_error(send, ApiError(
                    401, f"{what}: send `Authorization: Bearer KEY` with a key this server accepts",
                    code="invalid_api_key"), {"www-authenticate": "Bearer"})
        limit = self.max_body_bytes
        too_large = ApiError(400, f"request body over this server's limit of {limit} bytes (serve.max_body_bytes)",
                             code="request_too_large")
        for name, value in headers:
            if name.lower() == b"content-length":
                try:
                    if int(value) > limit:
                        return await self._send_error(send, too_large)
                except ValueError:
                    return await self._send_error(send, ApiError(400, "invalid Content-Length header"))
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._send_error(send, too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return await self.app(scope, replay, send)


def check_request(body, limits: Limits, *, chat: bool, model: str) -> None:
    """The limits a request must be inside (400 naming the limit), and serve.max_tokens filled in
    when the request gives none."""
    n = getattr(body, "n", None)
    n = 1 if n is None else n
    if n < 1:
        raise ApiError(400, f"n = {n}: must be at least 1", param="n", code="invalid_value")
    if n > limits.max_n:
        raise ApiError(400, f"n = {n} is over this server's limit of {limits.max_n} (serve.max_n)",
                       param="n", code="limit_exceeded")
    context = (limits.max_model_len or {}).get(model)
    fields = ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",)
    asked = False
    for field in fields:
        value = getattr(body, field, None)
        if value is None:
            continue
        asked = True
        if value < 1:
            raise ApiError(400, f"{field} = {value}: must be at least 1", param=field, code="invalid_value")
        if value > limits.max_tokens:
            raise ApiError(400, f"{field} = {value} is over this server's limit of {limits.max_tokens} "
                           "(serve.max_tokens)", param=field, code="limit_exceeded")
        if context and value >= context:
            raise ApiError(400, f"{field} = {value} does not fit the model's context length of {context} tokens "
                           "(prompt + output; serve.max_model_len)", param=field, code="context_length_exceeded")
    if not asked:  # (a completion request's own default, 16 as in OpenAI's API, counts as asked)
        body.max_tokens = limits.max_tokens if not context else min(limits.max_tokens, context - 1)


class Backend(Protocol):
    def model_ids(self) -> list[str]: ...

    async def model_card(self, model: str) -> dict: ...

    def generate(self, kind: str, body, request) -> AsyncIterator[Any]: ...


def _dump(obj) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


def _engine_error(item) -> Optional[ApiError]:
    """An ErrorResponse (object or dict) from the engine as an ApiError; None for anything else."""
    err = getattr(item, "error", None)
    if err is None and isinstance(item, dict):
        err = item.get("error")
    if err is None or isinstance(item, str):
        return None
    get = (lambda k: err.get(k)) if isinstance(err, dict) else (lambda k: getattr(err, k, None))
    try:
        status = int(get("code"))
    except (TypeError, ValueError):
        status = 500
    if status >= 500:
        return ApiError(status, "internal server error", type="server_error")
    param = get("param")
    return ApiError(status, clean_message(get("message")), param=param if isinstance(param, str) else None,
                    code=None)


def _sse(chunk) -> str:
    if isinstance(chunk, list):
        return "".join(_sse(c) for c in chunk)
    if isinstance(chunk, str):
        return chunk
    if hasattr(chunk, "model_dump_json"):
        return f"data: {chunk.model_dump_json()}\n\n"
    return f"data: {json.dumps(chunk)}\n\n"


def _first(item):
    return item[0] if isinstance(item, list) and item else item


async def _run(backend: Backend, kind: str, body, request, limits: Limits):
    """The engine's answer: a JSONResponse, or a StreamingResponse of SSE events ending in [DONE]."""
    from starlette.responses import JSONResponse, StreamingResponse

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_timeout_s
    timeout_msg = f"the request ran longer than this server's limit of {limits.request_timeout_s:g} s " \
                  "(serve.request_timeout_s)"
    gen = backend.generate(kind, body, request).__aiter__()
    try:
        first = await asyncio.wait_for(gen.__anext__(), timeout=max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        await _close(gen)
        raise ApiError(408, timeout_msg, code="timeout") from None
    except StopAsyncIteration:
        raise ApiError(500, "internal server error: the engine returned nothing", type="server_error") from None
    except BaseException:
        await _close(gen)
        raise
    err = _engine_error(_first(first))
    if err is not None:
        await _close(gen)
        raise err
    if not getattr(body, "stream", False):
        await _close(gen)
        return JSONResponse(content=_dump(_first(first)))

    async def events():
        done = False
        try:
            item = first
            while True:
                text = _sse(item)
                done = done or "data: [DONE]" in text
                yield text
                try:
                    item = await asyncio.wait_for(gen.__anext__(), timeout=max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    yield f"data: {json.dumps(ApiError(408, timeout_msg, code='timeout').body())}\n\n"
                    break
                except Exception:
                    log.exception("stream failed")
                    yield f"data: {json.dumps(ApiError(500, 'internal server error', type='server_error').body())}\n\n"
                    break
            if not done:
                yield "data: [DONE]\n\n"
        finally:
            await _close(gen)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _close(gen) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing a cancelled downstream call: nothing left to do
            pass


def create_app(backend: Backend, limits: Limits, api_key_env: Optional[str] = None):
    """The OpenAI-compatible FastAPI app: GET /v1/models, GET /v1/models/{model}, POST
    /v1/completions, POST /v1/chat/completions (see the module docstring for what each request
    meets)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    app = FastAPI(title="proxykd", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key_env=api_key_env, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors() or [{}]
        first = errors[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, "the request body is not valid JSON", code="invalid_json"))
        where = ".".join(loc) or "body"
        return error_response(ApiError(400, f"invalid request: {where}: {first.get('msg', 'invalid value')}",
                                       param=where, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
        else:
            msg = clean_message(exc.detail, "the request failed")
        return error_response(ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        log.error("request %s failed", rid, exc_info=exc)
        return error_response(ApiError(500, f"internal server error (request id {rid})", type="server_error"))

    def resolve(model: Optional[str]) -> str:
        ids = backend.model_ids()
        if model is None:
            if len(ids) == 1:
                return ids[0]
            raise ApiError(400, f"`model` is required: this server serves {ids}", param="model",
                           code="missing_model")
        if model not in ids:
            raise ApiError(404, f"The model `{model}` does not exist on this server (it serves {ids})",
                           param="model", code="model_not_found")
        return model

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [await backend.model_card(m) for m in backend.model_ids()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return await backend.model_card(resolve(model))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.model = resolve(body.model)
        check_request(body, limits, chat=False, model=body.model)
        return await _run(backend, "completions", body, request, limits)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        body.model = resolve(body.model)
        check_request(body, limits, chat=True, model=body.model)
        return await _run(backend, "chat", body, request, limits)

    return app


def _ingress_base():
    from ray.serve.llm.ingress import OpenAiIngress

    return OpenAiIngress


class ProxyKDIngress(_ingress_base()):
    """The ingress deployment: Ray Serve LLM's OpenAiIngress (handles to each model's LLMServer
    replicas) as the backend of `create_app`, built in each replica (`__serve_build_asgi_app__`)."""

    def __init__(self, llm_deployments, model_cards, *, limits: dict, api_key_env: Optional[str] = None,
                 lora_paths=None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        load_keys(api_key_env)  # fail at start (the replica does not come up) rather than serve without keys
        self._limits = Limits(**limits)
        self._api_key_env = api_key_env

    def model_ids(self) -> list[str]:
        return list(self._model_cards)

    async def model_card(self, model: str) -> dict:
        return self._model_cards[model].model_dump()

    def generate(self, kind: str, body, request):
        return self._get_response(body=body, call_method=kind, raw_request=request)

    async def __serve_build_asgi_app__(self):
        return create_app(self, self._limits, self._api_key_env)


def _server_base():
    from ray.serve.llm.deployment import LLMServer

    return LLMServer


class WarmLLMServer(_server_base()):
    """Ray Serve LLM's LLMServer that answers a few short requests (completion, chat, streamed)
    before its replica reports ready (`experimental_configs.proxykd_warmup`): the first client
    request then runs at normal speed, on every replica an autoscaler adds as well."""

    async def __init__(self, llm_config, **kwargs):
        await super().__init__(llm_config, **kwargs)
        if llm_config.experimental_configs.get("proxykd_warmup", True):
            await self._warm_up()

    async def _warm_up(self) -> None:
        import time

        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        started = time.monotonic()
        name = self._llm_config.model_id
        requests = [
            ("completions", CompletionRequest(model=name, prompt="Hello", max_tokens=4, temperature=0)),
            ("completions", CompletionRequest(model=name, prompt="Hello", max_tokens=4, stream=True)),
            ("chat", ChatCompletionRequest(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)),
            ("chat", ChatCompletionRequest(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                           stream=True, logprobs=True, top_logprobs=2)),
        ]
        for method, request in requests:
            try:
                async for _ in getattr(self.engine, method)(request, None):
                    pass
            except Exception as e:  # e.g. a tokenizer without a chat template: serve anyway, say so
                log.warning("warm-up %s request of %s failed: %s", method, name, clean_message(e))
        log.info("%s: engine warmed up in %.1f s", name, time.monotonic() - started)
