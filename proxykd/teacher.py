"""Stage 1, teacher: ask the black-box teacher for responses to every prompt.

This is where users spend money, so the stage is built around three rules:

- **Never pay twice.** Every sample has a `request_key`, the hash of the canonical request (model,
  endpoint, messages, sampling parameters, sample index). Actors append each response to a
  journal the moment it arrives; a rerun (after a crash, a `kill -9`, or with other operational
  settings) asks only for keys that have no stored response, and so does an actor that Ray Data
  restarts (after a `kill -9` of its process) when it retries its batches.
- **Stay under the limits.** One `Governor` actor per run spaces requests so that all actors
  together respect `requests_per_minute` and `tokens_per_minute`, pauses everyone when the API
  answers 429 with `Retry-After`, and holds the spend budget (`max_cost`, `max_total_tokens`).
- **Failures are data.** A request that still fails after its retries becomes a row with its `id`
  and `error`, is kept out of training, counted in the manifest and retried on the next run. An
  answer that is final but unusable (cut off at `max_tokens`, filtered, a refusal with no content)
  is stored, rejected with its id and reason, and never asked again. A prompt that cannot be sent
  (malformed, empty, over-long) is rejected with its `id` before any call. Only a wrong setup (bad
  key, unknown model or endpoint, no quota left) stops the stage at once.

Ray Data feeds the prompts to `num_actors` `TeacherCaller` actors, each an async `openai` client
with `concurrency` requests in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from proxykd import artifacts, storage
from proxykd.config import StageResources, TeacherConfig, fingerprint
from proxykd.data import MESSAGES_TYPE, teacher_style_response
from proxykd.encode import sample_id

log = logging.getLogger("proxykd")

TEACHER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sample_index", pa.int32()),
        ("messages", MESSAGES_TYPE),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        # An n-sample call's usage is split over its rows so that column sums are exact.
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("request_key", pa.string()),
        ("error", pa.string()),
    ]
)
JOURNAL_GLOB = "journal-*.jsonl"
ROLES = {"system", "user", "assistant"}
# `error` of a stored row that is not an answer, by prefix:
FINAL = "final: "  # the API answered, unusably (cut off, filtered, refused): never asked again
BILLED_ATTEMPT = "billed attempt: "  # an attempt that may be billed but gave no answer (its usage)
JOURNAL_FSYNC_EVERY_S = 1.0
OK_FINISH_REASONS = {"stop"}  # anything else (length, content_filter, tool_calls, ...) is final


# ------------------------------------------------------------------------- requests and keys


def sampling_params(cfg: TeacherConfig) -> dict:
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.endpoint != "chat":  # (chat keys stay as they were before endpoints were configurable)
        params["endpoint"] = cfg.endpoint
    return params


def request_key(model: str, messages: list[dict], params: dict, sample_index: int = 0) -> str:
    """Hash of the canonical request: the same request always maps to the same stored response."""
    canon = {"model": model, "messages": messages, "params": params, "sample_index": sample_index}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def request_keys(cfg: TeacherConfig, prompts: pa.Table) -> list[str]:
    """Every sample's key, prompt by prompt (n per prompt)."""
    params = sampling_params(cfg)
    return [request_key(cfg.model, m, params, k) for m in prompts["messages"].to_pylist() for k in range(cfg.n)]


def completion_prompt(messages: list[dict]) -> str:
    """The text sent to a plain completions endpoint: the message contents, blank-line separated."""
    return "\n\n".join(m["content"] for m in messages)


def estimate_tokens(messages: list[dict]) -> int:
    """A tokenizer-free, slightly generous estimate of a prompt's tokens (about 4 UTF-8 bytes per
    token for English, plus a few per message). Used for over-long checks and the TPM spacing
    only; usage and cost come from what the API reports."""
    return sum(math.ceil(len(m["content"].encode()) / 4) + 4 for m in messages)


def prompt_problem(messages, max_prompt_tokens: int) -> Optional[str]:
    """Why these messages cannot be sent, or None when they can."""
    if not isinstance(messages, list) or not messages:
        return "malformed: messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"malformed: messages[{i}] must have a role in {sorted(ROLES)} and string content"
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return "empty prompt: no user message with content"
    tokens = estimate_tokens(messages)
    if tokens > max_prompt_tokens:
        return f"over-long prompt: about {tokens} tokens > teacher.max_prompt_tokens={max_prompt_tokens}"
    return None


def cost(cfg: TeacherConfig, prompt_tokens: float, completion_tokens: float) -> float:
    return (prompt_tokens * cfg.price_per_million_prompt_tokens
            + completion_tokens * cfg.price_per_million_completion_tokens) / 1e6


def batch_cost(cfg: TeacherConfig, prompt_tokens: float, completion_tokens: float) -> float:
    """USD at the batch prices (the online ones × batch_discount, where not given)."""
    pp, cp = cfg.batch_price_per_million_prompt_tokens, cfg.batch_price_per_million_completion_tokens
    pp = cfg.price_per_million_prompt_tokens * cfg.batch_discount if pp is None else pp
    cp = cfg.price_per_million_completion_tokens * cfg.batch_discount if cp is None else cp
    return (prompt_tokens * pp + completion_tokens * cp) / 1e6


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: about base·2^attempt (capped), drawn from its upper half so
    that actors which failed together do not retry together."""
    d = min(cap, base * 2**attempt)
    return d / 2 + rng.uniform(0, d / 2)


def retry_after_s(headers) -> Optional[float]:
    """Seconds from a `retry-after-ms` or `retry-after` header (None when absent or a date)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    return None


def sample_outcome(text: Optional[str], finish_reason: Optional[str],
                   refusal: Optional[str] = None) -> tuple[str, Optional[str]]:
    """What one returned sample is: ("ok", None); ("final", why): the API answered and asking again
    would buy the same unusable answer (never trained on, never asked again); or ("retry", why):
    an empty answer, asked again (alone, not with the samples that came back good)."""
    if text is None:  # a refusal (`message.refusal`) or a filtered answer with no content at all
        return "final", f"refused (content null, finish_reason={finish_reason})" + (f": {refusal}" if refusal else "")
    if finish_reason not in OK_FINISH_REASONS:
        what = "cut off at teacher.max_tokens" if finish_reason == "length" else "not a finished answer"
        return "final", f"finish_reason={finish_reason} ({what})"
    if not text.strip():
        return "retry", "empty answer"
    return "ok", None


# --------------------------------------------------------------------------- the governor


class Governor:
    """One Ray actor per run, made only when limits or a budget are set, and asked before every
    attempt. Requests are spaced (not burst) so that all actors together never exceed
    `requests_per_minute` or `tokens_per_minute`; a 429 pauses every actor for its Retry-After;
    spend is reserved at the worst case (estimated prompt + max_tokens·n) before a call and
    settled at the real usage after, so `max_cost` and `max_total_tokens` hold even with many
    calls in flight."""

    def __init__(self, cfg: dict, spent_cost: float = 0.0, spent_tokens: int = 0):
        self.cfg = TeacherConfig(**cfg)
        self.next_request_at = self.next_tokens_at = self.paused_until = 0.0
        self.spent_cost, self.spent_tokens = spent_cost, spent_tokens
        self.reserved_cost, self.reserved_tokens = 0.0, 0
        self.stopped: Optional[str] = None

    def acquire(self, est_tokens: int, est_cost: float) -> Optional[float]:
        """The wall-clock time (time.time()) at which the caller may send, or None: the budget is
        spent, stop. (An absolute time, so the reply's own latency does not shift the spacing.)"""
        cfg = self.cfg
        if not self.stopped and cfg.max_cost is not None and (
                self.spent_cost + self.reserved_cost + est_cost > cfg.max_cost):
            self.stopped = f"teacher.max_cost={cfg.max_cost} reached (spent {self.spent_cost:.4f})"
        if not self.stopped and cfg.max_total_tokens is not None and (
                self.spent_tokens + self.reserved_tokens + est_tokens > cfg.max_total_tokens):
            self.stopped = f"teacher.max_total_tokens={cfg.max_total_tokens} reached (spent {self.spent_tokens})"
        if self.stopped:
            return None
        self.reserved_cost += est_cost
        self.reserved_tokens += est_tokens
        start = max(time.time(), self.next_request_at, self.next_tokens_at, self.paused_until)
        if cfg.requests_per_minute:
            self.next_request_at = start + 60.0 / cfg.requests_per_minute
        if cfg.tokens_per_minute:
            self.next_tokens_at = start + est_tokens * 60.0 / cfg.tokens_per_minute
        return start

    def settle(self, est_tokens: int, est_cost: float, prompt_tokens: int, completion_tokens: int) -> None:
        """After an attempt: swap its reservation for the real usage."""
        used = prompt_tokens + completion_tokens
        self.reserved_cost -= est_cost
        self.reserved_tokens -= est_tokens
        self.spent_cost += cost(self.cfg, prompt_tokens, completion_tokens)
        self.spent_tokens += used
        if self.cfg.tokens_per_minute:  # give back what the worst-case reservation over-counted
            unused = max(0, est_tokens - used)
            self.next_tokens_at = max(time.time(), self.next_tokens_at - unused * 60.0 / self.cfg.tokens_per_minute)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.time() + seconds)

    def status(self) -> dict:
        return {"spent_cost": self.spent_cost, "spent_tokens": self.spent_tokens, "stopped": self.stopped}


def needs_governor(cfg: TeacherConfig) -> bool:
    return any(v is not None for v in (cfg.requests_per_minute, cfg.tokens_per_minute, cfg.max_cost,
                                       cfg.max_total_tokens))


# ---------------------------------------------------------------------------- the callers


class SecretRef:
    """An API key kept in Ray's object store. Actors fetch it with `get()`; it never travels as a
    task argument, a runtime_env variable (Ray logs those) or a config value, and never prints."""

    def __init__(self, value: str):
        import ray

        self._ref = ray.put(value)

    def get(self) -> str:
        import ray

        return ray.get(self._ref)

    def __repr__(self) -> str:
        return "SecretRef(***)"


class TeacherSetupError(RuntimeError):
    """The API refuses the setup itself (bad key, no access, unknown model or endpoint): every
    request would fail the same way, so the stage stops instead of recording each one."""


class _Retryable(Exception):
    """An attempt to ask again. `usage`: what the API reported it cost; `maybe_billed`: it reported
    nothing but may bill it (a timeout, a dropped connection, a body cut short), so it is counted at
    its worst case."""

    def __init__(self, message: str, wait: Optional[float] = None, usage=None, rate_limited=False,
                 maybe_billed=False):
        super().__init__(message)
        self.wait, self.usage, self.rate_limited, self.maybe_billed = wait, usage, rate_limited, maybe_billed


def _usage(resp) -> tuple[int, int]:
    u = getattr(resp, "usage", None)
    return (int(u.prompt_tokens or 0), int(u.completion_tokens or 0)) if u else (0, 0)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# What each prompt's requests did; the driver sums these for the progress line and the manifest.
SUMMARY_SCHEMA = pa.schema([("id", pa.string()), ("outcome", pa.string()), ("error", pa.string()),
                            ("requests", pa.int64()), ("retries", pa.int64()), ("rate_limited", pa.int64()),
                            ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
CONNECTIONS_PER_CLIENT = 16
COUNTERS = ["requests", "retries", "rate_limited", "prompt_tokens", "completion_tokens"]


class TeacherCaller:
    """Ray Data actor: one async client, `concurrency` requests in flight, its own retry loop (so
    that retries are counted, and 429s pause this actor, or every actor through the governor), and
    a journal in the stage folder that gets each response the moment it arrives."""

    def __init__(self, base_url: str, cfg: dict, api_key: Optional[SecretRef], governor, folder: str):
        import openai

        self.cfg = TeacherConfig(**cfg)
        # Several clients of at most 16 connections each: httpx's pool does work per request that
        # grows with its size, and one 64-connection pool cost more CPU than the requests did.
        self.clients = [openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key.get() if api_key else "unused",
            max_retries=0,  # retried below, where they are counted and governed
            timeout=self.cfg.timeout_s,
        ) for _ in range(math.ceil(self.cfg.concurrency / CONNECTIONS_PER_CLIENT))]
        self.sent = 0
        self.params = sampling_params(self.cfg)
        self.governor = governor
        # Ray Data restarts a killed actor under the same actor id and retries its batches on it:
        # the journals of its earlier lives (none for a fresh actor: one glob) say what they bought.
        self.folder, self.actor = storage.local_path(folder), _actor_id()
        self.folder.mkdir(parents=True, exist_ok=True)  # (a node's mirror of a run folder in object storage)
        if self.actor:  # (restarted on another node: its earlier lives' journals, from the store)
            storage.pull(self.folder, match=f"journal-{self.actor}-*.jsonl")
        self.journaled = _journaled(self.folder, self.actor) if self.actor else {}
        # A run folder in object storage gets one journal object per batch (uploaded with each sync
        # and at the batch's end), so that no upload repeats what an earlier one sent.
        self.segmented = storage.remote_uri(self.folder) is not None
        self._open_journal()
        self.synced_at = time.monotonic()
        self.rng = random.Random()
        self.paused_until = 0.0
        self.setup_error: Optional[TeacherSetupError] = None
        self.loop = asyncio.new_event_loop()

    def _open_journal(self) -> None:
        name = f"journal-{self.actor}-{uuid.uuid4().hex}.jsonl" if self.actor else f"journal-{uuid.uuid4().hex}.jsonl"
        self.journal = open(self.folder / name, "a", encoding="utf-8")  # noqa: SIM115
        artifacts.fsync_dir(self.folder)  # (the journal's name, so that a machine crash keeps the file)

    def _write(self, rows: list[dict]) -> None:
        # One line per sample, flushed at once: a kill -9 loses at most the calls in flight. On disk
        # (fsync) at the end of each batch, before the driver counts it, and every
        # JOURNAL_FSYNC_EVERY_S in between, so that a machine crash loses at most that much; in a
        # thread, since an fsync on a busy or network disk would hold every request of the loop.
        self.journal.write("".join(json.dumps(r) + "\n" for r in rows))
        self.journal.flush()
        if time.monotonic() - self.synced_at >= JOURNAL_FSYNC_EVERY_S:
            self.synced_at = time.monotonic()
            self.loop.run_in_executor(None, self._sync, self.journal)

    def _sync(self, journal=None) -> None:
        journal = journal or self.journal
        try:
            os.fsync(journal.fileno())
        except ValueError:  # closed: a segment that its batch's end synced already
            return
        storage.push(journal.name)  # (a run folder in object storage: the journal so far, there too)

    async def _wait_turn(self, est_tokens: int, est_cost: float) -> bool:
        """Sleep until this attempt may be sent; False when the budget is spent."""
        send_at = self.paused_until
        if self.governor is not None:
            governed = await self.governor.acquire.remote(est_tokens, est_cost)
            if governed is None:
                return False
            send_at = max(send_at, governed)
        await asyncio.sleep(max(0.0, send_at - time.time()))
        return True

    def _settle(self, est_tokens: int, est_cost: float, usage: tuple[int, int]) -> None:
        if self.governor is not None:
            self.governor.settle.remote(est_tokens, est_cost, *usage)

    async def _send(self, messages: list[dict], n: int):
        """One request for `n` samples: (response, [(text, finish_reason, refusal)] per choice)."""
        import httpx
        import openai
        from openai.types import Completion
        from openai.types.chat import ChatCompletion

        self.sent += 1
        client = self.clients[self.sent % len(self.clients)]
        body = {"model": self.cfg.model, "n": n, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}
        try:
            # `client.post` is the client's documented way to send a body as it is: it skips the
            # typed-dict transform of `.create()`, which cost more CPU than the rest of a request
            # and does nothing to plain JSON messages. Errors, auth and parsing are the client's.
            if self.cfg.endpoint == "chat":
                resp = await client.post("/chat/completions", body={**body, "messages": messages},
                                         cast_to=ChatCompletion)
                samples = [(c.message.content, c.finish_reason, getattr(c.message, "refusal", None))
                           for c in resp.choices]
            else:
                resp = await client.post("/completions", body={**body, "prompt": completion_prompt(messages)},
                                         cast_to=Completion)
                samples = [(c.text, c.finish_reason, None) for c in resp.choices]
        except openai.RateLimitError as e:
            if "insufficient_quota" in (e.code, e.type):  # no credit left: every request would get it
                raise TeacherSetupError(f"the teacher API says the quota is spent (429 insufficient_quota): "
                                        f"{e.message}") from None
            raise _Retryable(f"429: {e.message}", retry_after_s(e.response.headers), rate_limited=True) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise TeacherSetupError(f"the teacher API refuses this setup ({e.status_code}): {e.message}") from None
        except openai.APIStatusError as e:
            if e.status_code == 402:  # payment required: the account, not this request
                raise TeacherSetupError(f"the teacher API refuses this setup (402): {e.message}") from None
            if e.status_code >= 500 or e.status_code in (408, 409):
                raise _Retryable(f"{e.status_code}: {e.message}", retry_after_s(e.response.headers)) from None
            raise  # another 4xx: this request is wrong, asking again will not help
        except (openai.APIConnectionError, json.JSONDecodeError, openai.APIResponseValidationError) as e:
            # Timeouts, dropped connections, truncated or malformed bodies. Unless the request never
            # left (no connection), the provider may have run and billed it.
            sent = not isinstance(e.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            raise _Retryable(f"{type(e).__name__}: {e}", maybe_billed=sent) from None
        return resp, samples

    def _recall(self, pending: list[dict], summary: dict) -> tuple[list[dict], int]:
        """(the samples of `pending` still to ask, how many were final answers) after what an
        earlier life of this actor journaled: answered samples (ok or final, as in `run`) are not
        asked again. The spending on record goes on `summary`: that life's summary of this batch
        never reached the driver."""
        still, final = [], 0
        for r in pending:
            known = self.journaled.pop(r["request_key"], None)
            if known is None:
                still.append(r)
                continue
            for name in ("requests", "prompt_tokens", "completion_tokens"):
                summary[name] += known[name]
            if known["answer"] is None:  # failed, or billed without an answer: asked again
                still.append(r)
            final += known["answer"] == "final"
        return still, final

    async def _ask(self, row: dict, sem: asyncio.Semaphore) -> dict:
        """All missing samples of one prompt, in one request (n = how many are missing); a retry
        asks only the samples that are still missing."""
        prompt_est = estimate_tokens(row["messages"])
        base = {"id": row["id"], "messages": row["messages"], "model": self.cfg.model, "response": None,
                "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "error": None}
        pending = [{**base, "sample_index": k,
                    "request_key": request_key(self.cfg.model, row["messages"], self.params, k)} for k in row["samples"]]
        summary = {"id": row["id"], "outcome": "failed", "error": None, **dict.fromkeys(COUNTERS, 0)}
        pending, rejected = self._recall(pending, summary)
        if not pending:  # all answered by an earlier life of this actor: its summary, no request
            return {**summary, "outcome": "rejected" if rejected else "ok"}

        def billed(pt: int, ct: int) -> None:
            summary["prompt_tokens"] += pt
            summary["completion_tokens"] += ct

        async with sem:
            for attempt in range(self.cfg.max_retries + 1):
                if self.setup_error:  # another request found the setup wrong: send nothing more
                    raise self.setup_error
                n = len(pending)
                est_tokens = prompt_est + self.cfg.max_tokens * n
                est_cost = cost(self.cfg, prompt_est, self.cfg.max_tokens * n)
                if not await self._wait_turn(est_tokens, est_cost):
                    return {**summary, "outcome": "budget"}  # (what is pending is asked on the next run)
                summary["requests"] += 1
                try:
                    resp, samples = await self._send(row["messages"], n)
                except _Retryable as e:
                    usage = e.usage or ((prompt_est, self.cfg.max_tokens * n) if e.maybe_billed else (0, 0))
                    billed(*usage)
                    self._settle(est_tokens, est_cost, usage)
                    if any(usage):  # on record, so that the budget of the next run counts it too
                        self._write([{**pending[0], "prompt_tokens": usage[0], "completion_tokens": usage[1],
                                      "error": f"{BILLED_ATTEMPT}{e} (counted at the worst case)"[:500]}])
                    summary["error"] = f"after {attempt + 1} attempts: {e}"
                    if attempt == self.cfg.max_retries:
                        break
                    # Retry-After wins over the backoff, up to max_backoff_s (a server asking for an
                    # hour would otherwise hold every actor for an hour).
                    pause = min(e.wait, self.cfg.max_backoff_s) if e.wait is not None else backoff_s(
                        attempt, self.cfg.backoff_s, self.cfg.max_backoff_s, self.rng)
                    summary["retries"] += 1
                    if e.rate_limited:
                        summary["rate_limited"] += 1
                        self.paused_until = max(self.paused_until, time.time() + pause)
                        if self.governor is not None:
                            self.governor.pause.remote(pause)
                    await asyncio.sleep(pause)
                    continue
                except TeacherSetupError as e:
                    self._settle(est_tokens, est_cost, (0, 0))
                    self.setup_error = e
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. a 400 for this prompt: recorded, not retried
                    self._settle(est_tokens, est_cost, (0, 0))
                    summary["error"] = f"{type(e).__name__}: {e}"
                    break
                pt, ct = _usage(resp)
                billed(pt, ct)
                self._settle(est_tokens, est_cost, (pt, ct))
                done, still = [], []
                for r, (text, finish_reason, refusal) in zip(pending, samples):
                    outcome, why = sample_outcome(text, finish_reason, refusal)
                    if outcome == "retry":
                        still.append(r)
                        continue
                    rejected += outcome == "final"
                    done.append({**r, "response": text, "finish_reason": finish_reason,
                                 "error": None if outcome == "ok" else f"{FINAL}{why}"[:500]})
                still += pending[len(samples):]  # (fewer choices than asked for)
                # The response's usage goes on the rows it produced (column sums stay what the API
                # reported); with none, on a row of its own.
                if not done and (pt or ct):
                    done = [{**pending[0], "error": f"{BILLED_ATTEMPT}0 of {n} samples with content"}]
                for i, (r, c) in enumerate(zip(done, _split(ct, len(done)))):
                    r.update(prompt_tokens=pt if i == 0 else 0, completion_tokens=c)
                self._write(done)
                pending = still
                if not pending:
                    return {**summary, "outcome": "rejected" if rejected else "ok", "error": None}
                summary["error"] = f"after {attempt + 1} attempts: {len(still)} of {n} samples empty"
                if attempt == self.cfg.max_retries:
                    break
                summary["retries"] += 1
                await asyncio.sleep(backoff_s(attempt, self.cfg.backoff_s, self.cfg.max_backoff_s, self.rng))
        summary["error"] = summary["error"][:500]
        self._write([{**r, "error": summary["error"]} for r in pending])
        return summary

    async def _run(self, rows: list[dict]) -> list[dict]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        results = await asyncio.gather(*(self._ask(r, sem) for r in rows), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        try:
            return pa.Table.from_pylist(self.loop.run_until_complete(self._run(rows)), schema=SUMMARY_SCHEMA)
        finally:
            self._sync()  # what this batch bought is on disk (and in the store) before the driver counts it
            if self.segmented:
                self.journal.close()
                self._open_journal()


# ----------------------------------------------------------------------------- storage


def _actor_id() -> Optional[str]:
    """This process's Ray actor id (kept across restarts), or None outside an actor."""
    import ray

    return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None


def journal_rows(path: Path) -> Iterator[tuple[int, Optional[dict]]]:
    """(line number, row) for each non-blank line of a journal; the row is None where the line
    cannot be read (cut short by a crash, damaged): not JSON, or not an object with a string
    `request_key`. The one reading of journal lines for the stage, its restarted actors and
    `proxykd status`."""
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # (JSON and UTF-8 errors are ValueErrors)
            row = None
        yield lineno, row if isinstance(row, dict) and isinstance(row.get("request_key"), str) else None


def row_tokens(row: dict) -> tuple[int, int]:
    """(prompt tokens, completion tokens) a journal row carries; 0 for a missing or unreadable count."""
    def count(key):
        try:
            return int(row.get(key) or 0)
        except (TypeError, ValueError):
            return 0
    return count("prompt_tokens"), count("completion_tokens")


def _journaled(folder: Path, actor: str) -> dict[str, dict]:
    """What the journals of actor `actor`'s earlier lives hold, by request_key: `answer` ("ok",
    "final" or None: failed, or only billed attempts) and what it cost, `requests` being the billed
    calls on record (a call's usage sits on one of its rows; calls that left no row are not known).
    Read once, by a restarted actor; a line cut short by the kill is skipped (asked again)."""
    known: dict[str, dict] = {}
    for path in sorted(folder.glob(f"journal-{actor}-*.jsonl")):
        for _, row in journal_rows(path):
            if row is None:
                continue
            pt, ct = row_tokens(row)
            k = known.setdefault(row["request_key"], {"answer": None, "requests": 0, "prompt_tokens": 0,
                                                      "completion_tokens": 0})
            k["requests"] += pt > 0
            k["prompt_tokens"] += pt
            k["completion_tokens"] += ct
            error = row.get("error")
            if error is None:
                k["answer"] = "ok"
            elif isinstance(error, str) and error.startswith(FINAL) and k["answer"] is None:
                k["answer"] = "final"
    return known


def compact_journals(folder: Path) -> int:
    """Fold every journal (including one a killed run left behind) into a Parquet shard. Nothing
    paid for is lost on the way: the shard is on disk (fsynced) before a journal goes, and a
    journal with a line that cannot be read (cut short by a crash, damaged) is quarantined, not
    removed; its readable lines are folded and the requests of the others asked again. Returns
    the rows folded."""
    storage.pull(folder)  # (journals the actors of other nodes uploaded)
    journals = sorted(Path(folder).glob(JOURNAL_GLOB))
    rows, damaged = [], {}
    for path in journals:
        for lineno, row in journal_rows(path):
            if row is None:
                damaged[path] = damaged.get(path, 0) + 1
                log.warning("teacher: %s:%d cannot be read (cut short by a crash?); that request is asked again",
                            path.name, lineno)
                continue
            rows.append(row)
    if rows:
        shard = Path(folder) / f"part-{uuid.uuid4().hex}.parquet"
        artifacts.write_table_atomic(pa.Table.from_pylist(rows, schema=TEACHER_SCHEMA), shard)  # (fsynced)
    for path in journals:  # (a crash before this loop leaves duplicates, which readers drop)
        if path in damaged:
            artifacts.quarantine(path, f"{damaged[path]} unreadable lines, the others folded into a shard")
        else:
            artifacts.remove(path)
    artifacts.fsync_dir(Path(folder))
    return len(rows)


def _stored(folder: Path) -> pa.Table:
    table = artifacts.read_shards(folder)
    if table.num_rows == 0:
        return TEACHER_SCHEMA.empty_table()
    if "sample_index" not in table.column_names:  # shards written before n was configurable
        table = table.append_column("sample_index", pa.array([0] * table.num_rows, pa.int32()))
    return table.select(TEACHER_SCHEMA.names).cast(TEACHER_SCHEMA)


def _first_per(table: pa.Table, column: str) -> pa.Table:
    seen, keep = set(), []
    for i, value in enumerate(table[column].to_pylist()):
        if value not in seen:
            seen.add(value)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


def responses(folder: Path, keys: Optional[list[str]] = None) -> pa.Table:
    """Successful teacher responses, one per request_key; with `keys`, only those answering one of
    these requests (a stored response to a request no longer made is kept on disk, since it was
    paid for, but not used). A stored row's `id` is the first prompt that asked it; prompts with
    identical messages share one request (see `answers`)."""
    return _ok(_stored(folder), keys)


def _ok(table: pa.Table, keys: Optional[list[str]] = None) -> pa.Table:
    """`responses` of an already-read stored table."""
    ok = pc.is_null(table["error"])
    if keys is not None:
        ok = pc.and_(ok, pc.is_in(table["request_key"], pa.array(keys, pa.string())))
    return _first_per(table.filter(ok), "request_key")


ANSWER_COLUMNS = ["id", "sample_index", "response", "finish_reason", "request_key"]


def answers(cfg: TeacherConfig, prompts: pa.Table, folder: Path) -> pa.Table:
    """The teacher's answers as later stages read them: one row per prompt `id` and sample index
    that has a response, looked up by request_key (so two prompts with the same messages both get
    the one response bought for them)."""
    return _answers(cfg, prompts, responses(folder), request_keys(cfg, prompts))


def _answers(cfg: TeacherConfig, prompts: pa.Table, ok: pa.Table, keys: list[str]) -> pa.Table:
    """`answers` from the successful responses `ok` (as `responses` returns them) and the prompts'
    `request_keys`."""
    stored = {r["request_key"]: r for r in ok.select(ANSWER_COLUMNS).to_pylist()}
    out = []
    for i, rid in enumerate(prompts["id"].to_pylist()):
        for k in range(cfg.n):
            hit = stored.get(keys[i * cfg.n + k])
            if hit is not None:
                out.append({**hit, "id": rid, "sample_index": k})
    return pa.Table.from_pylist(out, schema=pa.schema([TEACHER_SCHEMA.field(c) for c in ANSWER_COLUMNS]))


def _spent(cfg: TeacherConfig, table: pa.Table, folder: Path) -> tuple[float, int]:
    """What everything stored in `folder` has cost (USD, tokens), failures with reported usage
    included, each at the price it was bought at: the tokens of the batches collected there (batch
    mode's ledger) at the batch price, the rest (online) at the online price."""
    from proxykd import teacher_batch  # (it imports this module)

    pt = int(pc.sum(table["prompt_tokens"]).as_py() or 0)
    ct = int(pc.sum(table["completion_tokens"]).as_py() or 0)
    bpt, bct = teacher_batch.collected_tokens(folder)
    return cost(cfg, max(0, pt - bpt), max(0, ct - bct)) + batch_cost(cfg, bpt, bct), pt + ct


def _final(table: pa.Table) -> dict[str, dict]:
    """Stored final answers (cut off, filtered, refused) by request_key: never asked again."""
    rows = table.filter(pc.starts_with(pc.fill_null(table["error"], ""), FINAL))
    return {r["request_key"]: r for r in rows.select(["request_key", "finish_reason", "error"]).to_pylist()}


def _errors(table: pa.Table) -> dict[str, str]:
    """The error of each failed request_key, a request's own failure before a billed attempt's."""
    out: dict[str, str] = {}
    for r in table.filter(pc.is_valid(table["error"])).select(["request_key", "error"]).to_pylist():
        if r["request_key"] not in out or out[r["request_key"]].startswith(BILLED_ATTEMPT):
            out[r["request_key"]] = r["error"]
    return out


def _prompts_done(totals: dict) -> int:
    return totals["ok"] + totals["failed"] + totals["rejected"] + totals["budget"]


# ------------------------------------------------------------------------------- the stage


def config_hash(cfg: TeacherConfig, prompts_content_hash: str) -> str:
    # (operational keys, marked in the schema: concurrency, actors, limits, retries, prices,
    # budget, mode, do not change what is bought, and stay out of the fingerprint)
    return fingerprint(prompts_content_hash, cfg)


def driver_node_address() -> str:
    """The address Ray knows this process's node by, where Ray's own traffic from the other nodes
    arrives (Ray turns a loopback `--node-ip-address` into the machine's address)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def _local_teacher(prompts: pa.Table, host: str = "127.0.0.1"):
    """The stand-in teacher: answers each prompt from its reference, on both endpoints. It runs in
    the driver; on a cluster `host` is the driver node's address, where caller actors on other
    nodes reach it."""
    from proxykd.local_teacher import LocalTeacher, lookup_key

    table = {}
    for row in prompts.select(["messages", "reference"]).to_pylist():
        if row["reference"] is not None:
            answer = teacher_style_response(row["reference"])
            table[lookup_key(row["messages"])] = answer
            table[completion_prompt(row["messages"])] = answer
    return LocalTeacher(table, host=host)


def actor_ray_args(resources: Optional[StageResources] = None) -> dict:
    """What each teacher actor asks Ray for: `resources.teacher`, 0.5 CPU and no GPU where it sets
    none. On a cluster this is the demand for CPU nodes."""
    return (resources or StageResources()).ray_args(cpus=0.5)


class MissingAPIKey(RuntimeError):
    pass


def _todo(cfg: TeacherConfig, prompts: pa.Table, keys: list[str],
          answered: set[str]) -> tuple[pa.Table, list[dict], int]:
    """(prompts with the sample indices still to ask, rejected {id, error}, samples to ask), from
    the prompts' `request_keys`."""
    todo, rejected, n_samples, asking = [], [], 0, set()
    for i, row in enumerate(prompts.select(["id", "messages"]).to_pylist()):
        problem = prompt_problem(row["messages"], cfg.max_prompt_tokens)
        if problem:
            rejected.append({"id": row["id"], "error": problem})
            continue
        row_keys = keys[i * cfg.n:(i + 1) * cfg.n]
        # (a prompt with the same messages as an earlier one shares its request)
        missing = [k for k, key in enumerate(row_keys) if key not in answered and key not in asking]
        asking.update(row_keys[k] for k in missing)
        if missing:
            todo.append({**row, "samples": missing})
            n_samples += len(missing)
    table = pa.Table.from_pylist(todo, schema=pa.schema(
        [("id", pa.string()), ("messages", MESSAGES_TYPE), ("samples", pa.list_(pa.int32()))]))
    return table, rejected, n_samples


def log_progress(cfg: TeacherConfig, totals: dict, done: int, total: int, started: float, final: bool = False) -> None:
    """The stage's progress line. Along the way it carries a `progress` record, which the console
    (proxykd/console.py) turns into its redrawn progress line; the final one is the stage's summary
    and stays on the console as a plain line."""
    rate = totals["requests"] / max(time.time() - started, 1e-9)
    spent = cost(cfg, totals["prompt_tokens"], totals["completion_tokens"])
    text = (f"teacher: {done}/{total} prompts | {totals['ok']} ok, {totals['failed']} failed, "
            f"{totals['rejected']} with rejected answers | "
            f"{totals['requests']} requests ({rate:.1f}/s), {totals['retries']} retries "
            f"({totals['rate_limited']} rate-limited) | tokens {totals['prompt_tokens']:,} in + "
            f"{totals['completion_tokens']:,} out | est. ${spent:.4f}")
    progress = {"key": "teacher", "done": done, "total": total, "unit": "prompts", "cost": spent, "from_start": True}
    log.info(text, extra=None if final else {"progress": progress})


def begin(cfg: TeacherConfig, prompts_content_hash: str, run_dir: str) -> tuple[Path, str, Optional[str], Optional[dict]]:
    """The start both modes share: (folder, fingerprint, API key, and the manifest when the stage
    is done with nothing failed or unasked, else None). A stage to run is begun, and what a killed
    run bought (its journals) folded in."""
    folder = artifacts.stage_dir(run_dir, "teacher")
    h = config_hash(cfg, prompts_content_hash)
    if artifacts.is_done(folder, h):
        manifest = artifacts.read_manifest(folder)
        if not manifest["rows"]["failed"] and not manifest["rows"].get("not_asked"):
            log.info("teacher: done already (%s), skipped", folder)
            return folder, h, None, manifest
        log.info("teacher: asking again the %d failed and %d unasked prompts of the last run",
                 manifest["rows"]["failed"], manifest["rows"].get("not_asked", 0))
    api_key = os.environ.get(cfg.api_key_env)
    if cfg.base_url is not None and not api_key:
        raise MissingAPIKey(f"teacher.base_url is {cfg.base_url} but the environment variable "
                            f"{cfg.api_key_env} (teacher.api_key_env) is not set")
    artifacts.begin_stage(folder, h, keep_stale=True)
    compact_journals(folder)
    return folder, h, api_key, None


def run(cfg: TeacherConfig, prompts: pa.Table, prompts_content_hash: str, run_dir: str,
        resources: Optional[StageResources] = None, local_host: str = "127.0.0.1") -> dict:
    """The teacher stage; `resources`: each teacher actor's Ray request (`resources.teacher`);
    `local_host`: where the local teacher listens when `base_url` is null (`pipeline.local_teacher_host`).
    The batch mode's client runs in the driver: its local teacher stays on 127.0.0.1."""
    if cfg.mode == "batch":  # the provider's Batch API: a loop on the driver, no Ray
        from proxykd import teacher_batch

        return teacher_batch.run(cfg, prompts, prompts_content_hash, run_dir)
    import ray

    started = time.time()
    folder, h, api_key, done = begin(cfg, prompts_content_hash, run_dir)
    if done:
        return done

    stored = _stored(folder)
    # (final answers, unusable as they are, count as answered: asking again would buy them again)
    answered = set(_ok(stored)["request_key"].to_pylist()) | _final(stored).keys()
    keys = request_keys(cfg, prompts)  # n per prompt, prompt by prompt
    todo, rejected, n_samples = _todo(cfg, prompts, keys, answered)
    for r in rejected[:20]:
        log.warning("teacher: %s rejected before any call: %s", r["id"], r["error"])
    log.info("teacher: %d prompts (%d samples) to ask, %d samples stored, %d prompts rejected",
             todo.num_rows, n_samples, len(answered), len(rejected))

    governor = None
    if needs_governor(cfg):
        governor = ray.remote(num_cpus=0)(Governor).remote(cfg.model_dump(), *_spent(cfg, stored, folder))
    totals = {"ok": 0, "failed": 0, "rejected": 0, "budget": 0, **dict.fromkeys(COUNTERS, 0)}
    stopped = None
    server = _local_teacher(prompts, local_host) if cfg.base_url is None else nullcontext()
    try:
        with server:
            base_url = cfg.base_url or server.base_url
            if cfg.base_url is None:
                log.info("teacher: the local teacher listens at %s", base_url)
            if todo.num_rows:
                # Large batches keep `concurrency` calls in flight with few gaps between batches
                # (the journal, not the batch, is what survives a crash); enough of them that
                # every actor gets work.
                batch_size = max(cfg.concurrency, min(cfg.concurrency * 16,
                                                      math.ceil(todo.num_rows / (cfg.num_actors * 2))))
                summaries = artifacts.to_dataset(todo, batch_size).map_batches(
                    TeacherCaller,
                    fn_constructor_kwargs={"base_url": base_url, "cfg": cfg.model_dump(), "governor": governor,
                                           "folder": storage.location(folder),
                                           "api_key": SecretRef(api_key) if api_key and cfg.base_url else None},
                    batch_format="pyarrow",
                    batch_size=batch_size,
                    compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                    **actor_ray_args(resources),
                )
                last_log = time.time()
                for batch in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for outcome in batch["outcome"].to_pylist():
                        totals[outcome] += 1
                    for name in COUNTERS:
                        totals[name] += int(pc.sum(batch[name]).as_py() or 0)
                    if time.time() - last_log >= cfg.progress_every_s:
                        last_log = time.time()
                        log_progress(cfg, totals, _prompts_done(totals), todo.num_rows, started)
        if governor is not None:
            stopped = ray.get(governor.status.remote())["stopped"]
    finally:
        # (After a failure the journals stay: an actor may still be writing; the next run folds them.)
        if governor is not None:
            ray.kill(governor)
    compact_journals(folder)
    log_progress(cfg, totals, _prompts_done(totals), todo.num_rows, started, final=True)
    if stopped:
        log.warning("teacher: stopped early, %s; %d prompts not asked (they are asked on the next run)",
                    stopped, totals["budget"])

    return _finish(cfg, prompts, prompts_content_hash, h, started, folder, keys, rejected, todo.num_rows,
                   totals, stopped)


def _finish(cfg: TeacherConfig, prompts: pa.Table, prompts_hash: str, h: str, started: float, folder: Path,
            keys: list[str], rejected: list[dict], asked: int, totals: dict, stopped: Optional[str],
            batches: Optional[dict] = None) -> dict:
    """The end of the stage in either mode: every prompt's outcome from what is stored (ok, failed,
    not asked, answers rejected), logged, and the manifest and rejected.parquet written. `keys`:
    the prompts' `request_keys`; `asked`: prompts asked this run; `totals`: this run's requests,
    retries, rate_limited and tokens; `stopped`: why the budget stopped it; `batches`: batch mode's
    batch counts (the manifest then says `mode: batch` and prices this run's tokens at the batch
    price)."""
    stored = _stored(folder)  # (again: this run's journals were just folded in)
    got = _answers(cfg, prompts, _ok(stored), keys)
    samples = Counter(got["id"].to_pylist())
    errors, final = _errors(stored), _final(stored)
    rejected_ids = {r["id"] for r in rejected}
    failed, not_asked, rejected_answers = [], [], []
    cut_off = int(pc.sum(pc.equal(got["finish_reason"], "length")).as_py() or 0)  # (stored before they were final)
    for i, rid in enumerate(prompts["id"].to_pylist()):
        if rid in rejected_ids or samples.get(rid, 0) == cfg.n:
            continue
        row_keys = keys[i * cfg.n:(i + 1) * cfg.n]
        for k, key in enumerate(row_keys):
            if key in final:
                rejected_answers.append({"id": sample_id(rid, k), "error": final[key]["error"][len(FINAL):]})
                cut_off += final[key]["finish_reason"] == "length"
        if samples.get(rid, 0) + sum(key in final for key in row_keys) == cfg.n:
            continue  # every sample answered, some unusably: rejected, not asked again
        error = next((errors[k] for k in row_keys if k in errors and k not in final), None)
        (failed if error else not_asked).append({"id": rid, "error": error or "not asked: budget reached"})
    for r in rejected_answers[:20]:
        log.warning("teacher: %s rejected (a final answer, not asked again): %s", r["id"], r["error"])
    for r in (failed + not_asked)[:20]:
        log.warning("teacher: %s has no response (asked again on the next run): %s", r["id"], r["error"])
    ok = _ok(stored, sorted(set(got["request_key"].to_pylist())))
    total_cost, total_tokens = _spent(cfg, stored, folder)
    batch = batches is not None
    price = batch_cost if batch else cost
    batch_prices = {"batch_prices_per_million": [round(batch_cost(cfg, 1e6, 0), 6),
                                                 round(batch_cost(cfg, 0, 1e6), 6)]} if batch else {}
    return artifacts.write_manifest(
        folder,
        "teacher",
        h,
        started,
        **({"mode": "batch"} if batch else {}),
        inputs={"prompts": prompts_hash, "base_url": cfg.base_url or "local-teacher", "model": cfg.model,
                "endpoint": cfg.endpoint, "n": cfg.n},
        # ok: prompts with all n samples; failed + not_asked: the prompts the next run asks again.
        rows={"prompts": prompts.num_rows, "asked": asked, "ok": sum(1 for v in samples.values() if v == cfg.n),
              "samples_ok": got.num_rows, "failed": len(failed), "not_asked": len(not_asked),
              "rejected": len(rejected), "rejected_answers": len(rejected_answers), "cut_off": cut_off},
        failed_ids=[r["id"] for r in failed + not_asked][:1000],
        # What downstream stages hash: changes whenever a retry adds responses.
        responses_hash=fingerprint(sorted(ok["request_key"].to_pylist())),
        # This run's calls (billed failures such as empty answers included; in batch mode, the lines
        # put in batch files, retries being resubmissions), and all stored ones.
        requests={k: totals[k] for k in ("requests", "retries", "rate_limited")},
        **({"batches": batches} if batch else {}),
        tokens={"prompt": int(pc.sum(ok["prompt_tokens"]).as_py() or 0),
                "completion": int(pc.sum(ok["completion_tokens"]).as_py() or 0),
                "this_run": totals["prompt_tokens"] + totals["completion_tokens"], "all_stored": total_tokens},
        cost={"this_run": round(price(cfg, totals["prompt_tokens"], totals["completion_tokens"]), 6),
              "all_stored": round(total_cost, 6),
              "prices_per_million": [cfg.price_per_million_prompt_tokens, cfg.price_per_million_completion_tokens],
              **batch_prices},
        budget={"max_cost": cfg.max_cost, "max_total_tokens": cfg.max_total_tokens, "stopped": stopped},
        **artifacts.write_rejected(folder, rejected + rejected_answers),
    )
