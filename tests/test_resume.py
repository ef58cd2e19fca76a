"""Runs killed with SIGKILL resume: training from its last checkpoint, the logits stage from the
shards already written."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (S3_BUCKET, kill_ray_session, ray_session_of, run_logs, session_processes, student_split,
                      tiny_config, unexpected_tracebacks)

from proxykd import artifacts
from proxykd.config import ModelConfig, TinyModelSpec
from proxykd.models import materialize_model


def _proxykd(*args, log=None, **kw):
    """The CLI in a session of its own; its output to `log` (a file: nothing blocks on a full pipe
    while the test waits) or to a pipe."""
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "proxykd.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)
    if log:
        out.close()
    return proc


def _session(log) -> tuple[str, str]:
    """(session dir, mark) of the run writing `log`, once init_ray has logged them."""
    deadline = time.time() + 120
    while "ray session:" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    return ray_session_of(log.read_text())


def _kill_driver(proc, log) -> None:
    """SIGKILL the driver's process group, then check (killing nothing more) that no process of its
    Ray session is left a few seconds later: proxykd's watchdog stops them (proxykd/reaper.py)."""
    session, mark = _session(log)
    alive = session_processes(session, mark)
    assert len(alive) >= 5, alive  # gcs, raylet, agents, workers...: the check below can see them
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    try:
        while (left := session_processes(session, mark)) and time.time() < killed + 10:
            time.sleep(0.2)
        assert not left, f"processes of the killed run's Ray session still running 10 s later: {left}"
    finally:
        kill_ray_session(session, mark)  # only if the check failed: this run's processes, no others


def _assert_clean_end(out: str, run_dir) -> None:
    """A normal run ends with no process of its Ray session left and no traceback on its console
    or in what its driver and Ray workers wrote to RUN_DIR/logs/."""
    session, mark = ray_session_of(out)
    assert not session_processes(session, mark), "processes of the finished run's Ray session still running"
    tracebacks = [t for text in (out, *run_logs(run_dir)) for t in unexpected_tracebacks(text)]
    assert not tracebacks, "\n\n".join(tracebacks)


def test_align_killed_mid_warmup_in_object_storage_resumes_on_a_fresh_machine(tmp_path, local_ray, object_store):
    """The run folder in S3 (the session's moto server): the warm-up is killed mid-training and
    resumed by a run whose local mirror is empty (another machine, as after losing the head), from
    the last Ray Train checkpoint in the store; every artifact ends up in the store."""
    from pyarrow import fs as pafs

    from proxykd import pipeline, storage
    from proxykd.config import parse_config

    uri = f"s3://{S3_BUCKET}/resume-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.yaml"
    # (nothing held out: no vLLM engine to measure alignment, which is not what is tested here)
    tree = tiny_config(uri, align={"rounds": 0, "heldout_fraction": 0.0,
                                   "warmup": {"epochs": 6, "batch_size": 4, "checkpoint_every_steps": 2}})
    config.write_text(yaml.safe_dump(tree))
    # the stages before align, on this session's Ray: the CLI runs below are the ones that matter
    pipeline.run(parse_config(tree), ("prompts", "teacher"))

    killed_log = tmp_path / "align-killed.log"
    proc = _proxykd("align", str(config), log=killed_log)
    fs, snapshot = storage.filesystem(f"{uri}/align/warmup/_ray/align-warmup/checkpoint_manager_snapshot.json")
    deadline = time.time() + 300

    def registered() -> bool:  # Ray Train has recorded a finished checkpoint, in the store
        try:
            with fs.open_input_stream(snapshot) as f:
                return json.loads(f.read()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            return False

    while not registered() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert registered(), "no checkpoint appeared in the store"
    _kill_driver(proc, killed_log)
    assert fs.get_file_info(snapshot.replace("_ray/align-warmup/checkpoint_manager_snapshot.json", "model")).type \
        == pafs.FileType.NotFound

    fresh = tmp_path / "fresh-mirror"
    again = _proxykd("align", str(config), env={**os.environ, storage.MIRROR_ENV: str(fresh)})
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-5000:]
    run_dir = fresh / "s3" / uri.split("://")[1]
    _assert_clean_end(out, run_dir)
    # (a Ray Train worker's line: in the run's workers.log, no longer on the console)
    assert "[align-warmup] resumed from step" in run_logs(run_dir)[1]
    # the manifest, model and metrics in the store; the manifest names the model by its URI
    manifest = json.loads(_read(fs, f"{uri}/align/manifest.json"))
    assert manifest["model"] == f"{uri}/align/warmup/model"
    assert fs.get_file_info(storage.filesystem(f"{uri}/align/warmup/model/config.json")[1]).type == pafs.FileType.File
    metrics = [json.loads(line) for line in _read(fs, f"{uri}/align/warmup/metrics.jsonl").splitlines()]
    # every step exactly once across the two processes: no repeated or skipped epoch
    assert [m["epoch"] for m in metrics] == sorted(m["epoch"] for m in metrics)
    assert sorted({m["epoch"] for m in metrics}) == list(range(6))
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    # the killed run's machine (this mirror) follows the store once it pulls
    storage.pull(storage.local_path(uri) / "align", exclude=("_ray", "model"))
    assert json.loads((storage.local_path(uri) / "align" / "manifest.json").read_text()) == manifest


def _read(fs, uri: str) -> str:
    from proxykd import storage

    with fs.open_input_stream(storage.filesystem(uri)[1]) as f:
        return f.read().decode()


# The logits stage alone, on hand-made inputs (vLLM engine code must run from a file: spawn).
LOGITS_JOB = """
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from proxykd import logits
from proxykd.config import parse_config
from proxykd.pipeline import init_ray, setup_logging

if __name__ == "__main__":
    cfg = parse_config(yaml.safe_load(open(sys.argv[1])))
    setup_logging()
    init_ray(cfg)
    manifest = logits.run(cfg, pq.read_table(sys.argv[2]), pq.read_table(sys.argv[3]), sys.argv[4], "align")
    print("LOGITS ROWS", manifest["rows"], flush=True)
"""


@pytest.mark.slow  # two Ray starts and two vLLM engine loads: about 3 minutes on 2 cores
def test_logits_killed_mid_stage_scores_only_the_missing_rows(tmp_path):
    n = 160
    rows = [(f"q{i:03d}", f"Calculate {i} + {i % 7}.", f"The answer is {i + i % 7}. " * (1 + i % 4), "stop")
            for i in range(n)]
    prompts, teacher = student_split(rows)
    pq.write_table(prompts, tmp_path / "prompts.parquet")
    pq.write_table(teacher, tmp_path / "teacher.parquet")
    proxy = materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path / "proxy", seed=1)
    config = tmp_path / "config.yaml"
    # vLLM's engine core in a process of its own (as on GPU; CPU runs it in the actor by default):
    # a kill -9 of the stage once left EngineCore processes running, and a normal end printed the
    # KeyError tracebacks of the actor's multiprocessing resource tracker.
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", logits={"top_k": 5, "batch_size": 2},
                                                 resources={"vllm_in_process": False})))
    job = tmp_path / "logits_job.py"
    job.write_text(LOGITS_JOB)
    args = [sys.executable, str(job), str(config), str(tmp_path / "prompts.parquet"),
            str(tmp_path / "teacher.parquet"), proxy]
    folder = tmp_path / "run" / "logits"

    def shards() -> int:
        return len([p for p in folder.glob("*.parquet") if p.name != artifacts.REJECTED_FILE])

    killed_log = tmp_path / "logits-killed.log"
    with open(killed_log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while shards() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    _kill_driver(proc, killed_log)
    assert not (folder / "manifest.json").exists(), "the stage finished before it could be killed"
    stored = artifacts.done_ids(folder)  # what a rerun sees (a shard cut short is removed)
    assert 0 < len(stored) < n, len(stored)

    again = subprocess.run(args, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-5000:]
    _assert_clean_end(again.stdout, tmp_path / "run")
    session, _ = ray_session_of(again.stdout)
    # nor in the workers' logs (vLLM's resource tracker wrote its KeyError tracebacks there)
    for err in (Path(session) / "logs").glob("worker-*.err"):
        assert not unexpected_tracebacks(err.read_text()), (err, unexpected_tracebacks(err.read_text()))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == {"scored": n, "new": n - len(stored)}  # only the missing rows were scored
    ids = artifacts.read_shards(folder, ["id"])["id"].to_pylist()
    assert sorted(ids) == [r[0] for r in rows]  # every id exactly once
