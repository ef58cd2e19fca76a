"""Runs killed with SIGKILL resume: training from its last checkpoint, the logits stage from the
shards already written."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import student_split, tiny_config

from proxykd import artifacts
from proxykd.config import ModelConfig, TinyModelSpec
from proxykd.models import materialize_model


def _proxykd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "proxykd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _ray_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server|ray/dashboard"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def _kill_run(proc, ray_before: set[int]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's own daemons run in sessions of their own: stop what the killed run left behind.
    for pid in _ray_pids() - ray_before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_align_killed_mid_warmup_resumes_from_checkpoint(tmp_path):
    config = tmp_path / "config.yaml"
    # Rounds resume from their saved parts (tests/test_align.py); here the warm-up is killed
    # mid-training and resumes from its last Ray Train checkpoint.
    tree = tiny_config(tmp_path / "run", align={"rounds": 0, "warmup": {"epochs": 6, "batch_size": 4,
                                                                        "checkpoint_every_steps": 2}})
    config.write_text(yaml.safe_dump(tree))
    first = _proxykd("teacher", str(config))
    assert first.wait(timeout=300) == 0, first.stdout.read()

    ray_before = _ray_pids()
    proc = _proxykd("align", str(config))
    ckpts = tmp_path / "run" / "align" / "warmup" / "_ray" / "align-warmup"
    deadline = time.time() + 300
    snapshot = ckpts / "checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray Train has recorded a finished checkpoint
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            return False

    while not registered() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert registered(), "no checkpoint appeared"
    _kill_run(proc, ray_before)
    assert not (tmp_path / "run" / "align" / "manifest.json").exists()
    assert not (tmp_path / "run" / "align" / "warmup" / "model").exists()

    again = _proxykd("align", str(config))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-5000:]
    assert "[align-warmup] resumed from step" in out
    manifest = json.loads((tmp_path / "run" / "align" / "manifest.json").read_text())
    assert manifest["model"].endswith("warmup/model")
    metrics = [json.loads(l) for l in (tmp_path / "run" / "align" / "warmup" / "metrics.jsonl").read_text().splitlines()]
    # every step exactly once across the two processes: no repeated or skipped epoch
    assert [m["epoch"] for m in metrics] == sorted(m["epoch"] for m in metrics)
    assert sorted({m["epoch"] for m in metrics}) == list(range(6))
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))


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
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", logits={"top_k": 5, "batch_size": 2})))
    job = tmp_path / "logits_job.py"
    job.write_text(LOGITS_JOB)
    args = [sys.executable, str(job), str(config), str(tmp_path / "prompts.parquet"),
            str(tmp_path / "teacher.parquet"), proxy]
    folder = tmp_path / "run" / "logits"

    def shards() -> int:
        return len([p for p in folder.glob("*.parquet") if p.name != artifacts.REJECTED_FILE])

    ray_before = _ray_pids()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while shards() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    _kill_run(proc, ray_before)
    assert not (folder / "manifest.json").exists(), "the stage finished before it could be killed"
    stored = artifacts.done_ids(folder)  # what a rerun sees (a shard cut short is removed)
    assert 0 < len(stored) < n, len(stored)

    again = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == {"scored": n, "new": n - len(stored)}  # only the missing rows were scored
    ids = artifacts.read_shards(folder, ["id"])["id"].to_pylist()
    assert sorted(ids) == [r[0] for r in rows]  # every id exactly once
