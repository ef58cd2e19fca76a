"""Stage 3, logits: soft labels from the aligned proxy.

Pass 1: vLLM actors in Ray Data run a teacher-forced pass over (prompt + teacher response) of the
student split and keep, for each response position, the proxy's top-k token ids and log-probs, plus
`ll`, the proxy's mean log-likelihood of the teacher response. Token ids (`input_ids`, `topk_ids`)
are stored in the narrowest integer type the vocabulary allows (uint16 up to 65,536 tokens),
log-probs as `logits.logprob_dtype`. Shards are written as blocks finish; a rerun skips ids already
stored. Rows over `logits.max_length` are rejected or have their response cut (`logits.overlong`).

Pass 2 streams the shards twice, one record batch at a time (the split may not fit in memory):
μ and σ of `ll` over the whole split, then every shard is rewritten atomically with
`weight = sigmoid((ll − μ)/σ)`; rows vLLM refused move to `rejected.parquet`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from proxykd import artifacts, console, storage
from proxykd.config import RunConfig, fingerprint
from proxykd.encode import encode_split
from proxykd.losses import sigmoid_weights
from proxykd.models import load_tokenizer, model_max_length
from proxykd.vllm_actors import Scorer, engine_kwargs, map_kwargs, token_id_type

log = logging.getLogger("proxykd")

# How the shards are written (Ray Data in pass 1, pass 2's rewrite). Log-probs are high-entropy
# floats: byte-stream-split puts their exponent bytes side by side for zstd, and dictionaries only
# cost space (on SmolLM2-135M's log-probs of real text: float16 3.8 -> 3.3 bytes per entry).
PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": False,
    "use_byte_stream_split": ["topk_logprobs.list.element.list.element"],
}


def limit_length(rows: pa.Table, max_length: int, overlong: str) -> tuple[pa.Table, list[dict], list[dict]]:
    """Rows with more than `max_length` tokens are rejected (`overlong="reject"`) or keep their
    whole prompt and the first `max_length - response_start` response tokens ("truncate"); a
    prompt that leaves no room for one response token is always rejected. Returns (rows, rejected,
    truncated), the last two as [{id, error}]."""
    keep, ids, rejected, truncated = [], [], [], []
    for i, (rid, row, start) in enumerate(zip(rows["id"].to_pylist(), rows["input_ids"].to_pylist(),
                                              rows["response_start"].to_pylist())):
        n = len(row)
        if n <= max_length:
            keep.append(i)
            ids.append(row)
        elif overlong == "truncate" and start < max_length:
            keep.append(i)
            ids.append(row[:max_length])
            truncated.append({"id": rid, "error": f"response cut: {n} tokens > max_length {max_length}"})
        else:
            why = f"prompt alone is {start} tokens" if start >= max_length else "overlong: reject"
            rejected.append({"id": rid, "error": f"too long: {n} tokens > max_length {max_length} ({why})"})
    out = rows.take(pa.array(keep, pa.int64()))
    i = out.schema.get_field_index("input_ids")
    out = out.set_column(i, "input_ids", pa.array(ids, rows.schema.field("input_ids").type))
    for r in rejected + truncated:
        log.warning("logits: %s %s", r["id"], r["error"])
    return out, rejected, truncated


# ---------------------------------------------------------------- pass 2 (streaming) ----

def moments(values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of one chunk."""
    n = len(values)
    if n == 0:
        return 0, 0.0, 0.0
    mean = float(values.mean())
    return n, mean, float(((values - mean) ** 2).sum())


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s pairwise update: the moments of two chunks together (stable, one pass)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta * delta * na * nb / n


def ll_mean_std(files: list[Path]) -> tuple[int, float, float]:
    """(rows, μ, σ) of `ll` over every row vLLM scored (population σ), one record batch at a time."""
    acc = (0, 0.0, 0.0)
    for f in files:
        pf = pq.ParquetFile(f)
        columns = ["ll", "error"] if "error" in pf.schema_arrow.names else ["ll"]
        for batch in pf.iter_batches(columns=columns):
            ok = pc.is_null(batch["error"]) if "error" in columns else pa.array([True] * batch.num_rows)
            acc = merge_moments(acc, moments(batch["ll"].filter(ok).to_numpy(zero_copy_only=False)))
    n, mean, m2 = acc
    return n, mean, math.sqrt(m2 / n) if n else math.nan


def rewrite_with_weights(path: Path, mean: float, std: float) -> list[dict]:
    """Rewrite one shard with its `weight` column (atomically: temp file, then rename), moving rows
    vLLM refused out; returns those as [{id, error}]. The shard is streamed batch by batch."""
    pf = pq.ParquetFile(path)
    failed, writer = [], None
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        for batch in pf.iter_batches():
            table = pa.Table.from_batches([batch])
            if "error" in table.column_names:
                bad = pc.is_valid(table["error"])
                failed += table.filter(bad).select(["id", "error"]).to_pylist()
                table = table.filter(pc.invert(bad)).drop_columns(["error"])
            if "weight" in table.column_names:
                table = table.drop_columns(["weight"])
            ll = torch.tensor(table["ll"].to_numpy(zero_copy_only=False))
            table = table.append_column("weight", pa.array(sigmoid_weights(ll, mean, std).numpy(), pa.float64()))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, **PARQUET_OPTIONS)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is None or pq.read_metadata(tmp).num_rows == 0:  # nothing scored in this shard
        tmp.unlink(missing_ok=True)
        artifacts.remove(path)
    else:
        os.replace(tmp, path)
        storage.push(path)
    return failed


def add_weights(folder: Path) -> tuple[float, float, list[dict]]:
    """Pass 2: returns (μ, σ, rows vLLM refused) and gives every shard its `weight` column."""
    files = artifacts.shard_files(folder)
    n, mean, std = ll_mean_std(files)
    if n == 0:
        raise RuntimeError("logits: vLLM scored no row (see the errors in the log)")
    failed = []
    for f in files:
        failed += rewrite_with_weights(f, mean, std)
    for r in failed:
        log.warning("logits: %s rejected: %s", r["id"], r["error"])
    return mean, std, failed


# ---------------------------------------------------------------- the stage ----

def vocab_size(path: str, tokenizer) -> int:
    """Largest id + 1 the stored columns can hold: the model's logits width and the tokenizer's."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(storage.fetch(path))
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return max(int(text_cfg.vocab_size), len(tokenizer))


def config_hash(cfg: RunConfig, align_hash: str) -> str:
    return fingerprint(align_hash, cfg.logits, cfg.seed)


def rows_written(folder: Path):
    """A function counting the rows of the shards in `folder` so far, for the progress line: read
    only (a shard still being written is skipped, never quarantined), each shard's footer read
    once. A run folder in object storage is counted in the store, where the writers put them."""
    seen: dict[str, int] = {}
    uri = storage.remote_uri(folder)

    def shards() -> dict[str, str]:
        if uri is None:
            return {p.name: str(p) for p in Path(folder).glob("*.parquet")}
        from pyarrow import fs as pafs

        fs, key = storage.filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
        return {i.base_name: f"{uri}/{i.base_name}" for i in infos if i.base_name.endswith(".parquet")}

    def count() -> int:
        for name, where in shards().items():
            if name not in seen and name != artifacts.REJECTED_FILE and not name.startswith("."):
                try:
                    seen[name] = pq.read_metadata(storage.open_input(where)).num_rows
                except Exception:  # noqa: BLE001 - not complete yet
                    pass
        return sum(seen.values())

    return count


def run(cfg: RunConfig, prompts: pa.Table, teacher: pa.Table, proxy_path: str, align_hash: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "logits")
    h = config_hash(cfg, align_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    tokenizer = load_tokenizer(proxy_path)
    # One position is kept free: vLLM scores a full-length sequence by generating one token after it.
    max_length = min(cfg.logits.max_length, model_max_length(proxy_path) - 1)
    rows, rejected = encode_split(tokenizer, prompts, teacher, "student", math.inf)
    rows, too_long, truncated = limit_length(rows, max_length, cfg.logits.overlong)
    rejected += too_long
    id_type = token_id_type(vocab_size(proxy_path, tokenizer))
    rows = rows.set_column(rows.schema.get_field_index("input_ids"), "input_ids",
                           pc.cast(rows["input_ids"], pa.list_(pa.type_for_alias(id_type))))
    have = artifacts.done_ids(folder)
    todo = rows.filter(pc.invert(pc.is_in(rows["id"], pa.array(sorted(have), pa.string()))))
    log.info("logits: %d rows to score, %d stored already, %d rejected, %d truncated",
             todo.num_rows, len(have), len(rejected), len(truncated))
    if todo.num_rows:
        ds = artifacts.to_dataset(todo.select(["id", "input_ids", "response_start"]), cfg.logits.batch_size).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "engine": engine_kwargs(proxy_path, max_length + 1, cfg.seed, cfg.resources, cfg.proxy.dtype,
                                        max_logprobs=max(20, cfg.logits.top_k)),
                "top_k": cfg.logits.top_k,
                "id_type": id_type,
                "logprob_dtype": cfg.logits.logprob_dtype,
                "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
            },
            **map_kwargs(cfg.resources, batch_size=cfg.logits.batch_size),
        )
        with console.track("logits", len(have) + todo.num_rows, "rows", rows_written(folder)):
            # (a run folder in object storage: each block straight into the store, one object
            # apiece, from whichever node scored it; then its mirror here)
            ds.write_parquet(storage.location(folder), **PARQUET_OPTIONS)
        storage.pull(folder)
    if not artifacts.shard_files(folder):
        raise RuntimeError("logits: no rows to score (is the student split empty?)")
    mean, std, failed = add_weights(folder)
    rejected += failed
    n = sum(pq.read_metadata(f).num_rows for f in artifacts.shard_files(folder))
    return artifacts.write_manifest(
        folder, "logits", h, started,
        inputs={"align": align_hash, "proxy": proxy_path},
        rows={"scored": n, "new": todo.num_rows},
        **artifacts.write_rejected(folder, rejected),
        truncated_count=len(truncated), truncated_first=truncated[:20],
        top_k=cfg.logits.top_k, token_id_type=id_type, logprob_dtype=cfg.logits.logprob_dtype,
        ll_mean=mean, ll_std=std if not math.isnan(std) else None,
    )
