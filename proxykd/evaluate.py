"""Stage 5, eval: on the held-out eval split, each student (vLLM in Ray Data, greedy by default)
answers every prompt, and the same engine scores the teacher's answer teacher-forced. Reported per
model: accuracy against the references (reasoning-gym's scorer for its tasks, exact match
otherwise), and how closely it imitates the teacher: mean per-token log-likelihood of the teacher's
answer and top-1 agreement with the teacher's tokens. The teacher's own accuracy is the first row.
Writes `eval/results.parquet` (one row per prompt and model) and `eval/report.md`. A prompt a
model's engine refuses is that model's unanswered item: it scores 0, its `score_error` says why,
and the manifest's `failed_*` names it with the model."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from proxykd import artifacts
from proxykd.config import RunConfig, fingerprint
from proxykd.data import extract_answer
from proxykd.encode import encode_split
from proxykd.models import load_tokenizer, model_max_length
from proxykd.scoring import score_many
from proxykd.vllm_actors import Evaluator, engine_kwargs, engine_shape, map_kwargs

log = logging.getLogger("proxykd")


def config_hash(cfg: RunConfig, distill_hash: str) -> str:
    return fingerprint(distill_hash, cfg.eval, cfg.seed)


def evaluate_models(cfg: RunConfig, models: dict[str, str], rows: pa.Table) -> pa.Table:
    """Every model of `models` (key: path, all of one `engine_shape`) on `rows`, through one pool
    of engines that swap the models' weights in turn (vLLM in Ray Data)."""
    first = next(iter(models.values()))
    rows = rows.select(["id", "input_ids", "response_start"])
    table = pa.concat_tables([rows.append_column("model", pa.array([key] * rows.num_rows, pa.string()))
                              for key in models])
    ds = artifacts.to_dataset(table, 64).map_batches(
        Evaluator,
        fn_constructor_kwargs={
            "engine": engine_kwargs(first, model_max_length(first), cfg.seed, cfg.resources, cfg.student.dtype),
            "models": models,
            "sampling": {"temperature": cfg.eval.temperature, "max_tokens": cfg.eval.max_tokens, "seed": cfg.seed},
            "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
        },
        **map_kwargs(cfg.resources, batch_size=64),
    )
    return artifacts.collect(ds, "answers", table.num_rows)


def known_mean(values) -> float:
    """The mean of the values that are not NaN (or None); NaN, without numpy's warning, when none is."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


def report_table(results: pa.Table) -> str:
    lines = ["| model | samples | accuracy | mean score | teacher ll/token | teacher top-1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in results["model"].unique().to_pylist():
        r = results.filter(pc.equal(results["model"], name))
        scores = r["score"].to_numpy(zero_copy_only=False).astype(float)
        scored = scores[~np.isnan(scores)]  # rows without a reference have no score
        acc = float(np.mean(scored >= 1.0)) if len(scored) else math.nan
        # (the teacher's own rows have no teacher ll: "–", not a NaN warning)
        ll, top1 = (known_mean(r[c].to_numpy(zero_copy_only=False)) for c in ("teacher_ll", "teacher_top1"))
        fmt = lambda v: "–" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {r.num_rows} | {acc:.3f} | {known_mean(scores):.3f} | {fmt(ll)} | {fmt(top1)} |")
    return "\n".join(lines)


def split_rows(prompts: pa.Table, teacher: pa.Table, split: str, model: str) -> tuple[pa.Table, list[dict]]:
    """One split's prompts with the teacher's first answer, tokenised for `model` (any model of the
    run: they share one vocabulary), and the rows left out as {id, error}."""
    return encode_split(load_tokenizer(model), prompts, teacher, split, model_max_length(model) - 1, all_samples=False)


def scored_results(prompts: pa.Table, model: str, generations: list[dict]) -> list[dict]:
    """Results rows of one model: each generation's extracted answer scored against its reference
    (`generations`: {id, text, teacher_ll?, teacher_top1?, error?}), all in one isolated scoring
    process (`scoring.score_many`). An answer whose scoring failed (timed out, crashed, or the scorer
    tried to act) scores 0 and names why in `score_error` (null otherwise). A row the model's engine
    refused (`error`) has no generation and scores 0 the same way: the model did not answer it, and
    every model stays scored on the same items."""
    wanted = pa.array([g["id"] for g in generations], pa.string())
    meta = {r["id"]: r for r in prompts.filter(pc.is_in(prompts["id"], wanted)).select(
        ["id", "reference", "task", "metadata"]).to_pylist()}
    out = []
    for g in generations:
        m, error = meta[g["id"]], g.get("error")
        out.append({"id": g["id"], "model": model, "generation": None if error else g["text"],
                    "answer": None if error else extract_answer(g["text"]), "reference": m["reference"],
                    "task": m["task"], "score": 0.0 if error and m["reference"] is not None else math.nan,
                    "teacher_ll": _float(g.get("teacher_ll")), "teacher_top1": _float(g.get("teacher_top1")),
                    "score_error": error})
    todo = [r for r in out if r["score_error"] is None]
    for r, s in zip(todo, score_many([{**meta[r["id"]], "answer": r["answer"]} for r in todo])):
        r["score"], r["score_error"] = s.score, s.error
    return out


def _float(value) -> float:
    return math.nan if value is None else float(value)


def models_results(cfg: RunConfig, prompts: pa.Table, models: dict[str, str], rows: pa.Table) -> dict[str, list[dict]]:
    """Generate with each model (key: path) on `rows` and score the answers: {key: results rows}.
    Models of one shape (`engine_shape`: students of one run, proxies of one run) go through one
    engine, so N models cost one engine start instead of N."""
    groups: dict[str, dict[str, str]] = {}
    for key, path in models.items():
        groups.setdefault(engine_shape(path), {})[key] = path
    out = {}
    for group in groups.values():
        log.info("eval: %s on %d prompts (one engine)", ", ".join(group), rows.num_rows)
        gens = evaluate_models(cfg, group, rows).to_pylist()
        for key in group:
            mine = [g for g in gens if g["model"] == key]
            for g in mine:
                if g["error"]:
                    log.warning("eval: %s could not answer %s (scored 0): %s", key, g["id"], g["error"])
            out[key] = scored_results(prompts, key, [{"text": g["sample"], **g} for g in mine])
    return {key: out[key] for key in models}


def teacher_results(prompts: pa.Table, rows: pa.Table) -> list[dict]:
    return scored_results(prompts, "teacher", [{"id": r["id"], "text": r["response"]}
                                               for r in rows.select(["id", "response"]).to_pylist()])


def run(cfg: RunConfig, prompts: pa.Table, teacher: pa.Table, models: dict[str, str], distill_hash: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "eval")
    h = config_hash(cfg, distill_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    rows, rejected = split_rows(prompts, teacher, "eval", next(iter(models.values())))
    if rows.num_rows == 0:
        raise RuntimeError("eval: no eval prompt has a teacher answer; raise data.eval_fraction")
    out = teacher_results(prompts, rows)
    # Baseline before Proxy-KD, so the table reads top-down.
    students = models_results(cfg, prompts, {n: models[n] for n in sorted(models, key=lambda n: n != "baseline")}, rows)
    for results in students.values():
        out += results
    results = pa.Table.from_pylist(out)
    # kept in the results, scored 0 (see scored_results), and named here with the model
    failed = [{"id": r["id"], "error": f"{r['model']}: {r['score_error']}"} for r in out if r["generation"] is None]
    artifacts.write_table_atomic(results, folder / "results.parquet")
    table = report_table(results)
    artifacts.write_text_atomic(
        folder / "report.md",
        f"# proxykd eval\n\nrun: `{cfg.run_dir}` · eval prompts: {rows.num_rows} · alpha: {cfg.distill.alpha} · "
        f"sample weighting: {cfg.distill.sample_weighting}\n\n{table}\n\n"
        "accuracy: answers scored against the references; teacher ll/token and top-1: how closely the\n"
        "student reproduces the teacher's answers (teacher-forced), the quantity distillation trains.\n"
    )
    return artifacts.write_manifest(folder, "eval", h, started, inputs={"distill": distill_hash, "models": models},
                                    rows={"prompts": rows.num_rows}, table=table,
                                    failed_count=len(failed), failed_first=failed[:20],
                                    **artifacts.write_rejected(folder, rejected))
