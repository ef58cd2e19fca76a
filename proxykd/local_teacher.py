"""A local, OpenAI-compatible stand-in for the black-box teacher.

`LocalTeacher` serves a fixed table of reference responses (prompt text -> response text) over
the OpenAI HTTP API, so everything that talks to a teacher can run without an API key: tests,
laptops, CI. It answers

    GET  /v1/models             the one model it serves
    GET  /stats                 what it counted (not OpenAI; for benchmarks and tests)
    GET  /v1/models/{model}     that model, or 404
    POST /v1/chat/completions   keyed by the last user message (see `lookup_key`)
    POST /v1/completions        keyed by `prompt`, exactly
    POST /v1/files              multipart upload (purpose `batch` for batch input)
    GET  /v1/files/{id}[/content]   a file, or its bytes (batch output and error files too)
    POST /v1/batches            a batch over an uploaded JSONL file (`/v1/chat/completions` or
                                `/v1/completions`); GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel

Unknown prompts get the `fallback` answer. "Tokens" are whitespace-separated words here: usage
numbers count words, and `max_tokens` / `max_completion_tokens` truncate the answer to that many
words (finish_reason "length"). No API key is needed and any `Authorization` header is accepted.

    with LocalTeacher({"What is 2+2?": "4"}) as teacher:
        client = openai.OpenAI(base_url=teacher.base_url, api_key="unused")

From a shell (FILE has one {"prompt": ..., "response": ...} object per line):

    python -m proxykd.local_teacher --responses FILE.jsonl [--port N] [--model NAME]

Real APIs are slow and fail; `Faults` makes this server do the same, at given rates: latency,
429 with `Retry-After`, 500/503, requests that hang past the client's timeout, truncated JSON
bodies, empty content, connections dropped mid-body; answers that are final but unusable (cut
off with finish_reason "length", "content_filter", refusals with content null), one empty sample
among n, and 429 `insufficient_quota` (the account is out of credit). The server counts what it
received (`request_count`, `fault_counts`) and what it *billed*: a request answered with content
(cleanly, or with a final but unusable answer) is billed once per request body, and `billed` maps
each body's hash to how often it was billed, so a test can show that no paid request was sent
twice; `samples_billed` counts the non-empty samples delivered per prompt.

Batches run their requests through the same answers and faults, and `BatchFaults` adds what
goes wrong with batches: a wait in `in_progress` (seconds or polls), failed validation, expiry
and cancellation with part of the requests answered, and output lines cut short.

    with LocalTeacher(table, faults=Faults(latency_s=0.1, rate_limit=0.05, server_error=0.05)) as t:
        ...
        assert max(t.billed.values()) == 1
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import hashlib
import json
import logging
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["BatchFaults", "Faults", "LocalTeacher", "TeacherError", "load_responses", "lookup_key", "main"]

_WORD = re.compile(r"\S+")
STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------------------- helpers


def _text(content: Any) -> str:
    """Message content as plain text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def lookup_key(messages: list[dict]) -> str:
    """The table key for a chat request: the content of the last message whose role is "user",
    stripped ("" when there is no user message)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content")).strip()
    return ""


def _count_words(text: str) -> int:
    return sum(1 for _ in _WORD.finditer(text))


def _truncate(text: str, max_words: Optional[int]) -> tuple[str, str]:
    """(text cut to at most `max_words` words, finish_reason). Whitespace between the kept words
    is preserved; trailing whitespace after the last kept word is dropped."""
    if max_words is None:
        return text, "stop"
    for i, match in enumerate(_WORD.finditer(text)):
        if i == max_words:
            return text[: match.start()].rstrip(), "length"
    return text, "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _get_text(choice: dict) -> Optional[str]:
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _set_text(choice: dict, text: Optional[str]) -> None:
    if "message" in choice:
        choice["message"]["content"] = text
    else:
        choice["text"] = text


def load_responses(path: str | Path) -> dict[str, str]:
    """Read a JSONL file of {"prompt": str, "response": str} objects (blank lines are skipped; a
    repeated prompt keeps its last response)."""
    responses: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
                raise ValueError(f'{path}:{lineno}: expected an object with string "prompt" and "response"')
            responses[row["prompt"]] = row["response"]
    return responses


# ------------------------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class Faults:
    """What goes wrong, per completion request. Rates are fractions of requests (their sum must be
    at most 1); each request draws once, so a retried request has a fresh chance."""

    latency_s: float = 0.0  # added to every completion request
    latency_jitter_s: float = 0.0  # uniform extra latency in [0, latency_jitter_s]
    rate_limit: float = 0.0  # 429 with a Retry-After header of `retry_after_s`
    retry_after_s: float = 1.0
    server_error: float = 0.0  # 500 or 503, half each
    timeout: float = 0.0  # hang `hang_s` before answering: past the client's timeout
    hang_s: float = 30.0
    truncated_json: float = 0.0  # 200 with the JSON body cut in half
    empty_content: float = 0.0  # 200 with content "" (a real API bills these)
    seed: int = 0
    length: float = 0.0  # 200, every answer cut in half with finish_reason "length"
    content_filter: float = 0.0  # 200, every answer cut in half with finish_reason "content_filter"
    refusal: float = 0.0  # 200, content null with a `refusal` message (text null on /completions)
    empty_sample: float = 0.0  # 200, the last of the n samples has content "" (the others are good)
    insufficient_quota: float = 0.0  # 429 insufficient_quota, no Retry-After: out of credit
    dropped: float = 0.0  # 200 status and headers, then the connection closes mid-body

    def __post_init__(self):
        rates = tuple(getattr(self, name) for name in FAULTS)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {rates}")
        if min(self.latency_s, self.latency_jitter_s, self.retry_after_s, self.hang_s) < 0:
            raise ValueError("fault times must be >= 0")

    def draw(self, u: float) -> Optional[str]:
        """The fault for a uniform draw `u` in [0, 1), or None for a clean answer."""
        for name in FAULTS:
            u -= getattr(self, name)
            if u < 0:
                return name
        return None


# Drawn in this order (new ones last, so that a seed draws the same faults as before).
FAULTS = ("rate_limit", "server_error", "timeout", "truncated_json", "empty_content",
          "length", "content_filter", "refusal", "empty_sample", "insufficient_quota", "dropped")
FINAL_FAULTS = {"length": "length", "content_filter": "content_filter", "refusal": "stop"}  # -> finish_reason


@dataclass(frozen=True)
class BatchFaults:
    """How the local Batch API behaves. A batch does its work when it is retrieved (no thread of
    its own): `validating` when created, `in_progress` from the first retrieve until both
    `in_progress_s` seconds and `in_progress_polls` retrieves have passed, then `completed`. The
    first `fail_first` batches created fail validation instead (nothing run); of the others, the
    first `expire_first` expire, as does a cancelled one, with `answered_before_stop` of their
    requests answered and the rest in the error file (`batch_expired` / `batch_cancelled`).

    Each request draws its fault from `Faults` as an online request does: 429 and 5xx become
    error-file lines, a cut body (truncated_json, dropped, timeout) an output line cut short
    (not in `billed`, as online), answer faults (length, refusal, empty, ...) the same answers.
    `malformed_line` cuts a further fraction of output lines short."""

    in_progress_s: float = 0.0
    in_progress_polls: int = 0
    fail_first: int = 0
    expire_first: int = 0
    answered_before_stop: float = 0.5
    malformed_line: float = 0.0

    def __post_init__(self):
        if min(self.in_progress_s, self.in_progress_polls, self.fail_first, self.expire_first) < 0:
            raise ValueError("batch delays and counts must be >= 0")
        if not (0 <= self.answered_before_stop <= 1 and 0 <= self.malformed_line <= 1):
            raise ValueError("answered_before_stop and malformed_line are fractions in [0, 1]")


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
BATCH_DONE = {"completed", "expired", "cancelled", "failed"}
CUT_BODY_FAULTS = {"truncated_json", "dropped", "timeout"}  # in a batch: an output line cut short


class _DroppedConnectionNoise(logging.Filter):
    """uvicorn logs a traceback for each connection `dropped` closes on purpose; drop that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "shorter than Content-Length" in str(record.exc_info[1]))


def _spoil(fault: Optional[str], choices: list[dict]) -> bool:
    """Apply an answer fault (empty content, one empty sample, a final but unusable answer) to the
    choices in place; False when the answer is one a real API bills as nothing (all empty)."""
    if fault == "empty_content":
        for choice in choices:
            _set_text(choice, "")
        return False
    if fault == "empty_sample":
        _set_text(choices[-1], "")
    if fault in FINAL_FAULTS:
        for choice in choices:
            text = _get_text(choice)
            _set_text(choice, None if fault == "refusal" else " ".join(text.split()[: len(text.split()) // 2]))
            choice["finish_reason"] = FINAL_FAULTS[fault]
            if fault == "refusal" and "message" in choice:
                choice["message"]["refusal"] = "I can't help with that. (injected)"
    return True


# ----------------------------------------------------------------------------- request schemas


class _Lenient(BaseModel):
    # The OpenAI API has many optional parameters (temperature, top_p, seed, user, ...); accept
    # and ignore the ones this server does not act on.
    model_config = ConfigDict(extra="allow")


class _Message(_Lenient):
    role: str
    content: Any = None


class _SamplingRequest(_Lenient):
    model: str
    n: int = Field(1, ge=1, le=128)
    max_tokens: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False


class _ChatRequest(_SamplingRequest):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class _CompletionRequest(_SamplingRequest):
    prompt: str


class TeacherError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[Optional[str], bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes). (The standard
    library's MIME parser, so the server needs no multipart package.)"""
    if not content_type.startswith("multipart/form-data"):
        raise TeacherError(400, "A file upload must be multipart/form-data.")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _parse(schema: type[BaseModel], body: Any) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise TeacherError(400, f"Invalid request: {param}: {err['msg']}", param=param) from None


# -------------------------------------------------------------------------------------- server


class LocalTeacher:
    """An OpenAI-compatible HTTP server answering from a table of reference responses, run by
    uvicorn in a background daemon thread."""

    def __init__(
        self,
        responses: dict[str, str],
        model: str = "local-teacher",
        host: str = "127.0.0.1",
        port: int = 0,
        fallback: str = "I don't know.",
        faults: Optional[Faults] = None,
        batch_faults: Optional[BatchFaults] = None,
    ):
        self.responses = dict(responses)
        self.faults = faults or Faults()
        self.batch_faults = batch_faults or BatchFaults()
        self.files: dict[str, dict] = {}  # file id -> {"object": the File object, "content": bytes}
        self.batches: dict[str, dict] = {}  # batch id -> the Batch object (+ "_polls", "_started")
        self.batch_requests = 0  # requests run inside batches
        self.batch_api_calls = 0  # calls to the Files and Batches routes
        self._random = random.Random(self.faults.seed)
        self.fault_counts: Counter = Counter()  # fault name -> requests that drew it
        self.billed: Counter = Counter()  # request body hash -> answers to it with content
        self.samples_billed: Counter = Counter()  # prompt -> non-empty samples delivered in billed answers
        self.received: Counter = Counter()  # prompt (lookup key or completion prompt) -> requests
        self.arrivals: list[float] = []  # time.monotonic() of each completion request
        self.model = model
        self.host = host
        self.port = port
        self.fallback = fallback
        self.app = self._build_app()
        self._lock = threading.Lock()
        self._request_count = 0
        self._created = int(time.time())
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._socket: Optional[socket.socket] = None
        self._thread_error: Optional[BaseException] = None
        self._base_url: Optional[str] = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving in a daemon thread; return the base URL ("http://HOST:PORT/v1") once the
        server accepts connections. Raises RuntimeError if it does not come up in time."""
        if self._thread is not None:
            raise RuntimeError(f"LocalTeacher is already running at {self._base_url}")
        # Bind here, not in uvicorn: port=0 then yields the real port before serving starts, and a
        # busy port raises OSError in the caller instead of silently killing the server thread.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]

        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S / 2,
        )
        error_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _DroppedConnectionNoise) for f in error_log.filters):
            error_log.addFilter(_DroppedConnectionNoise())
        server = uvicorn.Server(config)
        self._socket, self._server, self._thread_error = sock, server, None
        self._thread = threading.Thread(target=self._serve, name=f"local-teacher:{port}", daemon=True)
        self._thread.start()

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                error = self._thread_error
                self.stop()
                reason = f"the server thread died: {error!r}" if error else f"no answer after {STARTUP_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"LocalTeacher failed to start on {self.host}:{port}: {reason}") from error
            time.sleep(0.01)

        self._base_url = f"http://{self._url_host()}:{port}/v1"
        return self._base_url

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as e:  # uvicorn reports startup failures with sys.exit
            self._thread_error = e

    def _url_host(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host

    def stop(self) -> None:
        """Shut the server down, free its port and join its thread. Safe to call more than once."""
        thread, server, sock = self._thread, self._server, self._socket
        if thread is None:
            return
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT_S)
        if thread.is_alive():  # a request is stuck: drop open connections without waiting
            server.force_exit = True
            thread.join(SHUTDOWN_TIMEOUT_S)
        sock.close()  # uvicorn closes it on a clean shutdown; this covers failed starts
        self._thread = self._server = self._socket = None

    def __enter__(self) -> "LocalTeacher":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("LocalTeacher has not been started")
        return self._base_url

    @property
    def request_count(self) -> int:
        """Completion requests (chat and text) received so far, including rejected ones."""
        with self._lock:
            return self._request_count

    def stats(self) -> dict:
        """Requests received, faults injected, clean answers billed, and the seconds from the first
        to the last completion request."""
        with self._lock:
            t = self.arrivals
            return {"requests": self._request_count, "faults": dict(self.fault_counts),
                    "billed": sum(self.billed.values()), "samples_billed": sum(self.samples_billed.values()),
                    "span_s": t[-1] - t[0] if len(t) > 1 else 0.0,
                    "files": len(self.files), "batches": len(self.batches), "batch_requests": self.batch_requests,
                    "batch_api_calls": self.batch_api_calls}

    # -- HTTP ----------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="proxykd local teacher", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(TeacherError)
        async def _teacher_error(request: Request, exc: TeacherError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            # Unknown routes and wrong methods, OpenAI-style as well.
            return TeacherError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

        @app.get("/stats")
        async def stats() -> dict:
            # Not OpenAI: what this server counted, for benchmarks that run it in another process.
            return self.stats()

        @app.get("/v1/models")
        async def list_models() -> dict:
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model:path}")
        async def retrieve_model(model: str) -> dict:
            self._check_model(model)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> dict:
            return await self._handle(request, self._chat_completion)

        @app.post("/v1/completions")
        async def completions(request: Request) -> dict:
            return await self._handle(request, self._text_completion)

        self._batch_routes(app)
        return app

    # -- Files and Batches ---------------------------------------------------------------------

    def _batch_routes(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def count_batch_calls(request: Request, call_next):
            if request.url.path.startswith(("/v1/files", "/v1/batches")):
                with self._lock:
                    self.batch_api_calls += 1
            return await call_next(request)

        @app.post("/v1/files")
        async def create_file(request: Request) -> dict:
            fields = _multipart(request.headers.get("content-type", ""), await request.body())
            purpose, upload = fields.get("purpose"), fields.get("file")
            if purpose is None or upload is None:
                raise TeacherError(400, "A file upload needs the fields `file` and `purpose`.")
            return self._add_file(upload[1], upload[0] or "upload.jsonl", purpose[1].decode())

        @app.get("/v1/files/{file_id}")
        async def retrieve_file(file_id: str) -> dict:
            return self._file(file_id)["object"]

        @app.get("/v1/files/{file_id}/content")
        async def file_content(file_id: str) -> Response:
            return Response(self._file(file_id)["content"], media_type="application/octet-stream")

        @app.post("/v1/batches")
        async def create_batch(request: Request) -> dict:
            return self._create_batch(await request.json())

        @app.get("/v1/batches")
        async def list_batches(limit: int = 20, after: Optional[str] = None) -> dict:
            ids = sorted(self.batches, key=lambda i: self.batches[i]["_n"], reverse=True)  # newest first
            if after is not None:
                ids = ids[ids.index(after) + 1:] if after in ids else []
            page = [self._public(self.batches[i]) for i in ids[:limit]]
            return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

        @app.get("/v1/batches/{batch_id}")
        async def retrieve_batch(batch_id: str) -> dict:
            batch = self._batch(batch_id)
            self._advance(batch)
            return self._public(batch)

        @app.post("/v1/batches/{batch_id}/cancel")
        async def cancel_batch(batch_id: str) -> dict:
            batch = self._batch(batch_id)
            if batch["status"] in BATCH_DONE or batch["status"] == "cancelling":
                raise TeacherError(400, f"Cannot cancel a batch with status '{batch['status']}'.")
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            return self._public(batch)

    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        obj = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[obj["id"]] = {"object": obj, "content": content}
        return obj

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise TeacherError(404, f"No such File object: {file_id}", param="id")
        return self.files[file_id]

    def _batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise TeacherError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return self.batches[batch_id]

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _create_batch(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise TeacherError(400, "The request body must be a JSON object.")
        file = self._file(str(body.get("input_file_id")))
        if file["object"]["purpose"] != "batch":
            raise TeacherError(400, "The input file must be uploaded with purpose `batch`.", param="input_file_id")
        if body.get("endpoint") not in BATCH_ENDPOINTS:
            raise TeacherError(400, f"Unsupported endpoint {body.get('endpoint')!r}.", param="endpoint")
        if body.get("completion_window") != "24h":
            raise TeacherError(400, "completion_window must be '24h'.", param="completion_window")
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": body["endpoint"],
                 "errors": None, "input_file_id": file["object"]["id"], "completion_window": "24h",
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                 "expires_at": now + 86400, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata"), "model": self.model,
                 "_n": len(self.batches), "_polls": 0, "_started": None}
        self.batches[batch["id"]] = batch
        return self._public(batch)

    def _advance(self, batch: dict) -> None:
        """A retrieve moves the batch on: validation, the injected wait, then its work."""
        bf, now = self.batch_faults, int(time.time())
        if batch["status"] == "validating":
            problem = self._invalid(batch)
            if problem is None and batch["_n"] < bf.fail_first:
                problem = {"code": "token_limit_exceeded", "line": None, "message": "Enqueued token limit "
                           "reached for this model (injected)."}
            if problem is not None:
                batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [problem]})
                return
            batch.update(status="in_progress", in_progress_at=now, _started=time.monotonic())
        if batch["status"] == "cancelling":
            self._finish(batch, "cancelled")
        elif batch["status"] == "in_progress":
            batch["_polls"] += 1
            if batch["_polls"] > bf.in_progress_polls and time.monotonic() - batch["_started"] >= bf.in_progress_s:
                expire = bf.fail_first <= batch["_n"] < bf.fail_first + bf.expire_first
                self._finish(batch, "expired" if expire else "completed")

    def _invalid(self, batch: dict) -> Optional[dict]:
        """The first problem with a batch's input file (a real API fails the whole batch), or None."""
        seen = set()
        for i, line in enumerate(self.files[batch["input_file_id"]]["content"].splitlines()):
            try:
                req = json.loads(line)
            except ValueError:
                return {"code": "invalid_json_line", "line": i + 1, "message": "This line is not valid JSON."}
            if not (isinstance(req, dict) and isinstance(req.get("custom_id"), str) and req.get("method") == "POST"
                    and isinstance(req.get("body"), dict)):
                return {"code": "invalid_request", "line": i + 1, "message": "A request needs custom_id, "
                        "method POST, url and body."}
            if req.get("url") != batch["endpoint"]:
                return {"code": "mismatched_endpoint", "line": i + 1, "message": f"The url {req.get('url')!r} "
                        f"is not the batch's endpoint {batch['endpoint']}."}
            if req["body"].get("model") != self.model:
                return {"code": "model_not_found", "line": i + 1, "message": f"The model "
                        f"`{req['body'].get('model')}` does not exist; this local teacher serves `{self.model}`."}
            if req["custom_id"] in seen:
                return {"code": "duplicate_custom_id", "line": i + 1, "message": "custom_id must be unique."}
            seen.add(req["custom_id"])
        if not seen:
            return {"code": "empty_file", "line": None, "message": "The input file has no requests."}
        return None

    def _finish(self, batch: dict, status: str) -> None:
        """Run the batch's requests (all of them, or the first part when it expires or is cancelled)
        and write its output and error files."""
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["content"].splitlines()]
        answered = len(lines) if status == "completed" else int(len(lines) * self.batch_faults.answered_before_stop)
        out, err, usage = [], [], [0, 0]
        for req in lines[:answered]:
            self._run_request(req, batch["endpoint"], out, err, usage)
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for req in lines[answered:]:
            err.append(json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req["custom_id"],
                                   "response": None, "error": {"code": code, "message": f"This request could not "
                                   f"be executed before the batch was {status}."}}))
        now = int(time.time())
        for name, rows, key in (("output", out, "output_file_id"), ("error", err, "error_file_id")):
            if rows:
                batch[key] = self._add_file(("\n".join(rows) + "\n").encode(), f"batch_{name}.jsonl",
                                            "batch_output")["id"]
        batch.update(status=status, **{f"{status}_at": now},
                     request_counts={"total": len(lines), "completed": len(out), "failed": len(err)},
                     usage={"input_tokens": usage[0], "output_tokens": usage[1], "total_tokens": sum(usage),
                            "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens_details": {"reasoning_tokens": 0}})
        if status == "completed":
            batch["finalizing_at"] = now

    def _run_request(self, req: dict, endpoint: str, out: list, err: list, usage: list) -> None:
        """One request line of a batch: an output line (maybe cut short) or an error line."""
        fault, _ = self._draw(online=False)
        body = req["body"]
        prompt = self._receive(body)
        with self._lock:
            malformed = self._random.random() < self.batch_faults.malformed_line
        line = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req["custom_id"], "error": None}
        try:
            if fault in ("rate_limit", "insufficient_quota", "server_error"):
                status = 500 if fault == "server_error" else 429
                raise TeacherError(status, f"{fault} (injected).", type=fault)
            result = (self._chat_completion if endpoint == "/v1/chat/completions" else self._text_completion)(body)
        except TeacherError as e:
            err.append(json.dumps({**line, "response": {"status_code": e.status_code, "request_id": uuid.uuid4().hex,
                                   "body": json.loads(e.response().body)}}))
            return
        cut = malformed or fault in CUT_BODY_FAULTS
        # (As online: `billed` counts answers delivered readable and with content; a cut line is
        # one the provider ran and the client must count at its worst case.)
        if _spoil(fault, result["choices"]) and not cut:
            self._bill(body, prompt, result["choices"])
        usage[0] += result["usage"]["prompt_tokens"]
        usage[1] += result["usage"]["completion_tokens"]
        text = json.dumps({**line, "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": result}})
        out.append(text[: len(text) // 2] if cut else text)

    def _draw(self, online: bool = True) -> tuple[Optional[str], float]:
        """(the fault of one completion request, its latency), counted (`request_count` and
        `arrivals` are online requests only; a batch's are `batch_requests`)."""
        faults = self.faults
        with self._lock:
            if online:
                self._request_count += 1
                self.arrivals.append(time.monotonic())
            else:
                self.batch_requests += 1
            fault = faults.draw(self._random.random())
            latency = faults.latency_s + faults.latency_jitter_s * self._random.random()
            if fault:
                self.fault_counts[fault] += 1
        return fault, latency

    def _receive(self, body: dict) -> str:
        """Count a request body's prompt (lookup key or completion prompt); return it."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            messages = body.get("messages")
            prompt = lookup_key([m for m in messages if isinstance(m, dict)]) if isinstance(messages, list) else ""
        with self._lock:
            self.received[prompt] += 1
        return prompt

    async def _handle(self, request: Request, answer) -> Any:
        """Every completion request goes through here: count it, read its JSON body, inject the
        fault it draws (if any), answer it, bill it."""
        faults = self.faults
        fault, latency = self._draw()
        try:
            body = await request.json()
        except ValueError:
            raise TeacherError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise TeacherError(400, "The request body must be a JSON object.")
        prompt = self._receive(body)
        if latency:
            await asyncio.sleep(latency)
        if fault == "rate_limit":
            raise TeacherError(429, "Rate limit reached (injected).", type="rate_limit_exceeded",
                               code="rate_limit_exceeded", headers={"Retry-After": f"{faults.retry_after_s:g}"})
        if fault == "insufficient_quota":
            raise TeacherError(429, "You exceeded your current quota, please check your plan and billing details "
                               "(injected).", type="insufficient_quota", code="insufficient_quota")
        if fault == "server_error":
            status = 500 if self._random.random() < 0.5 else 503
            raise TeacherError(status, "The server had an error (injected).", type="server_error")
        if fault == "timeout":
            await asyncio.sleep(faults.hang_s)
        result = answer(body)
        if fault == "timeout":  # (answered after the client gave up: never read, not counted as billed)
            return result
        if fault == "truncated_json":
            raw = json.dumps(result).encode()
            return Response(raw[: len(raw) // 2], media_type="application/json")
        if fault == "dropped":
            raw = json.dumps(result).encode()  # (the server ran the request; the client never reads it)
            return Response(raw[: len(raw) // 2], media_type="application/json",
                            headers={"content-length": str(len(raw))})
        if not _spoil(fault, result["choices"]):
            return result  # (empty content: not billed)
        self._bill(body, prompt, result["choices"])
        return result

    def _bill(self, body: dict, prompt: str, choices: list[dict]) -> None:
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            self.billed[key] += 1
            self.samples_billed[prompt] += sum(1 for c in choices if _get_text(c))

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self._created, "owned_by": "proxykd"}

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise TeacherError(
                404,
                f"The model `{model}` does not exist; this local teacher serves `{self.model}`.",
                code="model_not_found",
                param="model",
            )

    def _check_sampling(self, req: _SamplingRequest) -> None:
        self._check_model(req.model)
        if req.stream:
            raise TeacherError(400, "Streaming is not supported by the local teacher.", param="stream")

    def _chat_completion(self, body: dict) -> dict:
        req = _parse(_ChatRequest, body)
        self._check_sampling(req)
        messages = [m.model_dump() for m in req.messages]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        content, finish_reason = _truncate(self.responses.get(lookup_key(messages), self.fallback), max_tokens)
        message = {"role": "assistant", "content": content, "refusal": None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": i, "message": dict(message), "logprobs": None, "finish_reason": finish_reason}
                for i in range(req.n)
            ],
            "usage": _usage(sum(_count_words(_text(m["content"])) for m in messages), req.n * _count_words(content)),
        }

    def _text_completion(self, body: dict) -> dict:
        req = _parse(_CompletionRequest, body)
        self._check_sampling(req)
        text, finish_reason = _truncate(self.responses.get(req.prompt, self.fallback), req.max_tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason} for i in range(req.n)
            ],
            "usage": _usage(_count_words(req.prompt), req.n * _count_words(text)),
        }


# ----------------------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m proxykd.local_teacher",
        description="Serve a table of reference responses over the OpenAI API (a local stand-in teacher).",
    )
    parser.add_argument("--responses", required=True, help='JSONL file, one {"prompt": ..., "response": ...} per line')
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--model", default="local-teacher", help="model name to serve (default: local-teacher)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--fallback", default="I don't know.", help="answer to prompts not in the file")
    for name, help_text in [
        ("latency_s", "seconds added to every completion request"),
        ("latency_jitter_s", "uniform extra latency up to this many seconds"),
        ("rate_limit", "fraction of requests answered 429 with Retry-After"),
        ("retry_after_s", "the Retry-After of injected 429s"),
        ("server_error", "fraction answered 500/503"),
        ("timeout", "fraction that hang --hang-s seconds"),
        ("hang_s", "how long a 'timeout' request hangs"),
        ("truncated_json", "fraction answered with a truncated JSON body"),
        ("empty_content", "fraction answered with empty content"),
        ("length", "fraction answered cut off (finish_reason length)"),
        ("content_filter", "fraction answered cut off (finish_reason content_filter)"),
        ("refusal", "fraction answered with a refusal (content null)"),
        ("empty_sample", "fraction with the last of their n samples empty"),
        ("insufficient_quota", "fraction answered 429 insufficient_quota"),
        ("dropped", "fraction whose connection closes mid-body"),
    ]:
        default = getattr(Faults(), name)
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default,
                            help=f"{help_text} (default: {default:g})")
    for name, kind, help_text in [
        ("in_progress_s", float, "seconds a batch stays in_progress"),
        ("in_progress_polls", int, "retrieves a batch stays in_progress"),
        ("fail_first", int, "the first N batches fail validation"),
        ("expire_first", int, "then the first N batches expire"),
        ("answered_before_stop", float, "fraction of an expired or cancelled batch answered"),
        ("malformed_line", float, "fraction of batch output lines cut short"),
    ]:
        default = getattr(BatchFaults(), name)
        parser.add_argument("--batch-" + name.replace("_", "-"), dest="batch_" + name, type=kind, default=default,
                            help=f"{help_text} (default: {default:g})")
    args = parser.parse_args(argv)

    try:
        responses = load_responses(args.responses)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        faults = Faults(**{name: getattr(args, name) for name in (
            "latency_s", "latency_jitter_s", "retry_after_s", "hang_s", *FAULTS)})
        batch_faults = BatchFaults(**{name: getattr(args, "batch_" + name) for name in (
            "in_progress_s", "in_progress_polls", "fail_first", "expire_first", "answered_before_stop",
            "malformed_line")})
    except ValueError as e:
        parser.error(str(e))
    teacher = LocalTeacher(responses, model=args.model, host=args.host, port=args.port,
                           fallback=args.fallback, faults=faults, batch_faults=batch_faults)
    base_url = teacher.start()
    print(f"local teacher serving {len(responses)} responses as model {args.model!r} at {base_url}", flush=True)
    print("press Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        teacher.stop()


if __name__ == "__main__":
    main()
