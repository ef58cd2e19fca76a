"""vLLM engines as Ray Data actors (`map_batches(..., compute=ActorPoolStrategy(...))`).

- `VLLMEngine` holds one engine with `generate` (sampling) and `score` (teacher-forced top-k);
  the alignment round sampler and the evaluator build on it.
- `Scorer` runs a teacher-forced pass over (prompt + response) with `prompt_logprobs` and returns
  the top-k token ids/log-probs at every response position, plus the sum and mean log-likelihood of
  the response (the logits stage).

Batches are pyarrow tables; token ids travel as int32 lists.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa

from proxykd.config import ResourcesConfig


def engine_kwargs(model_path: str, max_model_len: int, seed: int, res: ResourcesConfig, dtype: str = "auto",
                  max_logprobs: int = 20) -> dict:
    kwargs = {
        "model": model_path,
        "tokenizer": model_path,
        # vLLM on CPU would run a float32 checkpoint in bfloat16; soft labels want the stored dtype.
        "dtype": dtype,
        "max_model_len": max_model_len,
        "seed": seed,
        # Prefix caching drops prompt log-probs of cached positions: always off here.
        "enable_prefix_caching": False,
        "max_logprobs": max_logprobs,  # vLLM refuses top-k above this (default 20)
    }
    if res.vllm_gpus_per_actor > 0:
        kwargs["gpu_memory_utilization"] = res.vllm_gpu_memory_utilization
    if res.vllm_gpus_per_actor >= 2:  # one engine over all of the actor's GPUs
        kwargs["tensor_parallel_size"] = int(res.vllm_gpus_per_actor)
    return kwargs


def map_kwargs(res: ResourcesConfig, batch_size: int) -> dict:
    """Ray Data placement for a pool of vLLM actors."""
    import ray

    return {
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=res.vllm_actors),
        "num_cpus": res.vllm_cpus_per_actor,
        "num_gpus": res.vllm_gpus_per_actor,
    }


class VLLMEngine:
    """One engine; `sampling` (SamplingParams keywords) sets `self.params` for `generate`."""

    def __init__(self, engine: dict, kv_cache_gb: int = 1, sampling: dict | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        from vllm import LLM, SamplingParams

        self.llm = LLM(**engine)
        self.params = SamplingParams(**sampling) if sampling is not None else None

    def generate(self, prompt_ids: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def score(self, input_ids: list[list[int]], starts: list[int], k: int) -> list[tuple]:
        """Teacher-forced pass: `topk_from_prompt_logprobs` for every sequence."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.generate(input_ids, params)
        return [topk_from_prompt_logprobs(o.prompt_logprobs, ids, s, k) for o, ids, s in zip(outs, input_ids, starts)]


def topk_from_prompt_logprobs(
    prompt_logprobs, input_ids: list[int], response_start: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From vLLM's per-position `{token_id: Logprob}` dicts (entry t = distribution of token t
    given tokens < t; entry 0 is None), keep response positions t >= response_start and return
    (topk_ids [n, k] int32, topk_logprobs [n, k] float32, token_logprobs [n] float32) where
    token_logprobs[i] is the log-prob of the actual token input_ids[response_start + i]."""
    n = len(input_ids) - response_start
    ids = np.zeros((n, k), np.int32)
    lps = np.full((n, k), -math.inf, np.float32)
    actual = np.zeros(n, np.float32)
    for i in range(n):
        t = response_start + i
        pos = prompt_logprobs[t]
        # vLLM returns the k best plus the actual token when it falls outside them.
        best = sorted(((lp.rank, tid, lp.logprob) for tid, lp in pos.items() if lp.rank is not None and lp.rank <= k))[:k]
        for j, (_, tid, logprob) in enumerate(best):
            ids[i, j] = tid
            lps[i, j] = logprob
        actual[i] = pos[input_ids[t]].logprob
    return ids, lps, actual


def logprob_columns(results: list[tuple]) -> dict[str, pa.Array]:
    """`ll` (mean response log-likelihood) and `ll_sum` columns from `score` results."""
    return {
        "ll": pa.array([float(r[2].mean()) if len(r[2]) else 0.0 for r in results], pa.float64()),
        "ll_sum": pa.array([float(r[2].sum()) for r in results], pa.float64()),
    }


def topk_columns(results: list[tuple]) -> dict[str, pa.Array]:
    """`topk_ids` as int32 and `topk_logprobs` as float16 lists, one inner list per position."""
    return {
        "topk_ids": pa.array([r[0].tolist() for r in results], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array(
            [r[1].astype(np.float16).tolist() for r in results], pa.list_(pa.list_(pa.float16()))
        ),
    }


class Scorer(VLLMEngine):
    """Adds `ll`, `ll_sum`, `topk_ids`, `topk_logprobs` to batches with `input_ids` and
    `response_start` (the logits stage)."""

    def __init__(self, engine: dict, top_k: int, kv_cache_gb: int = 1):
        super().__init__(engine, kv_cache_gb)
        self.k = top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = self.score(batch["input_ids"].to_pylist(), batch["response_start"].to_pylist(), self.k)
        for name, col in {**logprob_columns(results), **topk_columns(results)}.items():
            batch = batch.append_column(name, col)
        return batch
