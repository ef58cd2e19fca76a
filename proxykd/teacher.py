"""Stage 1, teacher: ask the black-box teacher for a response to every prompt.

Ray Data actors each hold an async `openai` client and keep `teacher.concurrency` requests in
flight. Responses are written as Parquet shards as blocks finish, keyed by `id`; a rerun sends no
request whose response is already stored, and retries the ones that failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from proxykd import artifacts
from proxykd.config import TeacherConfig, fingerprint
from proxykd.data import MESSAGES_TYPE, teacher_style_response

log = logging.getLogger("proxykd")

TEACHER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("request_key", pa.string()),
        ("error", pa.string()),
    ]
)


def sampling_params(cfg: TeacherConfig) -> dict:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}


def request_key(model: str, messages: list[dict], params: dict, sample_index: int = 0) -> str:
    """Hash of the canonical request: the same request always maps to the same stored response."""
    canon = {"model": model, "messages": messages, "params": params, "sample_index": sample_index}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


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


class TeacherCaller:
    """Ray Data actor: one async client, bounded concurrency, failures become rows with `error`."""

    def __init__(self, base_url: str, cfg: dict, api_key: Optional[SecretRef]):
        import openai

        self.cfg = TeacherConfig(**cfg)
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key.get() if api_key else "unused",
            max_retries=self.cfg.max_retries,
            timeout=self.cfg.timeout_s,
        )
        self.params = sampling_params(self.cfg)
        self.loop = asyncio.new_event_loop()

    async def _call(self, row: dict, sem: asyncio.Semaphore) -> dict:
        out = {
            "id": row["id"],
            "messages": row["messages"],
            "model": self.cfg.model,
            "request_key": request_key(self.cfg.model, row["messages"], self.params),
            "response": None,
            "finish_reason": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "error": None,
        }
        async with sem:
            try:
                # openai's client retries 429 (honouring Retry-After), 5xx, timeouts and
                # connection errors with exponential backoff, up to max_retries.
                resp = await self.client.chat.completions.create(
                    model=self.cfg.model, messages=row["messages"], **self.params
                )
                choice = resp.choices[0]
                content = choice.message.content
                if not content:
                    raise ValueError("empty response content")
                out.update(
                    response=content,
                    finish_reason=choice.finish_reason,
                    prompt_tokens=resp.usage.prompt_tokens if resp.usage else None,
                    completion_tokens=resp.usage.completion_tokens if resp.usage else None,
                )
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none kills the batch
                out["error"] = f"{type(e).__name__}: {e}"[:500]
        return out

    async def _run(self, rows: list[dict]) -> list[dict]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        return await asyncio.gather(*(self._call(r, sem) for r in rows))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["id", "messages"]).to_pylist()
        return pa.Table.from_pylist(self.loop.run_until_complete(self._run(rows)), schema=TEACHER_SCHEMA)


def config_hash(cfg: TeacherConfig, prompts_content_hash: str) -> str:
    # Operational knobs (concurrency, actors, retries, timeout) do not change what is bought.
    return fingerprint(prompts_content_hash, cfg.base_url, cfg.model, sampling_params(cfg))


def request_keys(cfg: TeacherConfig, prompts: pa.Table) -> list[str]:
    params = sampling_params(cfg)
    return [request_key(cfg.model, m, params) for m in prompts["messages"].to_pylist()]


def responses(folder: Path, keys: Optional[list[str]] = None) -> pa.Table:
    """Successful teacher responses, one per id; with `keys`, only those answering one of these
    requests (a stored response to a request no longer made is kept on disk but not used)."""
    table = artifacts.read_shards(folder)
    if table.num_rows == 0:
        return TEACHER_SCHEMA.empty_table()
    ok = pc.is_null(table["error"])
    if keys is not None:
        ok = pc.and_(ok, pc.is_in(table["request_key"], pa.array(keys, pa.string())))
    table = table.filter(ok)
    seen, keep = set(), []
    for i, rid in enumerate(table["id"].to_pylist()):
        if rid not in seen:
            seen.add(rid)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


def _local_teacher(prompts: pa.Table):
    """The stand-in teacher: answers each prompt from its reference."""
    from proxykd.local_teacher import LocalTeacher, lookup_key

    table = {}
    for row in prompts.select(["messages", "reference"]).to_pylist():
        if row["reference"] is not None:
            table[lookup_key(row["messages"])] = teacher_style_response(row["reference"])
    return LocalTeacher(table)


class MissingAPIKey(RuntimeError):
    pass


def run(cfg: TeacherConfig, prompts: pa.Table, prompts_content_hash: str, run_dir: str) -> dict:
    import ray

    folder = artifacts.stage_dir(run_dir, "teacher")
    h = config_hash(cfg, prompts_content_hash)
    if artifacts.is_done(folder, h):
        manifest = artifacts.read_manifest(folder)
        if not manifest["rows"]["failed"]:
            log.info("teacher: done already (%s), skipped", folder)
            return manifest
        log.info("teacher: retrying the %d requests that failed last time", manifest["rows"]["failed"])
    api_key = os.environ.get(cfg.api_key_env)
    if cfg.base_url is not None and not api_key:
        raise MissingAPIKey(f"teacher.base_url is {cfg.base_url} but the environment variable "
                            f"{cfg.api_key_env} (teacher.api_key_env) is not set")
    started = time.time()
    artifacts.begin_stage(folder, h, keep_stale=True)

    keys = request_keys(cfg, prompts)
    answered = set(responses(folder, keys)["request_key"].to_pylist())
    todo = prompts.filter(pc.invert(pc.is_in(pa.array(keys, pa.string()), pa.array(sorted(answered), pa.string()))))
    log.info("teacher: %d prompts to ask, %d answered already", todo.num_rows, prompts.num_rows - todo.num_rows)

    server = _local_teacher(prompts) if cfg.base_url is None else nullcontext()
    with server:
        base_url = cfg.base_url or server.base_url
        if todo.num_rows:
            batch_size = max(cfg.concurrency * 4, 16)
            artifacts.to_dataset(todo.select(["id", "messages"]), batch_size).map_batches(
                TeacherCaller,
                fn_constructor_kwargs={"base_url": base_url, "cfg": cfg.model_dump(),
                                       "api_key": SecretRef(api_key) if api_key and cfg.base_url else None},
                batch_format="pyarrow",
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_cpus=0.5,
            ).write_parquet(str(folder))

    ok = responses(folder, keys)
    failed_ids = sorted(set(prompts["id"].to_pylist()) - set(ok["id"].to_pylist()))
    for rid in failed_ids[:20]:
        log.warning("teacher: %s failed (will be retried on the next run)", rid)
    return artifacts.write_manifest(
        folder,
        "teacher",
        h,
        started,
        inputs={"prompts": prompts_content_hash, "base_url": cfg.base_url or "local-teacher", "model": cfg.model},
        rows={"asked": todo.num_rows, "ok": ok.num_rows, "failed": len(failed_ids)},
        failed_ids=failed_ids[:1000],
        # What downstream stages hash: changes whenever a retry adds responses.
        responses_hash=fingerprint(sorted(ok["request_key"].to_pylist())),
        tokens={
            "prompt": int(pc.sum(ok["prompt_tokens"]).as_py() or 0),
            "completion": int(pc.sum(ok["completion_tokens"]).as_py() or 0),
        },
    )
