"""`proxykd submit|status|logs|stop` against the session's `ray start --head` cluster, and
`proxykd status RUN_DIR` on a run folder written with the real artifact functions (no engines)."""

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import tiny_config
from proxykd import artifacts, jobs
from proxykd.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "sk-proxykd-test-" + "7f3a9c" * 4  # a fake teacher key, set in the submitter's environment only


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "OPENAI_API_KEY")}
    return {**env, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _config(tmp_path, name="run.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", **sections)))
    return path


# ------------------------------------------------------------------ what submit sends (no Ray)


def test_submit_ships_the_repo_and_the_config_never_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    outside = _config(tmp_path)
    job = jobs.prepare(outside, ["distill.alpha=0.5", "eval.max_tokens=8"])
    assert job["runtime_env"]["working_dir"] == str(REPO)
    # a config outside the working dir travels as text in the runtime env; the entrypoint names it
    assert job["runtime_env"]["env_vars"][jobs.CONFIG_ENV] == outside.read_text()
    assert job["entrypoint"] == ("python -m proxykd.jobs run env:PROXYKD_CONFIG_YAML "
                                 "--set distill.alpha=0.5 --set eval.max_tokens=8")
    assert job["metadata"]["proxykd_run_dir"] == str(tmp_path / "run")
    # a config inside the working dir is named by its path there, and nothing else is in the env
    inside = jobs.prepare(REPO / "configs" / "default.yaml", ["run_dir=/mnt/shared/runs/x", "seed=3"],
                          command="teacher")
    assert inside["entrypoint"] == ("python -m proxykd.jobs teacher configs/default.yaml "
                                    "--set run_dir=/mnt/shared/runs/x --set seed=3")
    assert inside["runtime_env"] == {"working_dir": str(REPO)}
    # shell-unsafe values are quoted
    odd = jobs.prepare(outside, ["data.system_prompt=say 'hi'; rm -rf /"])
    assert "'data.system_prompt=say '\"'\"'hi'\"'\"'; rm -rf /'" in odd["entrypoint"]
    # no entrypoint resources: Ray then runs the driver (which reads the key) on the head node
    assert set(job) == {"entrypoint", "runtime_env", "metadata"}
    for j in (job, inside, odd):
        assert SECRET not in json.dumps(j)


def test_submit_refuses_secrets_relative_run_dirs_and_bad_configs(tmp_path):
    cfg = _config(tmp_path)
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "MY_SECRET", "DB_PASSWORD"):
        with pytest.raises(jobs.SubmitError, match="secrets never go"):
            jobs.prepare(cfg, env={name: "x"})
    custom = _config(tmp_path, "custom.yaml", teacher={"api_key_env": "TEACHER_CRED_VAR"})
    with pytest.raises(jobs.SubmitError, match="TEACHER_CRED_VAR"):
        jobs.prepare(custom, env={"TEACHER_CRED_VAR": "x"})
    assert jobs.prepare(cfg, env={"VLLM_CPU_KVCACHE_SPACE": 2})["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    with pytest.raises(jobs.SubmitError, match="relative"):
        jobs.prepare(REPO / "configs" / "default.yaml")  # run_dir: runs/default
    jobs.prepare(REPO / "configs" / "default.yaml", command="check")  # check writes nothing
    with pytest.raises(jobs.SubmitError, match="distill.alphaa: unknown key"):
        jobs.prepare(cfg, ["distill.alphaa=1"])
    jobs.prepare(cfg, ["distill.alphaa=1"], check=False)  # validated on the cluster instead
    with pytest.raises(jobs.SubmitError, match="unknown command"):
        jobs.prepare(cfg, command="rm")
    with pytest.raises(jobs.SubmitError, match="not found"):
        jobs.prepare(tmp_path / "missing.yaml")
    assert cli(["submit", str(cfg), "--set", "distill.alphaa=1", "--address", "http://127.0.0.1:1"]) == 2


def test_the_stage_list_is_the_pipelines():
    from proxykd import pipeline

    assert jobs.STAGES == pipeline.STAGES


# -------------------------------------------------------------------------- a run folder's state


def _teacher_rows(n: int, tokens: tuple[int, int], error=None) -> list[dict]:
    return [{"id": f"q{i}", "sample_index": 0, "messages": [{"role": "user", "content": f"{i}+1"}],
             "response": str(i + 1), "finish_reason": "stop", "model": "m", "prompt_tokens": tokens[0],
             "completion_tokens": tokens[1], "request_key": f"k{i}", "error": error} for i in range(n)]


def test_status_of_a_run_folder_reads_each_stage_and_the_spend_so_far(tmp_path, capsys):
    from proxykd import runlock, teacher
    from proxykd.config import parse_config

    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(run_dir, teacher={"price_per_million_prompt_tokens": 2.0,
                                                     "price_per_million_completion_tokens": 8.0}))
    # prompts: done
    prompts = artifacts.stage_dir(run_dir, "prompts")
    started = time.time() - 3
    artifacts.begin_stage(prompts, "h-prompts")
    artifacts.write_table_atomic(pa.table({"id": ["a", "b", "c"]}), prompts / "prompts.parquet")
    artifacts.write_manifest(prompts, "prompts", "h-prompts", started, rows={"total": 3, "eval": 1, "student": 2},
                             **artifacts.write_rejected(prompts, [{"id": "bad", "error": "not valid JSON"}]))
    # teacher: killed mid-stage: one compacted shard (10 answers) and one live journal (4 answers, 1 failure)
    folder = artifacts.stage_dir(run_dir, "teacher")
    artifacts.begin_stage(folder, "h-teacher", keep_stale=True)
    (folder / "journal-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _teacher_rows(10, (100, 20))))
    assert teacher.compact_journals(folder) == 10
    live = _teacher_rows(4, (50, 10)) + _teacher_rows(1, (50, 0), error="timeout")
    (folder / "journal-b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in live) + '{"cut off')
    (folder / "part-broken.parquet").write_bytes(b"PAR1 not really")  # a shard being written: skipped, kept

    status = jobs.run_status(run_dir, cfg)
    by = {s["stage"]: s for s in status["stages"]}
    assert [s["stage"] for s in status["stages"]] == list(jobs.STAGES)
    assert by["prompts"]["state"] == "done" and by["prompts"]["seconds"] >= 3
    assert by["prompts"]["rows"] == "total 3, eval 1, student 2, rejected 1"
    assert by["prompts"]["artifacts"] == [str(prompts / "prompts.parquet")]
    t = by["teacher"]
    assert t["state"] == "stopped" and not status["lock"]["held"]  # no manifest, nobody holds the run
    assert t["rows"] == "14 answers stored so far"
    prompt_tokens, completion_tokens = 10 * 100 + 5 * 50, 10 * 20 + 4 * 10
    assert t["tokens"] == prompt_tokens + completion_tokens
    assert t["cost_usd"] == pytest.approx((prompt_tokens * 2.0 + completion_tokens * 8.0) / 1e6)
    assert all(by[s]["state"] == "not started" for s in ("align", "logits", "distill", "eval"))
    assert (folder / "part-broken.parquet").exists() and (folder / "journal-b.jsonl").exists()  # read-only
    assert not list(folder.glob("*.unreadable-*"))
    assert jobs.run_status(run_dir)["stages"][1]["cost_usd"] is None  # no prices without a config

    # while a run holds the folder the stage is running; then the teacher finishes with its manifest
    with runlock.run_lock(run_dir):
        held = jobs.run_status(run_dir)
        assert held["lock"]["held"] and held["lock"]["pid"] == os.getpid()
        assert held["stages"][1]["state"] == "running"
        assert "lock: held by pid" in jobs.format_run_status(held)
    artifacts.write_manifest(folder, "teacher", "h-teacher", time.time() - 75,
                             rows={"prompts": 20, "ok": 18, "failed": 1, "not_asked": 1},
                             tokens={"all_stored": 12345}, cost={"all_stored": 0.0321, "this_run": 0.01})
    distill = artifacts.stage_dir(run_dir, "distill")
    artifacts.begin_stage(distill, "h-distill")
    artifacts.write_manifest(distill, "distill", "h-distill", time.time() - 5,
                             models={"proxykd": str(distill / "model"), "baseline": str(distill / "baseline/model")})
    assert cli(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and not line.startswith(" ")}
    assert "done" in lines["teacher"] and "1.2 min" in lines["teacher"] and "$0.0321 (12,345 tok)" in lines["teacher"]
    assert "ok 18/20 prompts, failed 1, not_asked 1" in lines["teacher"]
    assert f"-> proxykd: {distill / 'model'}" in out and f"-> baseline: {distill / 'baseline/model'}" in out
    assert "not started" in lines["eval"] and "lock: free" in out
    assert cli(["status", str(tmp_path / "nothing/here")]) == 2


# ------------------------------------------------------------------------ against a real head


@pytest.fixture(scope="module")
def cluster(ray_head):
    """The session's `ray start --head` (conftest.ray_head), shared with the end-to-end pipeline."""
    return ray_head


@pytest.fixture
def client_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the submitter has a key: it must not travel


def _wait(address, job_id, timeout=120):
    return jobs.wait(job_id, address, timeout_s=timeout, poll_s=0.5)


def test_submit_status_logs_of_a_job(cluster, client_env, tmp_path, capsys):
    cfg = _config(tmp_path)
    assert cli(["submit", str(cfg), "--address", cluster, "--command", "check",
                "--set", "distill.alpha=0.25", "--set", "eval.max_tokens=7"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("raysubmit_")
    info = _wait(cluster, job_id)
    logs = jobs.job_logs(job_id, cluster)
    assert str(info.status.value) == "SUCCEEDED", logs[-3000:]
    resolved = yaml.safe_load(logs[logs.index("run_dir:"):])  # `check` prints the resolved config
    assert resolved["distill"]["alpha"] == 0.25 and resolved["eval"]["max_tokens"] == 7
    assert resolved["run_dir"] == str(tmp_path / "run")
    assert SECRET not in json.dumps(info.runtime_env) and SECRET not in logs
    assert info.metadata["proxykd_command"] == "check"
    assert info.entrypoint.startswith("python -m proxykd.jobs check env:PROXYKD_CONFIG_YAML")

    assert cli(["status", job_id, "--address", cluster]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: SUCCEEDED" in out and "exit code:  0" in out
    assert cli(["logs", job_id, "--address", cluster]) == 0
    assert "distill:" in capsys.readouterr().out
    assert cli(["status", "raysubmit_nosuchjob", "--address", cluster]) == 1


def test_a_failing_job_and_follow_and_stop(cluster, client_env, tmp_path, capsys):
    # a config the cluster refuses (validated there only): the job fails with the config error
    bad = _config(tmp_path, "bad.yaml")
    job_id = jobs.submit(bad, cluster, ["distill.alphaa=1"], command="check", check=False)
    info = _wait(cluster, job_id)
    assert str(info.status.value) == "FAILED" and info.driver_exit_code == 2
    assert "distill.alphaa: unknown key" in jobs.job_logs(job_id, cluster)

    c = jobs.client(cluster)
    # --follow prints the output as it comes and returns when the job ends
    ticker = c.submit_job(entrypoint="python -c \"import time\nfor i in range(4): print('tick', i, flush=True); "
                                     "time.sleep(0.5)\"")
    assert cli(["logs", ticker, "--address", cluster, "--follow"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("tick")] == [f"tick {i}" for i in range(4)]
    assert str(jobs.job_info(ticker, cluster).status.value) == "SUCCEEDED"

    # stop: a job that would run for 5 minutes ends within seconds, STOPPED
    sleeper = c.submit_job(entrypoint="python -c \"import time; print('up', flush=True); time.sleep(300)\"")
    deadline = time.time() + 60
    while "up" not in jobs.job_logs(sleeper, cluster):
        assert time.time() < deadline, "the sleeping job did not start"
        time.sleep(0.5)
    started = time.time()
    assert cli(["stop", sleeper, "--address", cluster]) == 0
    assert f"job {sleeper}: STOPPED" in capsys.readouterr().out
    assert time.time() - started < 30


def test_the_driver_loads_the_heads_secrets_file_into_its_own_environment(tmp_path, monkeypatch, capsys):
    """VM clusters: the key is in a file on the head only; the job entrypoint loads it (names
    reported, never values), variables already set win, a file others can read is warned about."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("PROXYKD_TEST_OTHER", raising=False)
    monkeypatch.setenv("PROXYKD_TEST_SET", "kept")
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"# the teacher\nexport OPENAI_API_KEY='{SECRET}'\nPROXYKD_TEST_OTHER = \"b c\"\n"
                       "PROXYKD_TEST_SET=replaced\nnot a line\n")
    secrets.chmod(0o600)
    monkeypatch.setenv(jobs.SECRETS_FILE_ENV, str(secrets))
    assert jobs.load_secrets_file() == ["OPENAI_API_KEY", "PROXYKD_TEST_OTHER"]
    assert os.environ["OPENAI_API_KEY"] == SECRET and os.environ["PROXYKD_TEST_OTHER"] == "b c"
    assert os.environ["PROXYKD_TEST_SET"] == "kept"
    assert capsys.readouterr().err == ""
    secrets.chmod(0o644)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert jobs.load_secrets_file() == ["OPENAI_API_KEY"]
    assert "readable by other users" in capsys.readouterr().err
    assert jobs.load_secrets_file(str(tmp_path / "none.env")) == []
    # the entrypoint loads it before the command runs, and says which names (not the values)
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = _config(tmp_path)
    assert jobs.entry(["check", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "loaded OPENAI_API_KEY" in err and SECRET not in err
