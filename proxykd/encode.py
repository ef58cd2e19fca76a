"""Tokenise stage inputs into the id columns every later stage reads (driver side, pyarrow)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from proxykd.tokenization import TooLong, encode_example

log = logging.getLogger("proxykd")

IDS = pa.list_(pa.int32())


def sample_id(prompt_id: str, sample_index: int) -> str:
    """The row id of one teacher sample: the prompt's id for sample 0, `<id>#<k>` for the others
    (teacher.n > 1), so every later stage stays keyed by a unique id."""
    return prompt_id if sample_index == 0 else f"{prompt_id}#{sample_index}"


def join_teacher(prompts: pa.Table, teacher: pa.Table, split: str, all_samples: bool = True) -> tuple[pa.Table, list[dict]]:
    """Rows of one split with a complete teacher response (id, messages, response), one per teacher
    sample (only the first, under the prompt's id, with `all_samples=False`), and the rows left out as {id, error}: no
    response, or one cut off at teacher.max_tokens (training on it with an eos appended would
    teach the student to stop mid-answer)."""
    rows = prompts.filter(pc.equal(prompts["split"], split)).select(["id", "messages"])
    if "sample_index" not in teacher.column_names:
        teacher = teacher.append_column("sample_index", pa.array([0] * teacher.num_rows, pa.int32()))
    # (pyarrow's join cannot carry list<struct> columns such as `messages`.)
    answers: dict[str, list[dict]] = {}
    for r in teacher.select(["id", "sample_index", "response", "finish_reason"]).to_pylist():
        answers.setdefault(r["id"], []).append(r)
    take, ids, texts, rejected = [], [], [], []
    for i, rid in enumerate(rows["id"].to_pylist()):
        samples = sorted(answers.get(rid, []), key=lambda r: r["sample_index"])
        if not samples:
            rejected.append({"id": rid, "error": "no teacher response"})
        for r in samples if all_samples else samples[:1]:
            sid = sample_id(rid, r["sample_index"]) if all_samples else rid
            if r["finish_reason"] == "length":
                rejected.append({"id": sid, "error": "teacher response cut off at teacher.max_tokens"})
                continue
            take.append(i)
            ids.append(sid)
            texts.append(r["response"])
    out = rows.take(pa.array(take, pa.int64())).set_column(0, "id", pa.array(ids, pa.string()))
    return out.append_column("response", pa.array(texts, pa.string())).sort_by("id"), rejected


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


def encode_split(tokenizer, prompts: pa.Table, teacher: pa.Table, split: str, max_length: int,
                 all_samples: bool = True) -> tuple[pa.Table, list[dict]]:
    """`join_teacher` then `encode_responses`: one split's rows ready for a stage, and every row
    left out with its id and why."""
    rows, rejected = join_teacher(prompts, teacher, split, all_samples)
    rows, too_long = encode_responses(tokenizer, rows, max_length)
    return rows, rejected + too_long
