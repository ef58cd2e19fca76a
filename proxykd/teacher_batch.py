"""Stage 1 in batch mode (`teacher.mode: batch`): the teacher's answers bought through the
provider's Batch API, at the batch price (about half the online one), within 24 hours.

The provider does the work, so the stage is a loop on the driver (no Ray): write the requests
still unanswered as JSONL files within the provider's limits, upload each (`files.create`,
purpose `batch`), create a batch over it, poll the running batches at a growing interval, and
when one ends download its output and error files and journal every answer exactly as the
online stage does (`journal-*.jsonl`, folded into `teacher/*.parquet` by `compact_journals`).
A request's `custom_id` is the `request_key` of its first sample, so later stages, and a later
online run, see the same rows and never buy them again.

Resumable across days: every file and batch id goes into `teacher/batch/ledger.jsonl` (fsynced)
the moment the provider returns it. A killed stage re-attaches to its running batches instead of
buying them again; a file uploaded without a batch on record is first looked up among the
provider's batches. Requests of a batch that expired or failed, and retryable errors of single
requests, go into a new batch (up to `max_retries` times in a run); those of a cancelled batch
are stored as failures (someone cancelled it) and asked on the next run.

Budget: a batch is packed only with requests whose worst case (estimated prompt + max_tokens·n,
at the batch price) fits under `max_cost` / `max_total_tokens` beside everything stored and every
batch still running; the stage stops cleanly when the next request could exceed it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa

from proxykd import artifacts, storage
from proxykd import teacher as online
from proxykd.config import TeacherConfig

log = logging.getLogger("proxykd")

DONE = {"completed", "expired", "cancelled", "failed"}
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
RETRY_STATUS = {408, 409, 429}  # and every 5xx: asked again in a new batch
CUSTOM_ID = re.compile(rb'"custom_id":\s*"([^"]+)"')  # (found in a line cut short too)
LIST_PAGES = 20  # of 100 batches, searched for a batch created over a file before a crash


# ----------------------------------------------------------------------------- the ledger


class Ledger:
    """`teacher/batch/ledger.jsonl`: what exists at the provider, one fsynced line per event,
    keyed by the local name of a batch file (`b-<hex>`):

    - file: uploaded (file_id, base_url, requests, its reserved worst case);
    - batch: a batch created over it (batch_id);
    - done: its answers are journaled, or it was abandoned (status, usage).

    A name with a file event and no done event is open: its batch is running, or not yet made."""

    def __init__(self, folder: Path):
        self.dir = Path(folder) / "batch"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "ledger.jsonl"
        self.events, cut = _read_ledger(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if cut:  # (so that the next event is a line of its own)
            self._file.write("\n")
        artifacts.fsync_dir(self.dir)
        self._tidy()

    def _tidy(self) -> None:
        """Remove local batch files no open batch needs (left by a run that died uploading)."""
        keep = set(self.open_names())
        for path in self.dir.glob("b-*"):
            if path.name.split(".")[0] not in keep:
                artifacts.remove(path)

    def add(self, event: str, name: str, **fields) -> None:
        row = {"event": event, "name": name, "at": time.time(), **fields}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # (on disk before anything is done with the id)
        storage.push(self.path)  # (and in the store, for a run folder there)
        self.events.append(row)

    def close(self) -> None:
        self._file.close()

    def by_event(self, event: str) -> dict[str, dict]:
        return {e["name"]: e for e in self.events if e.get("event") == event}

    def open_names(self) -> list[str]:
        done = self.by_event("done")
        return [n for n in self.by_event("file") if n not in done]


def _read_ledger(path: Path, warn: bool = True) -> tuple[list[dict], bool]:
    """A ledger's events, and whether its last line is cut short (by a crash: that line is skipped,
    with a warning, and its object is looked up again)."""
    events, raw = [], path.read_bytes() if path.exists() else b""
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            events.append(json.loads(line))
        except ValueError:
            if warn:
                log.warning("teacher: %s:%d cannot be read, skipped", path, lineno)
    return events, bool(raw) and not raw.endswith(b"\n")


def collected_tokens(folder: Path) -> tuple[int, int]:
    """(prompt, completion) tokens of every batch collected into the stage folder `folder`, the
    ones bought at the batch price; (0, 0) where batch mode never ran. Read-only (online mode asks
    it too, for the cost of what is stored) and quiet (a line it cannot read is Ledger's to report)."""
    done = {e["name"]: e for e in _read_ledger(Path(folder) / "batch" / "ledger.jsonl", warn=False)[0]
            if e.get("event") == "done"}.values()
    return sum(e.get("prompt_tokens", 0) for e in done), sum(e.get("completion_tokens", 0) for e in done)


# --------------------------------------------------------------------------- requests


def _request(cfg: TeacherConfig, params: dict, row: dict) -> dict:
    """One request (a prompt's missing samples, n of them in one call), as kept beside its file."""
    keys = [online.request_key(cfg.model, row["messages"], params, k) for k in row["samples"]]
    return {"custom_id": keys[0], "id": row["id"], "messages": row["messages"], "samples": list(row["samples"]),
            "keys": keys, "est": online.estimate_tokens(row["messages"]), "model": cfg.model}


def _line(cfg: TeacherConfig, req: dict) -> bytes:
    """The request as a line of the provider's batch input file: the body the online stage sends."""
    body = {"model": cfg.model, "n": len(req["samples"]), "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens}
    if cfg.endpoint == "chat":
        body["messages"] = req["messages"]
    else:
        body["prompt"] = online.completion_prompt(req["messages"])
    return (json.dumps({"custom_id": req["custom_id"], "method": "POST", "url": ENDPOINTS[cfg.endpoint],
                        "body": body}) + "\n").encode()


def _worst(cfg: TeacherConfig, req: dict) -> tuple[int, float]:
    """(tokens, USD) a request may cost at most."""
    out = cfg.max_tokens * len(req["samples"])
    return req["est"] + out, online.batch_cost(cfg, req["est"], out)


def _row(req: dict, i: int, **fields) -> dict:
    """The journal row of the request's i-th sample (the online journal's format)."""
    return {"id": req["id"], "sample_index": req["samples"][i], "messages": req["messages"], "model": req["model"],
            "response": None, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
            "request_key": req["keys"][i], "error": None, **fields}


def _error_rows(req: dict, error: str) -> list[dict]:
    """A failed request's rows, one per sample, as the online journal stores them: asked again on
    the next run."""
    return [_row(req, i, error=error[:500]) for i in range(len(req["samples"]))]


def _subset(req: dict, indices: list[int]) -> dict:
    """The request for some of its samples only (the others are answered)."""
    keys = [req["keys"][i] for i in indices]
    return {**req, "custom_id": keys[0], "samples": [req["samples"][i] for i in indices], "keys": keys}


def _choices(endpoint: str, body: dict) -> list[tuple]:
    """[(text, finish_reason, refusal)] of a completion body."""
    if endpoint == "chat":
        return [(m.get("content"), c.get("finish_reason"), m.get("refusal"))
                for c in body.get("choices") or [] for m in [c.get("message") or {}]]
    return [(c.get("text"), c.get("finish_reason"), None) for c in body.get("choices") or []]


def _error_text(item: dict) -> str:
    if item.get("error"):
        return f"{item['error'].get('code')}: {item['error'].get('message')}"
    resp = item["response"]
    err = (resp.get("body") or {}).get("error") or {}
    return f"{resp.get('status_code')}: {err.get('message') or 'error'}"


def _retryable(item: dict) -> bool:
    if item.get("error"):  # (no response: the request never ran)
        return item["error"].get("code") != "batch_cancelled"
    status = item["response"].get("status_code") or 500
    return status >= 500 or status in RETRY_STATUS


# ------------------------------------------------------------------------------ the loop


class BatchRun:
    """One run of the batch loop: submit, poll, collect, until nothing is open or left."""

    def __init__(self, cfg: TeacherConfig, folder: Path, client, stored: pa.Table):
        self.cfg, self.folder, self.client = cfg, folder, client
        self.ledger = Ledger(folder)
        self.stored_keys = set(online._ok(stored)["request_key"].to_pylist()) | online._final(stored).keys()
        self.spent_cost, self.spent_tokens = online._spent(cfg, stored, folder)
        self.pool: list[dict] = []  # requests to put in the next batch files
        self.attempts: Counter = Counter()  # request_key -> batches it was in, this run
        self.status: dict[str, dict] = {}  # open name -> the provider's last Batch (as a dict)
        self.totals = Counter()
        self.stopped: Optional[str] = None
        self.blocked: Optional[str] = None  # why the last file could take no more requests (the budget)
        self.submitted: list[str] = []  # batch ids created in this run
        self.reattached: list[str] = []

    # -- re-attach --------------------------------------------------------------------------

    def in_flight(self) -> set[str]:
        """The request keys of open batches, after abandoning those no provider can be asked about
        (the local teacher of a run that ended, or another base_url)."""
        keys = set()
        for name in self.ledger.open_names():
            entry = self.ledger.by_event("file")[name]
            if self.cfg.base_url is None or entry.get("base_url") != self.cfg.base_url:
                log.warning("teacher: batch file %s (%s) was made at %s, not here: abandoned, its requests asked "
                            "again", name, entry["file_id"], entry.get("base_url") or "a local teacher now gone")
                self.ledger.add("done", name, status="abandoned")
                continue
            for req in self._requests(name):
                keys.update(req["keys"])
                for key in req["keys"]:
                    self.attempts[key] += 1
            self.reattached.append(self.ledger.by_event("batch").get(name, {}).get("batch_id") or entry["file_id"])
        self.ledger._tidy()  # (the abandoned ones' local files)
        return keys

    def _requests(self, name: str) -> Iterator[dict]:
        with open(self.ledger.dir / f"{name}.requests.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def _reserved(self) -> tuple[int, float]:
        files = self.ledger.by_event("file")
        names = self.ledger.open_names()
        return sum(files[n]["est_tokens"] for n in names), sum(files[n]["est_cost"] for n in names)

    # -- submit -----------------------------------------------------------------------------

    def submit(self) -> int:
        """Batches for the pool, as many as the limits and the budget allow; returns how many."""
        made = 0
        while self.pool and not self.stopped:
            if self.cfg.batch_max_in_flight and len(self.ledger.open_names()) >= self.cfg.batch_max_in_flight:
                break
            name, taken, lines = self._pack()
            if not taken:
                if self.pool and not self.ledger.open_names():  # nothing running will give budget back
                    self.stopped = self.blocked
                break
            self._upload(name, taken, lines)
            self._create(name)
            made += 1
        return made

    def _pack(self) -> tuple[str, list[dict], list[bytes]]:
        """Take the pool's first requests that fit one file and the budget: (a new name, the
        requests, the file's lines). The requests are kept under the name (fsynced) before the
        upload: they are what re-attaching and collecting read."""
        cfg = self.cfg
        tokens, usd = self._reserved()
        taken, lines, size = [], [], 0
        for req in list(self.pool):
            line = _line(cfg, req)
            if len(line) > cfg.batch_max_bytes:  # never fits a file: a failure of its own
                self.pool.remove(req)
                self._journal(f"oversized-{uuid.uuid4().hex[:16]}", _error_rows(
                    req, f"a request of {len(line)} bytes > teacher.batch_max_bytes={cfg.batch_max_bytes}"))
                continue
            est_tokens, est_cost = _worst(cfg, req)
            if len(taken) == cfg.batch_max_requests or size + len(line) > cfg.batch_max_bytes:
                break
            if cfg.max_cost is not None and self.spent_cost + usd + est_cost > cfg.max_cost:
                self.blocked = f"teacher.max_cost={cfg.max_cost} reached (spent {self.spent_cost:.4f})"
                break
            if cfg.max_total_tokens is not None and self.spent_tokens + tokens + est_tokens > cfg.max_total_tokens:
                self.blocked = f"teacher.max_total_tokens={cfg.max_total_tokens} reached (spent {self.spent_tokens})"
                break
            taken.append(req)
            lines.append(line)
            size, tokens, usd = size + len(line), tokens + est_tokens, usd + est_cost
        self.pool = self.pool[len(taken):]
        name = f"b-{uuid.uuid4().hex[:16]}"
        if taken:  # (a run that dies before the upload is on record leaves it to Ledger._tidy)
            with open(self.ledger.dir / f"{name}.requests.jsonl", "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in taken))
                f.flush()
                os.fsync(f.fileno())
            artifacts.fsync_dir(self.ledger.dir)
            storage.push(self.ledger.dir / f"{name}.requests.jsonl")
        return name, taken, lines

    def _upload(self, name: str, taken: list[dict], lines: list[bytes]) -> None:
        with _setup_errors():
            file = self.client.files.create(file=(f"{name}.jsonl", b"".join(lines)), purpose="batch")
        worst = [_worst(self.cfg, r) for r in taken]
        self.ledger.add("file", name, file_id=file.id, base_url=self.cfg.base_url, requests=len(taken),
                        est_tokens=sum(t for t, _ in worst), est_cost=sum(c for _, c in worst))
        for req in taken:
            for key in req["keys"]:
                self.attempts[key] += 1
        self.totals["requests"] += len(taken)

    def _create(self, name: str) -> None:
        """A batch over the uploaded file, created once: after an error that may hide a created
        batch (a timeout, a dropped connection), the provider's batches are searched first."""
        import openai

        file_id = self.ledger.by_event("file")[name]["file_id"]
        for attempt in range(self.cfg.max_retries + 1):
            batch = self._find(file_id) if attempt else None
            try:
                with _setup_errors():
                    batch = batch or self.client.with_options(max_retries=0).batches.create(
                        input_file_id=file_id, endpoint=ENDPOINTS[self.cfg.endpoint], completion_window="24h",
                        metadata={"proxykd": name})
                break
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
                log.warning("teacher: creating the batch for %s failed (%s), attempt %d", file_id, e, attempt + 1)
                if attempt == self.cfg.max_retries:
                    raise
                time.sleep(online.backoff_s(attempt, self.cfg.backoff_s, self.cfg.max_backoff_s, _rng))
        self.ledger.add("batch", name, batch_id=batch.id)
        self.status[name] = batch.model_dump()
        self.submitted.append(batch.id)

    def _find(self, file_id: str):
        """The provider's batch over `file_id`, or None (newest first, a few pages back)."""
        page = self.client.batches.list(limit=100)
        for _ in range(LIST_PAGES):
            for batch in page.data:
                if batch.input_file_id == file_id:
                    return batch
            if not page.has_next_page():
                break
            page = page.get_next_page()
        return None

    # -- poll and collect -------------------------------------------------------------------

    def poll(self) -> bool:
        """Retrieve every open batch (making the missing ones), collect those that ended; True
        when something changed."""
        import openai

        changed = False
        for name in self.ledger.open_names():
            batch_id = self.ledger.by_event("batch").get(name, {}).get("batch_id")
            if batch_id is None:  # (uploaded, then killed before the batch was on record)
                found = self._find(self.ledger.by_event("file")[name]["file_id"])
                if found is not None:
                    self.ledger.add("batch", name, batch_id=found.id)
                    self.status[name] = found.model_dump()
                else:
                    self._create(name)
                changed = True
                continue
            try:
                with _setup_errors():
                    batch = self.client.batches.retrieve(batch_id)
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
                log.warning("teacher: polling batch %s failed (%s); polled again later", batch_id, e)
                continue
            changed |= self.status.get(name, {}).get("status") != batch.status
            self.status[name] = batch.model_dump()
            if batch.status in DONE:
                self._collect(name, batch)
        return changed

    def _collect(self, name: str, batch) -> None:
        """Journal every answer and failure of an ended batch; put its retryable requests back in
        the pool. The journal is on disk before the ledger says done; a crash between the two
        collects it again (answers already stored are skipped)."""
        reqs = {r["custom_id"]: r for r in self._requests(name)}
        seen: set[str] = set()
        usage, rows = [0, 0], []
        write = rows.extend  # (one batch's rows at a time: at most batch_max_requests·n of them)
        for file_id in (batch.output_file_id, batch.error_file_id):
            for raw in self._download(file_id, name) if file_id else ():
                self._item(raw, reqs, seen, usage, write)
        for custom_id, req in reqs.items():
            if custom_id not in seen:  # no line, or one cut short before its custom_id
                self._missing(batch, req, usage, write)
        self._journal(name, [r for r in rows if r["error"] is not None or r["request_key"] not in self.stored_keys])
        self.ledger.add("done", name, status=batch.status, batch_id=batch.id, prompt_tokens=usage[0],
                        completion_tokens=usage[1])
        self.spent_cost += online.batch_cost(self.cfg, *usage)
        self.spent_tokens += sum(usage)
        self.totals["prompt_tokens"] += usage[0]
        self.totals["completion_tokens"] += usage[1]
        self.totals[f"batches_{batch.status}"] += 1
        artifacts.remove(self.ledger.dir / f"{name}.requests.jsonl")  # (journaled now)

    def _journal(self, name: str, rows: list[dict]) -> None:
        """Rows in the online journal format, on disk (fsynced) before the caller goes on."""
        path = self.folder / f"journal-batch-{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        artifacts.fsync_dir(self.folder)
        storage.push(path)

    def _download(self, file_id: str, name: str) -> Iterator[bytes]:
        """The lines of a provider file, streamed to disk first (output files can be large)."""
        path = self.ledger.dir / f"{name}.{file_id}.download"
        with _setup_errors(), self.client.files.with_streaming_response.content(file_id) as resp:
            resp.stream_to_file(path)
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        yield line
        finally:
            path.unlink(missing_ok=True)

    def _item(self, raw: bytes, reqs: dict, seen: set, usage: list, write) -> None:
        """One line of an output or error file."""
        try:
            item = json.loads(raw)
            custom_id = item["custom_id"]
            if not (item.get("response") or item.get("error")):
                raise ValueError("neither response nor error")
        except (ValueError, KeyError, TypeError):
            match = CUSTOM_ID.search(raw)
            custom_id = match.group(1).decode() if match else None
            if custom_id in reqs and custom_id not in seen:
                req = reqs[custom_id]
                seen.add(custom_id)
                self._billed_retry(req, usage, write, "an output line cut short")
            else:
                log.warning("teacher: an unreadable line of a batch file (%d bytes), no known custom_id", len(raw))
            return
        req = reqs.get(custom_id)
        if req is None or custom_id in seen:
            return
        seen.add(custom_id)
        response = item.get("response") or {}
        if item.get("error") or response.get("status_code") != 200:
            self.totals["rate_limited"] += response.get("status_code") == 429
            self._failed(req, _error_text(item), _retryable(item), write)
            return
        self._answered(req, response.get("body") or {}, usage, write)

    def _answered(self, req: dict, body: dict, usage: list, write) -> None:
        """An answer: each sample ok, final, or empty (asked again alone), as online."""
        u = body.get("usage") or {}
        pt, ct = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        usage[0] += pt
        usage[1] += ct
        samples = _choices(self.cfg.endpoint, body)
        done, again = [], []
        for i in range(len(req["samples"])):
            if i >= len(samples):  # (fewer choices than asked for)
                again.append(i)
                continue
            text, finish_reason, refusal = samples[i]
            outcome, why = online.sample_outcome(text, finish_reason, refusal)
            if outcome == "retry":
                again.append(i)
                continue
            done.append(_row(req, i, response=text, finish_reason=finish_reason,
                             error=None if outcome == "ok" else f"{online.FINAL}{why}"[:500]))
        if not done and (pt or ct):
            done = [_row(req, 0, error=f"{online.BILLED_ATTEMPT}0 of {len(req['samples'])} samples with content")]
        for i, (r, c) in enumerate(zip(done, online._split(ct, len(done)))):
            r.update(prompt_tokens=pt if i == 0 else 0, completion_tokens=c)
        write(done)
        if again:
            self._failed(_subset(req, again), f"{len(again)} of {len(req['samples'])} samples empty", True, write)

    def _billed_retry(self, req: dict, usage: list, write, why: str) -> None:
        """A request the provider may have run and billed, but whose answer cannot be read: counted
        at its worst case (as online timeouts are), then asked again."""
        worst = (req["est"], self.cfg.max_tokens * len(req["samples"]))
        usage[0] += worst[0]
        usage[1] += worst[1]
        write([_row(req, 0, prompt_tokens=worst[0], completion_tokens=worst[1],
                    error=f"{online.BILLED_ATTEMPT}{why} (counted at the worst case)")])
        self._failed(req, why, True, write)

    def _missing(self, batch, req: dict, usage: list, write) -> None:
        if batch.status == "failed":  # (validation failed: nothing ran)
            errors = [f"{e.code}: {e.message}" for e in (batch.errors.data if batch.errors else None) or []]
            self._failed(req, f"batch {batch.id} failed" + (f" ({errors[0]})" if errors else ""), True, write)
        elif batch.status == "cancelled":
            self._failed(req, f"batch {batch.id} cancelled", False, write)
        else:
            self._billed_retry(req, usage, write, f"no readable line in batch {batch.id}'s files")

    def _failed(self, req: dict, error: str, retry: bool, write) -> None:
        """Back to the pool, or stored with its error (asked on the next run) when it may not be
        retried or its retries are spent."""
        if retry and max(self.attempts[k] for k in req["keys"]) <= self.cfg.max_retries:
            self.pool.append(req)
            self.totals["retries"] += 1
            return
        tries = max(self.attempts[k] for k in req["keys"])
        write(_error_rows(req, f"after {tries} batch{'es' if tries != 1 else ''}: {error}"))

    # -- status -----------------------------------------------------------------------------

    def _running(self) -> tuple[list[dict], int, int]:
        """(the running batches, their requests done, their requests)."""
        open_names = set(self.ledger.open_names())
        running = [b for n, b in self.status.items() if n in open_names]
        counts = [b.get("request_counts") or {} for b in running]
        done = sum((c.get("completed") or 0) + (c.get("failed") or 0) for c in counts)
        return running, done, sum(c.get("total") or 0 for c in counts)

    def progress(self) -> dict:
        """The console's progress line (proxykd/console.py): the running batches' requests, the spend."""
        _, done, total = self._running()
        return {"key": "teacher", "done": done, "total": total, "unit": "requests", "cost": self.spent_cost}

    def line(self, next_poll_s: float) -> str:
        """The status line: the running batches by state, their progress, what waits, the spend."""
        running, done, total = self._running()
        states = ", ".join(f"{v} {k}" for k, v in sorted(Counter(b.get("status") for b in running).items()))
        ended = sum(v for k, v in self.totals.items() if k.startswith("batches_"))
        return (f"teacher (batch): batches running: {states or 'none'} | their requests {done:,}/{total:,} done | "
                f"{len(self.pool)} requests waiting | {len(self.submitted)} batches made this run, {ended} ended | "
                f"est. ${self.spent_cost:.4f} stored | next poll in {next_poll_s:.3g} s")

    def loop(self) -> None:
        delay, last_line = self.cfg.batch_poll_s, 0.0
        if self.reattached:  # where the batches of the last run stand, before anything new is sent
            self.poll()
        while True:
            if self.submit():
                delay = self.cfg.batch_poll_s
            if not self.ledger.open_names():
                break
            if time.time() - last_line >= self.cfg.progress_every_s:
                last_line = time.time()
                log.info(self.line(delay), extra={"progress": self.progress()})
            time.sleep(delay)
            # Back off while nothing moves (a batch takes minutes to hours); poll soon after a change.
            delay = self.cfg.batch_poll_s if self.poll() else min(delay * 1.5, self.cfg.batch_max_poll_s)
            if delay == self.cfg.batch_poll_s:
                last_line = 0.0


# ------------------------------------------------------------------------------- the stage


def run(cfg: TeacherConfig, prompts: pa.Table, prompts_content_hash: str, run_dir: str) -> dict:
    """The teacher stage in batch mode; the same folder, rows, manifest and skip rules as online."""
    import openai

    started = time.time()
    folder, h, api_key, done = online.begin(cfg, prompts_content_hash, run_dir)
    if done:
        return done

    keys = online.request_keys(cfg, prompts)  # n per prompt, prompt by prompt
    server = online._local_teacher(prompts) if cfg.base_url is None else nullcontext()
    with server, _quiet_http():
        client = openai.OpenAI(base_url=cfg.base_url or server.base_url,
                               api_key=api_key if cfg.base_url else "unused",
                               max_retries=cfg.max_retries, timeout=cfg.timeout_s)
        job = BatchRun(cfg, folder, client, online._stored(folder))
        try:
            in_flight = job.in_flight()
            todo, rejected, n_samples = online._todo(cfg, prompts, keys, job.stored_keys | in_flight)
            for r in rejected[:20]:
                log.warning("teacher: %s rejected before any call: %s", r["id"], r["error"])
            log.info("teacher (batch): %d prompts (%d samples) to ask, %d samples stored, %d in %d running "
                     "batches (re-attached), %d prompts rejected", todo.num_rows, n_samples, len(job.stored_keys),
                     len(in_flight), len(job.reattached), len(rejected))
            params = online.sampling_params(cfg)
            job.pool = [_request(cfg, params, r) for r in todo.to_pylist()]
            job.loop()
        finally:
            job.ledger.close()
            client.close()
    online.compact_journals(folder)
    log.info(job.line(0).split(" | next poll")[0])
    if job.stopped:
        log.warning("teacher: stopped early, %s; %d requests not asked (they are asked on the next run)",
                    job.stopped, len(job.pool))
    return online._finish(
        cfg, prompts, prompts_content_hash, h, started, folder, keys, rejected, todo.num_rows, job.totals, job.stopped,
        batches={"made": len(job.submitted), "reattached": len(job.reattached),
                 "ended": {k[len("batches_"):]: v for k, v in job.totals.items() if k.startswith("batches_")},
                 "ids": job.submitted[-100:]})


@contextmanager
def _setup_errors():
    """The API's refusals of the setup itself (bad key, unknown model or file, no quota) stop the
    stage, as online."""
    import openai

    try:
        yield
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
        raise online.TeacherSetupError(f"the teacher API refuses this setup ({e.status_code}): {e.message}") from None
    except openai.APIStatusError as e:
        if e.status_code == 402 or "insufficient_quota" in (e.code, e.type):
            raise online.TeacherSetupError(f"the teacher API says the quota is spent: {e.message}") from None
        raise


@contextmanager
def _quiet_http():
    """The HTTP client logs every request at INFO; on the driver's console (where online mode's
    actors never print) that would bury the status line."""
    loggers = [logging.getLogger(name) for name in ("httpx2", "httpx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_rng = random.Random()
