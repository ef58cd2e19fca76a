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
                    # plain JSON values (reasoning-gym's may hold other types), dumped by validate_row
                    "metadata": json.loads(json.dumps(entry.get("metadata", {}), default=str)),
                }
            )
    return rows


def _read_file(path: Path) -> list[tuple[str, object]]:
    """(where: "line n" or "row n", raw row) pairs, so a bad row without an id can still be located.
    A line that is not UTF-8 or not JSON, or a Parquet row with invalid UTF-8, becomes a row with
    `_error`: rejected alone, not the file."""
    if path.suffix == ".parquet":
        return [(f"row {n}", raw) for n, raw in enumerate(_parquet_rows(pq.read_table(path)), 1)]
    rows = []
    with path.open("rb") as f:  # bytes: one line's bad encoding must not stop the others
        for n, line in enumerate(f, 1):
            if n == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            if not line.strip():
                continue
            try:
                rows.append((f"line {n}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                rows.append((f"line {n}", {"_error": f"not valid UTF-8: {e}"}))
            except json.JSONDecodeError as e:
                rows.append((f"line {n}", {"_error": f"not valid JSON: {e}"}))
    return rows


def _parquet_rows(table: pa.Table) -> list:
    """Python rows of `table`. Arrow does not check a Parquet file's strings, so a row with invalid
    UTF-8 fails its conversion: the table at once, then row by row when that fails."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    rows = []
    for i in range(table.num_rows):
        try:
            rows.append(table.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as e:
            rows.append({"_error": f"not valid UTF-8: {e}"})
    return rows


def _not_utf8(value, where: str) -> Optional[str]:
    """Where `value` holds a string UTF-8 cannot encode (a lone surrogate, as JSON's "\\ud800"
    escape gives: Arrow refuses it later), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where} holds {value[e.start:e.end]!r}, a lone surrogate that UTF-8 cannot encode"
    elif isinstance(value, dict):
        for k, v in value.items():
            if bad := _not_utf8(k, f"a key of {where}") or _not_utf8(v, f"{where}.{k}"):
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if bad := _not_utf8(v, f"{where}[{i}]"):
                return bad
    return None


def _metadata_json(metadata) -> str:
    """A row's metadata as JSON text. It must be an object (what task scorers read), or JSON text of
    one, that round-trips through JSON unchanged: no NaN, no non-string keys, no other types."""
    if metadata is None:
        return "{}"
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as e:
            raise ValueError(f"`metadata` is text but not JSON: {e}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"`metadata` must be a JSON object, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`metadata` is not plain JSON: {e}") from None
    if json.loads(text) != metadata:
        raise ValueError("`metadata` changes through JSON (non-string keys or tuples?)")
    return text


def validate_row(raw: dict, system_prompt: Optional[str]) -> dict:
    """Normalise one input row or raise ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a row must be a JSON object, got {type(raw).__name__}")
    if "_error" in raw:
        raise ValueError(raw["_error"])
    for field in ("id", "messages", "prompt", "reference", "task", "metadata"):
        if bad := _not_utf8(raw.get(field), f"`{field}`"):
            raise ValueError(bad)
    row_id = raw.get("id")
    if not isinstance(row_id, str) or not row_id.strip():
        raise ValueError("`id` must be a non-empty string")
    if "#" in row_id:  # encode.sample_id: `<id>#<k>` names the teacher's k-th answer to a prompt
        raise ValueError(f"`id` {row_id!r} contains '#', which separates a prompt's id from its sample number")
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
        "metadata": _metadata_json(raw.get("metadata")),
    }


def build_prompts(cfg: DataConfig) -> tuple[pa.Table, list[dict]]:
    """Return (prompts table, rejected rows as {id, error}). Every bad row is rejected alone, under
    its id (`<line n>` / `<row n>` when it has no usable one), with where it is in its error."""
    if cfg.source == "reasoning_gym":
        raw_rows = [(f"row {n}", raw) for n, raw in enumerate(reasoning_gym_rows(cfg), 1)]
    else:
        raw_rows = _read_file(Path(cfg.path))
    good, rejected, seen = [], [], {}
    for where, raw in raw_rows:
        try:
            row = validate_row(raw, cfg.system_prompt)
            if row["id"] in seen:
                raise ValueError(f"duplicate `id` (first on {seen[row['id']]})")
        except ValueError as e:
            rid = _reported_id(raw) or f"<{where}>"
            rejected.append({"id": rid, "error": f"{where}: {e}"})
            log.warning("prompt %s rejected: %s: %s", rid, where, e)
            continue
        seen[row["id"]] = where
        row["split"] = assign_split(row["id"], cfg, json.dumps(row["messages"], sort_keys=True))
        good.append(row)
    return pa.Table.from_pylist(good, schema=PROMPT_SCHEMA), rejected


def _reported_id(raw) -> Optional[str]:
    """The id a rejected row is reported under, if it has one the rejected file can hold."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and rid.strip() and not _not_utf8(rid, "") else None


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
