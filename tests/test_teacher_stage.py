"""The teacher stage against the local OpenAI-compatible teacher, on a real local Ray."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import free_port, tiny_config
from proxykd import artifacts, teacher
from proxykd.config import parse_config
from proxykd.data import build_prompts, teacher_style_response
from proxykd.local_teacher import LocalTeacher, lookup_key

SECRET = "sk-test-SECRET-do-not-log-1234567890"


def _setup(tmp_path, monkeypatch, port):
    monkeypatch.setenv("PROXYKD_TEST_KEY", SECRET)
    cfg = parse_config(tiny_config(tmp_path / "run", teacher={
        "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "PROXYKD_TEST_KEY",
        "max_retries": 0, "timeout_s": 5, "concurrency": 4}))
    prompts, _ = build_prompts(cfg.data)
    table = {lookup_key(r["messages"]): teacher_style_response(r["reference"])
             for r in prompts.select(["messages", "reference"]).to_pylist()}
    return cfg, prompts, table


def test_failed_calls_are_recorded_then_retried_once(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    asked = prompts.num_rows
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")

    # Nothing listens on the port: every call fails, and the stage still finishes with error rows.
    m1 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
    assert m1["rows"] == {"asked": asked, "ok": 0, "failed": asked}
    errors = artifacts.read_shards(folder)["error"].to_pylist()
    assert all(e and "Connection" in e for e in errors)
    assert teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts)).num_rows == 0

    with LocalTeacher(table, port=port) as server:
        m2 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == asked  # only the failed ones were asked again
        assert m2["responses_hash"] != m1["responses_hash"]  # downstream stages see the change
        assert m2["rows"] == {"asked": asked, "ok": asked, "failed": 0}
        ok = teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts))
        assert ok.num_rows == asked and len(set(ok["id"].to_pylist())) == asked
        row = ok.to_pylist()[0]
        assert row["response"].startswith("The answer is ")
        assert row["model"] == "local-teacher" and row["finish_reason"] == "stop"
        assert row["completion_tokens"] > 0 and len(row["request_key"]) == 64 and row["error"] is None
        assert set(ok.column_names) == set(teacher.TEACHER_SCHEMA.names)

        # Done: a rerun is skipped and sends nothing.
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == asked

        # Killed part-way: drop the manifest and half the shards' rows; only those are asked again.
        (folder / "manifest.json").unlink()
        files = artifacts.shard_files(folder)
        ok_files = [f for f in files if pq.read_table(f, columns=["error"])["error"].null_count]
        victim = ok_files[0]
        lost = pq.read_metadata(victim).num_rows
        victim.write_bytes(victim.read_bytes()[:100])  # a shard cut short by the kill
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == asked + lost
        assert teacher.responses(folder).num_rows == asked

    # The API key never lands in an artifact, a manifest or Ray's logs.
    import ray

    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in [*folder.rglob("*"), *session_logs.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_real_endpoint_without_its_key_fails_before_any_call(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYKD_TEST_KEY", raising=False)
    cfg = parse_config(tiny_config(tmp_path / "run", teacher={
        "base_url": "http://127.0.0.1:9/v1", "api_key_env": "PROXYKD_TEST_KEY"}))
    prompts, _ = build_prompts(cfg.data)
    with pytest.raises(teacher.MissingAPIKey, match="PROXYKD_TEST_KEY"):
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)


def test_stored_answers_survive_a_new_prompt_set(tmp_path, monkeypatch, local_ray):
    """Adding prompts (a new prompt hash) asks only the new ones: stored answers are matched by
    request_key, not thrown away with the old config."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    first = prompts.slice(0, 30)
    with LocalTeacher(table, port=port) as server:
        teacher.run(cfg.teacher, first, "hash-a", cfg.run_dir)
        assert server.request_count == 30
        m = teacher.run(cfg.teacher, prompts, "hash-b", cfg.run_dir)
        assert server.request_count == prompts.num_rows
        assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["asked"] == prompts.num_rows - 30


def test_request_key_depends_on_request_only():
    msgs = [{"role": "user", "content": "hi"}]
    params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
    k = teacher.request_key("m", msgs, params)
    assert k == teacher.request_key("m", json.loads(json.dumps(msgs)), dict(reversed(params.items())))
    assert k != teacher.request_key("m2", msgs, params)
    assert k != teacher.request_key("m", msgs, {**params, "temperature": 0.5})
    assert k != teacher.request_key("m", msgs, params, sample_index=1)
