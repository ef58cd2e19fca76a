"""Tokenise stage inputs into the id columns every later stage reads (driver side, pyarrow)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from proxykd.tokenization import TooLong, encode_example

log = logging.getLogger("proxykd")

IDS = pa.list_(pa.int32())


def join_teacher(prompts: pa.Table, teacher: pa.Table, split: str) -> tuple[pa.Table, list[dict]]:
    """Rows of one split with a complete teacher response (id, messages, response), and the rows
    left out as {id, error}: no response, or one cut off at teacher.max_tokens (training on it
    with an eos appended would teach the student to stop mid-answer)."""
    rows = prompts.filter(pc.equal(prompts["split"], split)).select(["id", "messages"])
    # (pyarrow's join cannot carry list<struct> columns such as `messages`.)
    answer = {r["id"]: r for r in teacher.select(["id", "response", "finish_reason"]).to_pylist()}
    keep, rejected = [], []
    for i, rid in enumerate(rows["id"].to_pylist()):
        if rid not in answer:
            rejected.append({"id": rid, "error": "no teacher response"})
        elif answer[rid]["finish_reason"] == "length":
            rejected.append({"id": rid, "error": "teacher response cut off at teacher.max_tokens"})
        else:
            keep.append(i)
    rows = rows.take(pa.array(keep, pa.int64()))
    responses = pa.array([answer[r]["response"] for r in rows["id"].to_pylist()], pa.string())
    return rows.append_column("response", responses).sort_by("id"), rejected


def encode_responses(tokenizer, table: pa.Table, max_length: int) -> tuple[pa.Table, list[dict]]:
    """Add `input_ids` (int32) and `response_start`; rows over max_length, or that the chat
    template refuses, are returned as rejected {id, error} instead of being dropped silently."""
    keep, ids, starts, rejected = [], [], [], []
    for i, row in enumerate(table.select(["id", "messages", "response"]).to_pylist()):
        try:
            input_ids, start = encode_example(tokenizer, row["messages"], row["response"], max_length)
        except TooLong as e:
            rejected.append({"id": row["id"], "error": f"too long: {e}"})
            log.warning("%s rejected: %s", row["id"], e)
            continue
        except Exception as e:  # noqa: BLE001 - e.g. the chat template refuses these messages
            rejected.append({"id": row["id"], "error": f"cannot tokenise: {type(e).__name__}: {e}"})
            log.warning("%s rejected: %s", row["id"], e)
            continue
        keep.append(i)
        ids.append(input_ids)
        starts.append(start)
    out = table.take(pa.array(keep, pa.int64()))
    return out.append_column("input_ids", pa.array(ids, IDS)).append_column(
        "response_start", pa.array(starts, pa.int32())
    ), rejected


def encode_split(tokenizer, prompts: pa.Table, teacher: pa.Table, split: str, max_length: int) -> tuple[pa.Table, list[dict]]:
    """`join_teacher` then `encode_responses`: one split's rows ready for a stage, and every row
    left out with its id and why."""
    rows, rejected = join_teacher(prompts, teacher, split)
    rows, too_long = encode_responses(tokenizer, rows, max_length)
    return rows, rejected + too_long
