"""Prompts: build them from reasoning-gym tasks or read them from a file, validate every row, and
assign each to a split from a hash of its `id` (deterministic, independent of row order)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from proxykd.config import DataConfig
from proxykd.scoring import registered_tasks, score_many

log = logging.getLogger("proxykd")

SPLITS = ("warmup", "proxy", "student", "dev", "eval")

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("reference", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("metadata", pa.string()),  # JSON: what a task's scorer needs besides the reference
    ]
)


def _unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def assign_split(row_id: str, cfg: DataConfig, question: str | None = None) -> str:
    """eval by `eval_fraction`, then dev by `dev_fraction` (a second, salted draw, so that adding a
    dev split only takes rows from the others and moves none between them), then warmup / proxy /
    student by their fractions; from a hash of the id (of the question text with `split_by: question`)."""
    key = question if cfg.split_by == "question" and question is not None else row_id
    u = _unit(key)
    if u < cfg.eval_fraction:
        return "eval"
    if cfg.dev_fraction and _unit("dev:" + key) < cfg.dev_fraction / (1 - cfg.eval_fraction):
        return "dev"
    v = (u - cfg.eval_fraction) / (1 - cfg.eval_fraction)
    if v < cfg.split.warmup:
        return "warmup"
    if v < cfg.split.warmup + cfg.split.proxy:
        return "proxy"
    return "student"


def _messages(question: str, system_prompt: Optional[str]) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


def reasoning_gym_rows(cfg: DataConfig) -> list[dict]:
    import reasoning_gym

    rows = []
    for task in cfg.tasks:
        dataset = reasoning_gym.create_dataset(task.name, size=task.size, seed=cfg.seed, **task.kwargs)
        for i, entry in enumerate(dataset):
            rows.append(
                {
                    "id": f"{task.name}-{cfg.seed}-{i}",
                    "messages": _messages(entry["question"], cfg.system_prompt),
                    "reference": str(entry["answer"]),
                    "task": task.name,
                    "metadata": json.dumps(entry.get("metadata", {}), default=str),
                }
            )
    return rows


def _read_file(path: Path) -> list[tuple[int, object]]:
    """(line or row number, raw row) pairs, so a bad row without an id can still be located."""
    if path.suffix == ".parquet":
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, {"_error": f"not valid JSON: {e}"}))
    return rows


def validate_row(raw: dict, system_prompt: Optional[str]) -> dict:
    """Normalise one input row or raise ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a row must be a JSON object, got {type(raw).__name__}")
    if "_error" in raw:
        raise ValueError(raw["_error"])
    row_id = raw.get("id")
    if not isinstance(row_id, str) or not row_id.strip():
        raise ValueError("`id` must be a non-empty string")
    messages = raw.get("messages")
    if messages is None and isinstance(raw.get("prompt"), str):
        messages = _messages(raw["prompt"], system_prompt)
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list (or give `prompt`)")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
            "system",
            "user",
            "assistant",
        ):
            raise ValueError(f"bad message {m!r}: need role in system/user/assistant and string content")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must have role 'user'")
    if not messages[-1]["content"].strip():
        raise ValueError("empty prompt")
    task = raw.get("task")
    # A task picks the scorer that will read this row's reference, metadata and the model's answer
    # (see proxykd.scoring): only reasoning-gym's own datasets name one.
    if task is not None and not (isinstance(task, str) and task in registered_tasks()):
        raise ValueError(f"unknown task {task!r}: `task` must name a reasoning-gym dataset "
                         "(leave it out to score by exact match)")
    reference = raw.get("reference")
    return {
        "id": row_id,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "reference": None if reference is None else str(reference),
        "task": task,
        "metadata": json.dumps(raw.get("metadata") or {}, default=str),
    }


def build_prompts(cfg: DataConfig) -> tuple[pa.Table, list[dict]]:
    """Return (prompts table, rejected rows as {id, error})."""
    if cfg.source == "reasoning_gym":
        raw_rows = list(enumerate(reasoning_gym_rows(cfg), 1))
    else:
        raw_rows = _read_file(Path(cfg.path))
    good, rejected, seen = [], [], set()
    for n, raw in raw_rows:
        try:
            row = validate_row(raw, cfg.system_prompt)
            if row["id"] in seen:
                raise ValueError("duplicate `id`")
        except ValueError as e:
            rid = raw.get("id") if isinstance(raw, dict) else None
            rid = rid if isinstance(rid, str) and rid.strip() else f"<line {n}>"
            rejected.append({"id": rid, "error": str(e)})
            log.warning("prompt %s rejected: %s", rid, e)
            continue
        seen.add(row["id"])
        row["split"] = assign_split(row["id"], cfg, json.dumps(row["messages"], sort_keys=True))
        good.append(row)
    return pa.Table.from_pylist(good, schema=PROMPT_SCHEMA), rejected


_ANSWER_RE = re.compile(r"answer is\s*(.+?)\s*\.?\s*(?=$|answer is)", re.IGNORECASE | re.DOTALL)


def teacher_style_response(reference: str) -> str:
    """How the local teacher phrases a reference answer."""
    return f"The answer is {reference}."


def extract_answer(text: str) -> str:
    """The final answer in a generation: what follows the last 'answer is', else the whole text."""
    matches = list(_ANSWER_RE.finditer(text))
    return matches[-1].group(1).strip() if matches else text.strip()


def score(task: Optional[str], answer: str, reference: Optional[str], metadata: str) -> float:
    """One answer's score (`scoring.score_many` of one item: reasoning-gym's scorer where the row
    names a task, run isolated; exact match otherwise; NaN without a reference; 0 when scoring
    fails). Callers with many answers use `score_many`, which scores them in one process."""
    return score_many([{"id": "-", "task": task, "answer": answer, "reference": reference,
                        "metadata": metadata}])[0].score
