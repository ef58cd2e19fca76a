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


class TeacherCaller:
    """Ray Data actor: one async client, bounded concurrency, failures become rows with `error`."""

    def __init__(self, base_url: str, cfg: dict):
        import openai

        self.cfg = TeacherConfig(**cfg)
        # The key is read here, inside the actor, from the environment: it never travels in
        # task arguments, configs or artifacts.
        api_key = os.environ.get(self.cfg.api_key_env) or "none"
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s
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


def config_hash(cfg: TeacherConfig, prompts_hash: str) -> str:
    # Operational knobs (concurrency, actors, retries, timeout) do not change what is bought.
    return fingerprint(prompts_hash, cfg.base_url, cfg.model, sampling_params(cfg))


def responses(folder: Path) -> pa.Table:
    """Successful teacher responses, one per id."""
    table = artifacts.read_shards(folder)
    if table.num_rows == 0:
        return table
    table = table.filter(pc.is_null(table["error"]))
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


def run(cfg: TeacherConfig, prompts: pa.Table, prompts_hash: str, run_dir: str) -> dict:
    import ray

    folder = artifacts.stage_dir(run_dir, "teacher")
    h = config_hash(cfg, prompts_hash)
    if artifacts.is_done(folder, h):
        manifest = artifacts.read_manifest(folder)
        if not manifest["rows"]["failed"]:
            log.info("teacher: done already (%s), skipped", folder)
            return manifest
        log.info("teacher: retrying the %d requests that failed last time", manifest["rows"]["failed"])
    started = time.time()
    artifacts.begin_stage(folder, h)

    # The eval split is asked too: the report compares students with the teacher's own answers.
    todo = prompts
    have = artifacts.done_ids(folder, ok_column="error")
    todo = todo.filter(pc.invert(pc.is_in(todo["id"], pa.array(sorted(have), pa.string()))))
    log.info("teacher: %d prompts to ask, %d answered already", todo.num_rows, len(have))

    server = _local_teacher(prompts) if cfg.base_url is None else nullcontext()
    with server:
        base_url = cfg.base_url or server.base_url
        if todo.num_rows:
            ds = ray.data.from_arrow(todo.select(["id", "messages"])).map_batches(
                TeacherCaller,
                fn_constructor_kwargs={"base_url": base_url, "cfg": cfg.model_dump()},
                batch_format="pyarrow",
                batch_size=max(cfg.concurrency * 4, 16),
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_cpus=0.5,
                # The key travels to the actors in their environment only (Ray's runtime_env),
                # never as an argument, a config value or a column.
                runtime_env={"env_vars": {cfg.api_key_env: os.environ[cfg.api_key_env]}}
                if cfg.api_key_env in os.environ else None,
            )
            ds.write_parquet(str(folder))

    all_rows = artifacts.read_shards(folder)
    ok = responses(folder)
    failed_ids = sorted(set(all_rows["id"].to_pylist()) - set(ok["id"].to_pylist()))
    for rid in failed_ids[:20]:
        log.warning("teacher: %s failed (will be retried on the next run)", rid)
    return artifacts.write_manifest(
        folder,
        "teacher",
        h,
        started,
        inputs={"prompts": prompts_hash, "base_url": cfg.base_url or "local-teacher", "model": cfg.model},
        rows={"asked": todo.num_rows, "ok": ok.num_rows, "failed": len(failed_ids)},
        failed_ids=failed_ids[:1000],
        tokens={
            "prompt": int(pc.sum(ok["prompt_tokens"]).as_py() or 0),
            "completion": int(pc.sum(ok["completion_tokens"]).as_py() or 0),
        },
    )
