"""The whole pipeline, submitted with `proxykd submit` (proxykd.jobs) to the session's `ray start
--head` cluster (conftest.pipeline_run), then its artifacts checked against the contracts in
DESIGN.md, then a rerun that skips every stage."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BAD_ROWS, submit_and_wait, unexpected_tracebacks
from proxykd import storage
from proxykd.artifacts import shard_files

STAGES = ["prompts", "teacher", "align", "logits", "distill", "eval"]


@pytest.fixture(scope="module")
def run(pipeline_run):
    return pipeline_run


def manifest(run, stage):
    return json.loads((run["run_dir"] / stage / "manifest.json").read_text())


def test_job_runs_every_stage_and_prints_the_eval_table(run):
    for stage in STAGES:
        m = manifest(run, stage)
        assert m["stage"] == stage and len(m["config_hash"]) == 16 and m["versions"]["ray"] == "2.60.0"
    assert "| baseline |" in run["output"] and "| proxykd |" in run["output"]
    assert "proxykd run finished" in run["output"]


def test_the_jobs_console_is_short_and_the_engines_logs_are_in_the_run_folder(run):
    """`proxykd logs JOB` shows proxykd's lines, a progress line per stage now and then and the
    table (about 1,000 lines before, from every worker); the rest is in RUN_DIR/logs/."""
    lines = run["output"].splitlines()
    assert len(lines) < 80, run["output"]
    assert not [line for line in lines if "pid=" in line or "Traceback" in line], run["output"]
    for stage in STAGES[1:]:
        assert f"{stage}: done in " in run["output"]
    driver, workers = run["logs"]
    assert "INFO proxykd: eval: done in " in driver and "Starting execution of Dataset" in driver  # Ray Data's
    assert "Initializing a V1 LLM engine" in workers  # vLLM engines, in their Ray actors
    # each training step line once (Ray Train's patched print wrote it to stdout and stderr)
    assert workers.count("[distill-proxykd] epoch 0 step 1/") == 1 and workers.count("[align-warmup] epoch 0 step 1/") == 1
    tracebacks = unexpected_tracebacks(driver) + unexpected_tracebacks(workers)
    assert not tracebacks, "\n\n".join(tracebacks)


def test_prompts_and_teacher_artifacts(run):
    prompts = pq.read_table(run["run_dir"] / "prompts" / "prompts.parquet")
    assert set(prompts["split"].to_pylist()) == {"warmup", "proxy", "student", "dev", "eval"}
    shards = shard_files(run["run_dir"] / "teacher")
    teacher = pa.concat_tables([pq.read_table(f) for f in shards])
    assert teacher.column_names == ["id", "sample_index", "messages", "response", "finish_reason", "model",
                                    "prompt_tokens", "completion_tokens", "request_key", "error"]
    # one stored answer per distinct request; prompts with the same messages share it
    assert len(set(teacher["request_key"].to_pylist())) == teacher.num_rows
    assert set(teacher["id"].to_pylist()) <= set(prompts["id"].to_pylist())
    assert len({json.dumps(m) for m in prompts["messages"].to_pylist()}) == teacher.num_rows
    assert teacher["error"].null_count == teacher.num_rows
    assert manifest(run, "teacher")["rows"]["ok"] == prompts.num_rows


def test_every_bad_prompt_row_is_named_and_the_good_rows_reach_the_eval(run):
    prompts = pq.read_table(run["run_dir"] / "prompts" / "prompts.parquet")
    assert prompts.num_rows == 100 and len(set(prompts["id"].to_pylist())) == 100  # every good row
    rejected = pq.read_table(run["run_dir"] / "prompts" / "rejected.parquet").to_pylist()
    assert manifest(run, "prompts")["rejected_count"] == len(rejected) == len(BAD_ROWS)
    for got, (rid, where, why) in zip(rejected, run["bad"]):
        assert got["id"] == rid and got["error"].startswith(where) and why in got["error"], got
    # none of them went on: the eval scores every eval row, and nothing else
    results = pq.read_table(run["run_dir"] / "eval" / "results.parquet")
    eval_ids = {r["id"] for r in prompts.select(["id", "split"]).to_pylist() if r["split"] == "eval"}
    assert eval_ids and set(results["id"].to_pylist()) == eval_ids
    assert manifest(run, "eval")["failed_count"] == 0


def test_align_rounds_and_logits_contract(run):
    align = manifest(run, "align")
    samples = pq.read_table(run["run_dir"] / "align" / "round-1" / "samples.parquet")
    assert samples.column_names == ["id", "rejected"]
    # the round sampled its 8 rows (align.rows_per_round) and the held-out ones
    assert align["rows"]["per_round"] == 8 < align["rows"]["proxy"] and align["rows"]["heldout"] > 0
    assert samples.num_rows == 8 + align["rows"]["heldout"]
    # alignment measured on the held-out rows after the warm-up and after each round
    points = align["alignment"]
    assert [p["model"] for p in points] == ["warmup", "round-1"]
    assert all(p["teacher_ll"] < 0 and 0 <= p["top1"] <= 1 and p["tokens"] > 0 for p in points)
    assert (run["run_dir"] / "align" / "alignment.png").stat().st_size > 0
    # the handed-on proxy is the one with the best held-out teacher log-likelihood (align.select)
    best = max(points, key=lambda p: p["teacher_ll"])["model"]
    assert align["selected"]["model"] == best and align["model"].endswith(f"{best}/model")
    assert align["model"] == f"{run['run_uri']}/align/{best}/model"  # by its location in the store
    assert Path(storage.fetch(align["model"]), "config.json").exists()

    files = shard_files(run["run_dir"] / "logits")
    assert len(files) > 1  # written block by block, not as one file at the end
    logits = pa.concat_tables([pq.read_table(f) for f in files])
    schema = logits.schema
    # byte-level vocabulary of 262 tokens: the narrowest id type is uint16
    assert schema.field("input_ids").type == pa.list_(pa.uint16())
    assert schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16()))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16()))
    assert {"id", "response_start", "ll", "weight"} <= set(logits.column_names)
    k = manifest(run, "logits")["top_k"]
    for row in logits.to_pylist():
        n = len(row["input_ids"]) - row["response_start"]
        assert len(row["topk_ids"]) == n and all(len(x) == k for x in row["topk_ids"])
        lp = np.array(row["topk_logprobs"], np.float32)
        assert (lp <= 0).all() and (np.diff(lp, axis=1) <= 1e-3).all()  # sorted, best first
    ll, w = logits["ll"].to_numpy(), logits["weight"].to_numpy()
    m = manifest(run, "logits")
    assert m["ll_mean"] == pytest.approx(ll.mean()) and m["ll_std"] == pytest.approx(ll.std())
    np.testing.assert_allclose(w, 1 / (1 + np.exp(-(ll - ll.mean()) / ll.std())), rtol=1e-6)
    assert len(set(logits["id"].to_pylist())) == logits.num_rows


def test_students_are_loadable_checkpoints_with_metrics(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = manifest(run, "distill")["models"]
    assert set(models) == {"proxykd", "baseline"}
    for name, path in models.items():
        AutoModelForCausalLM.from_pretrained(storage.fetch(path))
        AutoTokenizer.from_pretrained(storage.fetch(path))
        folder = storage.local_path(path).parent
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(np.isfinite(r["loss"]) for r in metrics)
        assert ("kl" in metrics[-1]) == (name == "proxykd")
        assert (folder / "loss.png").stat().st_size > 1000


def test_eval_results_and_report(run):
    results = pq.read_table(run["run_dir"] / "eval" / "results.parquet")
    eval_ids = manifest(run, "eval")["rows"]["prompts"]
    assert results.num_rows == 3 * eval_ids
    assert set(results["model"].to_pylist()) == {"teacher", "baseline", "proxykd"}
    scores = results["score"].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    # the local teacher answers from the references: it is always right
    teacher = results.filter(pa.compute.equal(results["model"], "teacher"))
    assert teacher["score"].to_numpy().min() == 1.0
    students = results.filter(pa.compute.not_equal(results["model"], "teacher"))
    ll, top1 = students["teacher_ll"].to_numpy(), students["teacher_top1"].to_numpy()
    assert (ll < 0).all() and ((top1 >= 0) & (top1 <= 1)).all()
    report = (run["run_dir"] / "eval" / "report.md").read_text()
    assert "| baseline |" in report and "| proxykd |" in report


def test_rerun_skips_every_finished_stage(run):
    before = {s: manifest(run, s)["finished_at"] for s in STAGES}
    out = submit_and_wait(run["cluster"], run["config"])
    for stage in STAGES[1:]:
        assert f"{stage}: done already" in out and f"{stage}: done in" not in out
    assert {s: manifest(run, s)["finished_at"] for s in STAGES} == before


def test_the_run_folder_is_in_the_object_store_and_a_fresh_machine_finds_it_done(run, tmp_path, monkeypatch):
    """The job's run folder is `s3://...` (the session's S3 server): every artifact is in the store
    as the job's mirror holds it, the teacher's journals are folded, and a machine with an empty
    mirror sees every stage done (`proxykd status`) and skips them all (`proxykd run`)."""
    import os
    import subprocess
    import sys

    from pyarrow import fs as pafs

    fs, key = storage.filesystem(run["run_uri"])
    stored = {i.path[len(key) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(key, recursive=True))
              if i.type == pafs.FileType.File}
    for stage in STAGES:
        with fs.open_input_stream(f"{key}/{stage}/manifest.json") as f:
            assert json.loads(f.read()) == manifest(run, stage)
    local = {p.relative_to(run["run_dir"]).as_posix(): p.stat().st_size for p in run["run_dir"].rglob("*")
             if p.is_file() and not p.name.startswith(".") and p.parts[-2] != "logs" and "report" not in p.parts
             and "unaligned" not in p.parts}
    missing = {name for name in local if name not in stored and name != ".proxykd-run.lock"}
    assert not missing, sorted(missing)[:20]
    assert any(n.startswith("distill/_ray/") for n in stored)  # Ray Train's checkpoints, in the store itself
    assert not any(n.startswith("teacher/journal-") for n in stored)

    env = {**os.environ, storage.MIRROR_ENV: str(tmp_path / "fresh")}
    status = subprocess.run([sys.executable, "-m", "proxykd.cli", "status", run["run_uri"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    for stage in STAGES:
        assert re.search(rf"^\s*{stage}\s+done\b", status.stdout, re.M), status.stdout
    again = subprocess.run([sys.executable, "-m", "proxykd.cli", "run", str(run["config"])], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    out = again.stdout + again.stderr
    for stage in STAGES[1:]:
        assert f"{stage}: done already" in out and f"{stage}: done in" not in out, out[-3000:]

    # `proxykd serve s3://...` from that machine: the run's student, downloaded there
    from proxykd.config import ServeConfig
    from proxykd.serving import resolve_target

    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "serve"))
    target = resolve_target(run["run_uri"])
    student = target.models[ServeConfig().model_name]
    assert target.source == f"run {run['run_uri']}"
    assert student.startswith(str(tmp_path / "serve")) and Path(student, "config.json").is_file()
