"""Stage 2, align: make the white-box proxy imitate the black-box teacher.

a. warm-up SFT on the teacher's responses of split D_w;
b. `rounds` times over D_p: the current proxy samples its own answer ŷ (vLLM in Ray Data), the
   same engine scores log p_ref(y_teacher) and log p_ref(ŷ) once (so no reference model sits in
   memory during training), then Ray Train minimises nll_weight·NLL(y) + DPO(y ≻ ŷ) with the
   proxy of the previous round as reference.

Layout: `align/warmup/model`, `align/round-<k>/{model, samples.parquet, pairs.parquet}`. Each
part is reused on rerun once its model folder exists, so a run killed in round k restarts at k.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from proxykd import artifacts, training
from proxykd.config import RunConfig, fingerprint
from proxykd.encode import IDS, encode_split
from proxykd.models import load_tokenizer, model_max_length
from proxykd.vllm_actors import VLLMEngine, engine_kwargs, map_kwargs

log = logging.getLogger("proxykd")


class RoundSampler(VLLMEngine):
    """Sample ŷ for each prompt, then score chosen (teacher) and rejected (ŷ) sequences under the
    same engine: these are the DPO reference log-probs of this round."""

    def __init__(self, engine: dict, sampling: dict, max_length: int, kv_cache_gb: int = 1):
        super().__init__(engine, kv_cache_gb, sampling)
        from transformers import AutoTokenizer

        self.eos = AutoTokenizer.from_pretrained(engine["tokenizer"]).eos_token_id
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        chosen = batch["input_ids"].to_pylist()
        starts = batch["response_start"].to_pylist()
        outs = self.generate([ids[:s] for ids, s in zip(chosen, starts)], self.params)
        samples = [o.outputs[0].text for o in outs]
        # Train on the tokens the proxy produced (re-tokenising the text could differ), with eos
        # where it stopped by itself, as the teacher's answers have.
        rejected = []
        for ids, s, o in zip(chosen, starts, outs):
            sample = list(o.outputs[0].token_ids)
            if o.outputs[0].finish_reason == "stop" and sample[-1:] != [self.eos]:
                sample.append(self.eos)
            rejected.append((ids[:s] + sample)[: self.max_length])
        ref_c = self.score(chosen, starts, 1)
        ref_r = self.score(rejected, starts, 1)
        return pa.table(
            {
                "id": batch["id"],
                "rejected": pa.array(samples, pa.string()),
                "chosen_input_ids": pa.array(chosen, IDS),
                "chosen_response_start": batch["response_start"],
                "rejected_input_ids": pa.array(rejected, IDS),
                "rejected_response_start": batch["response_start"],
                "ref_chosen_logp": pa.array([float(r[2].sum()) for r in ref_c], pa.float64()),
                "ref_rejected_logp": pa.array([float(r[2].sum()) for r in ref_r], pa.float64()),
                "chosen_ll": pa.array([float(r[2].mean()) for r in ref_c], pa.float64()),
            }
        )


def config_hash(cfg: RunConfig, teacher_hash: str) -> str:
    return fingerprint(teacher_hash, cfg.proxy, cfg.align, cfg.seed)


def _sample_round(cfg: RunConfig, model: str, rows: pa.Table, max_length: int, out: Path) -> pa.Table:
    import ray

    s = cfg.align.sampling
    ds = artifacts.to_dataset(rows.select(["id", "input_ids", "response_start"]), 64).map_batches(
        RoundSampler,
        fn_constructor_kwargs={
            "engine": engine_kwargs(model, model_max_length(model), cfg.seed, cfg.resources, cfg.proxy.dtype),
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": cfg.seed},
            "max_length": max_length,
            "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
        },
        **map_kwargs(cfg.resources, batch_size=64),
    )
    pairs = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    artifacts.write_table_atomic(pairs.select(["id", "rejected"]), out / "samples.parquet")
    artifacts.write_table_atomic(pairs, out / "pairs.parquet")
    return pairs


def run(cfg: RunConfig, prompts: pa.Table, teacher: pa.Table, teacher_hash: str, base: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "align")
    h = config_hash(cfg, teacher_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    tokenizer = load_tokenizer(base)
    # One position is kept free: vLLM scores a full-length sequence by generating one token after it.
    max_length = min(cfg.align.max_length, model_max_length(base) - 1)

    warm_rows, rejected = encode_split(tokenizer, prompts, teacher, "warmup", max_length)
    proxy_rows, rej = encode_split(tokenizer, prompts, teacher, "proxy", max_length)
    rejected += rej
    if warm_rows.num_rows == 0:
        raise RuntimeError("align: the warm-up split has no teacher responses; add data or raise data.split.warmup")
    if cfg.align.rounds and proxy_rows.num_rows == 0:
        raise RuntimeError("align: the proxy split has no teacher responses; add data or set align.rounds=0")

    current = folder / "warmup" / "model"
    if not current.exists():
        log.info("align: warm-up SFT on %d rows", warm_rows.num_rows)
        training.fit(name="align-warmup", objective="sft", model_path=base,
                     table=warm_rows.select(["id", "input_ids", "response_start"]),
                     out_dir=folder / "warmup", train=cfg.align.warmup, resources=cfg.resources, loss={})
    rounds = []
    for k in range(1, cfg.align.rounds + 1):
        rdir = folder / f"round-{k}"
        rdir.mkdir(exist_ok=True)
        pairs_path = rdir / "pairs.parquet"
        if pairs_path.exists():
            pairs = pq.read_table(pairs_path)
        else:
            log.info("align: round %d, sampling %d proxy answers", k, proxy_rows.num_rows)
            pairs = _sample_round(cfg, str(current), proxy_rows, max_length, rdir)
        # The proxy's teacher log-likelihood before this round's update: how aligned round k-1 is.
        rounds.append({"round": k, "teacher_ll_before": float(np.mean(pairs["chosen_ll"].to_numpy()))})
        if not (rdir / "model").exists():
            training.fit(name=f"align-round-{k}", objective="dpo", model_path=str(current),
                         table=pairs.drop_columns(["rejected", "chosen_ll"]),
                         out_dir=rdir, train=cfg.align.dpo, resources=cfg.resources,
                         loss={"beta": cfg.align.beta, "nll_weight": cfg.align.nll_weight})
        current = rdir / "model"
        log.info("align: round %d done, proxy teacher-ll before it %.4f", k, rounds[-1]["teacher_ll_before"])

    return artifacts.write_manifest(
        folder, "align", h, started,
        inputs={"teacher": teacher_hash, "proxy_init": base},
        model=str(current),
        rows={"warmup": warm_rows.num_rows, "proxy": proxy_rows.num_rows},
        **artifacts.write_rejected(folder, rejected),
        rounds=rounds,
    )
