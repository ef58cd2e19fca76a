"""Stage 5, eval: generate with each student (vLLM in Ray Data, greedy by default) on the held-out
eval split and score the answers against the references: reasoning-gym's scorer for its tasks,
exact match otherwise. Writes `eval/results.parquet` (one row per sample and model) and
`eval/report.md` (baseline α = 0 vs Proxy-KD)."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from proxykd import artifacts
from proxykd.config import RunConfig, fingerprint
from proxykd.data import extract_answer, score
from proxykd.encode import IDS
from proxykd.models import load_tokenizer, model_max_length
from proxykd.tokenization import prompt_ids
from proxykd.vllm_actors import Sampler, engine_kwargs, map_kwargs

log = logging.getLogger("proxykd")


def config_hash(cfg: RunConfig, distill_hash: str) -> str:
    return fingerprint(distill_hash, cfg.eval, cfg.seed)


def generate(cfg: RunConfig, model_path: str, rows: pa.Table) -> pa.Table:
    import ray

    tokenizer = load_tokenizer(model_path)
    ids = [prompt_ids(tokenizer, m) for m in rows["messages"].to_pylist()]
    ds = ray.data.from_arrow(rows.select(["id"]).append_column("prompt_ids", pa.array(ids, IDS))).map_batches(
        Sampler,
        fn_constructor_kwargs={
            "engine": engine_kwargs(model_path, model_max_length(model_path), cfg.seed, cfg.resources, cfg.student.dtype),
            "sampling": {"temperature": cfg.eval.temperature, "max_tokens": cfg.eval.max_tokens, "seed": cfg.seed},
            "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
        },
        **map_kwargs(cfg.resources, batch_size=64),
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).select(["id", "sample"])


def report_table(results: pa.Table) -> str:
    lines = ["| model | samples | accuracy | mean score |", "| --- | --- | --- | --- |"]
    for name in results["model"].unique().to_pylist():
        r = results.filter(pc.equal(results["model"], name))
        scores = r["score"].to_numpy()
        acc = float(np.nanmean(scores >= 1.0)) if len(scores) else math.nan
        lines.append(f"| {name} | {r.num_rows} | {acc:.3f} | {float(np.nanmean(scores)):.3f} |")
    return "\n".join(lines)


def run(cfg: RunConfig, prompts: pa.Table, models: dict[str, str], distill_hash: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "eval")
    h = config_hash(cfg, distill_hash)
    if artifacts.is_done(folder, h):
        log.info("eval: done already (%s), skipped", folder)
        return artifacts.read_manifest(folder)
    started = time.time()
    artifacts.begin_stage(folder, h)
    rows = prompts.filter(pc.equal(prompts["split"], "eval")).sort_by("id")
    if rows.num_rows == 0:
        raise RuntimeError("eval: the eval split is empty; raise data.eval_fraction")
    meta = {r["id"]: r for r in rows.select(["id", "reference", "task", "metadata"]).to_pylist()}
    out = []
    # Baseline first: the table reads baseline, then Proxy-KD.
    for name in sorted(models, key=lambda n: n != "baseline"):
        log.info("eval: generating with the %s student on %d prompts", name, rows.num_rows)
        for r in generate(cfg, models[name], rows).to_pylist():
            m = meta[r["id"]]
            answer = extract_answer(r["sample"])
            out.append({"id": r["id"], "model": name, "generation": r["sample"], "answer": answer,
                        "reference": m["reference"], "score": score(m["task"], answer, m["reference"], m["metadata"])})
    results = pa.Table.from_pylist(out)
    artifacts.write_table_atomic(results, folder / "results.parquet")
    table = report_table(results)
    (folder / "report.md").write_text(
        f"# proxykd eval\n\nrun: `{cfg.run_dir}` · eval prompts: {rows.num_rows} · "
        f"alpha: {cfg.distill.alpha}\n\n{table}\n"
    )
    return artifacts.write_manifest(folder, "eval", h, started, inputs={"distill": distill_hash, "models": models},
                                    rows={"prompts": rows.num_rows, "results": results.num_rows}, table=table)
