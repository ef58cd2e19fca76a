"""Tokenise stage inputs into the id columns every later stage reads (driver side, pyarrow)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from proxykd.tokenization import TooLong, encode_example

log = logging.getLogger("proxykd")

IDS = pa.list_(pa.int32())


def join_teacher(prompts: pa.Table, teacher: pa.Table, split: str) -> pa.Table:
    """Rows of one split that have a teacher response: id, messages, response."""
    rows = prompts.filter(pc.equal(prompts["split"], split)).select(["id", "messages"])
    # (pyarrow's join cannot carry list<struct> columns such as `messages`.)
    answer = dict(zip(teacher["id"].to_pylist(), teacher["response"].to_pylist()))
    keep = [i for i, rid in enumerate(rows["id"].to_pylist()) if rid in answer]
    rows = rows.take(pa.array(keep, pa.int64()))
    return rows.append_column("response", pa.array([answer[r] for r in rows["id"].to_pylist()], pa.string())).sort_by("id")


def encode_responses(tokenizer, table: pa.Table, max_length: int) -> tuple[pa.Table, list[dict]]:
    """Add `input_ids` (int32) and `response_start`; rows over max_length are returned as
    rejected {id, error} instead of being dropped silently."""
    keep, ids, starts, rejected = [], [], [], []
    for i, row in enumerate(table.select(["id", "messages", "response"]).to_pylist()):
        try:
            input_ids, start = encode_example(tokenizer, row["messages"], row["response"], max_length)
        except TooLong as e:
            rejected.append({"id": row["id"], "error": f"too long: {e}"})
            log.warning("%s rejected: %s", row["id"], e)
            continue
        keep.append(i)
        ids.append(input_ids)
        starts.append(start)
    out = table.take(pa.array(keep, pa.int64()))
    return out.append_column("input_ids", pa.array(ids, IDS)).append_column(
        "response_start", pa.array(starts, pa.int32())
    ), rejected
