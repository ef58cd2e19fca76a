"""Stage 3, logits: soft labels from the aligned proxy.

Pass 1: vLLM actors in Ray Data run a teacher-forced pass over (prompt + teacher response) of the
student split and keep, for each response position, the proxy's top-k token ids (int32) and
log-probs (float16), plus `ll`, the proxy's mean log-likelihood of the teacher response. Shards are
written as blocks finish; a rerun skips ids already stored.

Pass 2: μ and σ of `ll` over the whole split (read as one column), then every shard gets
`weight = sigmoid((ll − μ)/σ)`, rewritten one shard at a time (the split may not fit in memory).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import artifacts
from proxykd.config import RunConfig, fingerprint
from proxykd.losses import sigmoid_weights
from proxykd.encode import encode_split
from proxykd.models import load_tokenizer, model_max_length
from proxykd.vllm_actors import Scorer, engine_kwargs, map_kwargs

log = logging.getLogger("proxykd")


def add_weights(folder) -> tuple[float, float]:
    """Pass 2: returns (μ, σ) and rewrites each shard with its `weight` column."""
    files = artifacts.shard_files(folder)
    ll = np.concatenate([pq.read_table(f, columns=["ll"])["ll"].to_numpy() for f in files])
    mean, std = float(ll.mean()), float(ll.std())
    for f in files:
        table = pq.read_table(f)
        if "weight" in table.column_names:
            table = table.drop_columns(["weight"])
        w = sigmoid_weights(torch.from_numpy(table["ll"].to_numpy()), mean, std).numpy()
        artifacts.write_table_atomic(table.append_column("weight", pa.array(w, pa.float64())), f)
    return mean, std


def config_hash(cfg: RunConfig, align_hash: str) -> str:
    return fingerprint(align_hash, cfg.logits, cfg.seed)


def run(cfg: RunConfig, prompts: pa.Table, teacher: pa.Table, proxy_path: str, align_hash: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "logits")
    h = config_hash(cfg, align_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    tokenizer = load_tokenizer(proxy_path)
    max_length = min(cfg.logits.max_length, model_max_length(proxy_path) - 1)
    rows, rejected = encode_split(tokenizer, prompts, teacher, "student", max_length)
    have = artifacts.done_ids(folder)
    todo = rows.filter(pc.invert(pc.is_in(rows["id"], pa.array(sorted(have), pa.string()))))
    log.info("logits: %d rows to score, %d stored already, %d rejected", todo.num_rows, len(have), len(rejected))
    if todo.num_rows:
        ds = artifacts.to_dataset(todo.select(["id", "input_ids", "response_start"]), cfg.logits.batch_size).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "engine": engine_kwargs(proxy_path, max_length + 1, cfg.seed, cfg.resources, cfg.proxy.dtype,
                                        max_logprobs=max(20, cfg.logits.top_k)),
                "top_k": cfg.logits.top_k,
                "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
            },
            **map_kwargs(cfg.resources, batch_size=cfg.logits.batch_size),
        )
        ds.write_parquet(str(folder))
    if not artifacts.shard_files(folder):
        raise RuntimeError("logits: no rows to score (is the student split empty?)")
    mean, std = add_weights(folder)
    n = sum(pq.read_metadata(f).num_rows for f in artifacts.shard_files(folder))
    return artifacts.write_manifest(
        folder, "logits", h, started,
        inputs={"align": align_hash, "proxy": proxy_path},
        rows={"scored": n, "new": todo.num_rows},
        **artifacts.write_rejected(folder, rejected),
        top_k=cfg.logits.top_k,
        ll_mean=mean, ll_std=std if not math.isnan(std) else None,
    )
