"""The teacher stage against the local OpenAI-compatible teacher, on a real local Ray."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import free_port, kill_ray_session, tiny_config
from proxykd import artifacts, teacher
from proxykd.config import TeacherConfig, parse_config
from proxykd.data import build_prompts, teacher_style_response
from proxykd.encode import join_teacher
from proxykd.local_teacher import Faults, LocalTeacher, lookup_key

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


def _unique(cfg, prompts):
    """Distinct requests: prompts with the same messages share one (the tiny arithmetic set has some)."""
    return len(set(teacher.request_keys(cfg.teacher, prompts)))


def _counts(manifest):
    return {k: manifest["rows"][k] for k in ("asked", "ok", "failed")}


def test_failed_calls_are_recorded_then_retried_once(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    asked, unique = prompts.num_rows, _unique(cfg, prompts)
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")

    # Nothing listens on the port: every call fails, and the stage still finishes with error rows.
    m1 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
    assert _counts(m1) == {"asked": unique, "ok": 0, "failed": asked}
    errors = artifacts.read_shards(folder)["error"].to_pylist()
    assert all(e and "Connection" in e for e in errors)
    assert teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts)).num_rows == 0

    with LocalTeacher(table, port=port) as server:
        m2 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == unique  # only the failed ones were asked again
        assert m2["responses_hash"] != m1["responses_hash"]  # downstream stages see the change
        assert _counts(m2) == {"asked": unique, "ok": asked, "failed": 0}
        ok = teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts))
        assert ok.num_rows == unique and len(set(ok["id"].to_pylist())) == unique
        got = teacher.answers(cfg.teacher, prompts, folder)
        assert sorted(got["id"].to_pylist()) == sorted(prompts["id"].to_pylist())
        row = ok.to_pylist()[0]
        assert row["response"].startswith("The answer is ")
        assert row["model"] == "local-teacher" and row["finish_reason"] == "stop"
        assert row["completion_tokens"] > 0 and len(row["request_key"]) == 64 and row["error"] is None
        assert set(ok.column_names) == set(teacher.TEACHER_SCHEMA.names)

        # Done: a rerun is skipped and sends nothing.
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == unique

        # Killed part-way: drop the manifest and half the shards' rows; only those are asked again.
        (folder / "manifest.json").unlink()
        files = artifacts.shard_files(folder)
        ok_files = [f for f in files if pq.read_table(f, columns=["error"])["error"].null_count]
        victim = ok_files[0]
        lost = pq.read_metadata(victim).num_rows
        victim.write_bytes(victim.read_bytes()[:100])  # a shard cut short by the kill
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == unique + lost
        assert teacher.responses(folder).num_rows == unique

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
        assert server.request_count == _unique(cfg, first)
        m = teacher.run(cfg.teacher, prompts, "hash-b", cfg.run_dir)
        assert server.request_count == _unique(cfg, prompts)
        assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["asked"] == _unique(cfg, prompts) - _unique(cfg, first)


def test_request_key_depends_on_request_only():
    msgs = [{"role": "user", "content": "hi"}]
    params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
    k = teacher.request_key("m", msgs, params)
    assert k == teacher.request_key("m", json.loads(json.dumps(msgs)), dict(reversed(params.items())))
    assert k != teacher.request_key("m2", msgs, params)
    assert k != teacher.request_key("m", msgs, {**params, "temperature": 0.5})
    assert k != teacher.request_key("m", msgs, params, sample_index=1)


# ------------------------------------------------------------------ against a faulty teacher

FAULTY = Faults(latency_s=0.02, rate_limit=0.05, retry_after_s=0.2, server_error=0.05, timeout=0.03,
                hang_s=1.5, truncated_json=0.04, empty_content=0.03, seed=7)  # 20% of requests fail


def test_every_prompt_answered_through_20_percent_faults_none_billed_twice(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={
        "max_retries": 10, "timeout_s": 0.6, "backoff_s": 0.05, "max_backoff_s": 0.5,
        "concurrency": 8, "num_actors": 2, "progress_every_s": 0.5})
    with LocalTeacher(table, port=port, faults=FAULTY) as server:
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        faults = sum(server.fault_counts.values())
        assert faults > 0 and server.fault_counts["rate_limit"] and server.fault_counts["timeout"]
        assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["failed"] == 0
        # Every fault cost exactly one retry, and the manifest counts what the server saw.
        assert m["requests"]["requests"] == server.request_count == _unique(cfg, prompts) + faults
        assert m["requests"]["retries"] == faults
        assert m["requests"]["rate_limited"] == server.fault_counts["rate_limit"]
        # Each prompt billed (answered cleanly) exactly once.
        assert len(server.billed) == _unique(cfg, prompts) and max(server.billed.values()) == 1
        ok = teacher.responses(artifacts.stage_dir(cfg.run_dir, "teacher"))
        assert ok.num_rows == _unique(cfg, prompts)
        assert m["tokens"]["completion"] == sum(len(r.split()) for r in ok["response"].to_pylist())

        # Operational settings are not part of what was bought: nothing is asked again.
        before = server.request_count
        cfg.teacher = cfg.teacher.model_copy(update={"concurrency": 2, "num_actors": 1, "requests_per_minute": 100,
                                                     "price_per_million_prompt_tokens": 3.0, "max_retries": 1})
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == before


def test_no_stored_response_is_asked_again_after_kill_9(tmp_path, monkeypatch, local_ray):
    """A separate process runs the stage against this process's teacher and is killed (with its
    whole Ray) part-way; the rerun sends no request whose answer had been stored."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import ray
        from proxykd import teacher
        from proxykd.config import RunConfig
        from proxykd.data import build_prompts
        cfg = RunConfig.model_validate_json(open({str(tmp_path / "cfg.json")!r}).read())
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        open({str(tmp_path / "session")!r}, "w").write(ray._private.worker._global_node.get_session_dir_path())
        prompts, _ = build_prompts(cfg.data)
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
    """))
    slow = Faults(latency_s=0.15, seed=1)
    with LocalTeacher(table, port=port, faults=slow) as server:
        proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, env=os.environ.copy(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while sum(server.billed.values()) < 15:
                assert proc.poll() is None, "the stage ended before it could be killed"
                assert time.time() < deadline
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if (tmp_path / "session").exists():
                kill_ray_session((tmp_path / "session").read_text())
        time.sleep(0.5)  # let answers to the dead client finish on the server
        assert not (folder / "manifest.json").exists()
        stored = teacher.compact_journals(folder)
        stored_prompts = {lookup_key(m) for m in teacher.responses(folder)["messages"].to_pylist()}
        unique = _unique(cfg, prompts)
        assert 0 < stored == len(stored_prompts) < unique
        received_before = server.received.copy()

        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        asked_again = server.received - received_before
        assert not set(asked_again) & stored_prompts
        assert sum(asked_again.values()) == unique - stored
        assert m["rows"]["ok"] == prompts.num_rows
        assert teacher.responses(folder).num_rows == unique


def test_requests_per_minute_is_held_across_actors(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={"requests_per_minute": 600, "num_actors": 2, "concurrency": 8})
    with LocalTeacher(table, port=port) as server:
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        t = server.arrivals
        rate = (len(t) - 1) / (t[-1] - t[0])
        assert len(t) == _unique(cfg, prompts) and 0.85 * 10 < rate <= 1.05 * 10, rate
        # No 3-second window holds over 5% more than the limit allows (plus the one at its edge;
        # arrivals are stamped by this busy process's server thread, which adds its own jitter).
        assert max(sum(1 for b in t if a <= b < a + 3.0) for a in t) <= 1.05 * 30 + 1


def test_budget_stops_the_stage_cleanly_and_keeps_what_was_bought(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    # $1 per completion token (a "word" on the local teacher); each answer is 4 words.
    cfg.teacher = cfg.teacher.model_copy(update={"max_tokens": 8, "price_per_million_completion_tokens": 1e6,
                                                 "max_cost": 60.0, "concurrency": 4})
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    with LocalTeacher(table, port=port) as server:
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        bought = server.request_count
        assert m["budget"]["stopped"] and "max_cost" in m["budget"]["stopped"]
        assert 0 < bought < _unique(cfg, prompts)
        assert m["cost"]["all_stored"] <= 60.0 and m["cost"]["this_run"] == m["cost"]["all_stored"]
        assert m["cost"]["all_stored"] == m["tokens"]["completion"] * 1.0
        assert m["rows"]["not_asked"] > 0 and m["rows"]["failed"] == 0
        assert m["rows"]["ok"] + m["rows"]["not_asked"] == prompts.num_rows
        assert teacher.responses(folder).num_rows == bought

        # A bigger budget buys only the rest.
        cfg.teacher = cfg.teacher.model_copy(update={"max_cost": 10_000.0})
        m2 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == _unique(cfg, prompts)
        assert m2["rows"]["ok"] == prompts.num_rows and not m2["budget"]["stopped"]
        assert m2["cost"]["all_stored"] > m["cost"]["all_stored"]


def test_n_samples_on_the_completions_endpoint(tmp_path, local_ray):
    cfg = parse_config(tiny_config(tmp_path / "run", teacher={"n": 3, "endpoint": "completions"}))
    prompts, _ = build_prompts(cfg.data)
    m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)  # the embedded local teacher
    assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["samples_ok"] == 3 * prompts.num_rows
    # one request per distinct prompt buys its 3 samples
    assert m["requests"]["requests"] == _unique(cfg, prompts) // 3
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    ok = teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts))
    assert sorted(ok["sample_index"].to_pylist()) == sorted([0, 1, 2] * (ok.num_rows // 3))
    assert len(set(ok["request_key"].to_pylist())) == ok.num_rows == _unique(cfg, prompts)
    assert all(r.startswith("The answer is") for r in ok["response"].to_pylist())
    # usage is split over the samples so sums are exact: the prompt is counted once per request
    by_id = {}
    for r in ok.to_pylist():
        by_id.setdefault(r["id"], []).append(r)
    assert all(sum(bool(r["prompt_tokens"]) for r in rows) == 1 for rows in by_id.values())
    rows, rejected = join_teacher(prompts, teacher.answers(cfg.teacher, prompts, folder), "student")
    pid = prompts.filter(pc.equal(prompts["split"], "student"))["id"][0].as_py()
    assert {pid, f"{pid}#1", f"{pid}#2"} <= set(rows["id"].to_pylist()) and not rejected


def test_bad_prompts_are_rejected_before_any_call(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={"max_prompt_tokens": 40})
    good = [prompts.slice(0, 5).to_pylist()[i] for i in range(5)]
    assert _unique(cfg, prompts.slice(0, 5)) == 5
    bad = [
        {**good[0], "id": "empty", "messages": [{"role": "user", "content": "   "}]},
        {**good[0], "id": "long", "messages": [{"role": "user", "content": "word " * 200}]},
        {**good[0], "id": "robot", "messages": [{"role": "robot", "content": "beep"}]},
    ]
    table_in = pa.Table.from_pylist(good + bad, schema=prompts.schema)
    with LocalTeacher(table, port=port) as server:
        m = teacher.run(cfg.teacher, table_in, "p", cfg.run_dir)
        assert server.request_count == 5
    assert m["rows"]["rejected"] == 3 and m["rows"]["ok"] == 5 and m["rows"]["failed"] == 0
    rejected = {r["id"]: r["error"] for r in pq.read_table(
        artifacts.stage_dir(cfg.run_dir, "teacher") / "rejected.parquet").to_pylist()}
    assert rejected.keys() == {"empty", "long", "robot"}
    assert "empty" in rejected["empty"] and "over-long" in rejected["long"] and "malformed" in rejected["robot"]


def test_a_wrong_model_name_stops_the_stage_at_once(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={"model": "gpt-nonexistent", "max_retries": 5})
    with LocalTeacher(table, port=port) as server, pytest.raises(Exception, match="refuses this setup"):
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
    assert server.request_count <= cfg.teacher.concurrency * 2  # not one request per prompt, no retries


# ------------------------------------------------------------------------- pure parts


def test_governor_spaces_requests_and_reserves_the_budget():
    g = teacher.Governor(TeacherConfig(requests_per_minute=120, max_cost=1.0,
                                       price_per_million_completion_tokens=1e5).model_dump())
    now = time.time()
    waits = [g.acquire(10, 0.3) - now for _ in range(3)]
    assert waits[0] == pytest.approx(0, abs=0.01)
    assert waits[1] == pytest.approx(0.5, abs=0.01) and waits[2] == pytest.approx(1.0, abs=0.01)
    assert g.acquire(10, 0.3) is None  # 3 × 0.3 reserved + 0.3 > 1.0
    assert g.status()["stopped"] and g.acquire(0, 0.0) is None  # stays stopped
    g2 = teacher.Governor(TeacherConfig(max_cost=1.0, price_per_million_completion_tokens=1e5).model_dump())
    assert g2.acquire(10, 0.6) == pytest.approx(time.time(), abs=0.01)
    g2.settle(10, 0.6, 0, 2)  # really cost 2 × 0.1 = 0.2: the rest of the reservation is freed
    assert g2.status()["spent_cost"] == pytest.approx(0.2) and g2.acquire(10, 0.6) is not None
    assert teacher.needs_governor(TeacherConfig(max_cost=1.0)) and not teacher.needs_governor(TeacherConfig())


def test_governor_tokens_per_minute_and_pause():
    g, now = teacher.Governor(TeacherConfig(tokens_per_minute=600).model_dump()), time.time()
    assert g.acquire(100, 0) - now == pytest.approx(0, abs=0.01)
    assert g.acquire(100, 0) - now == pytest.approx(10.0, abs=0.01)  # 100 tokens at 10 tokens/s
    g.settle(100, 0, 20, 30)  # used 50 of the 100 reserved: 5 s of spacing given back
    assert g.acquire(100, 0) - now == pytest.approx(15.0, abs=0.01)
    g, now = teacher.Governor(TeacherConfig().model_dump()), time.time()
    g.pause(2.0)
    assert g.acquire(1, 0) - now == pytest.approx(2.0, abs=0.05)


def test_backoff_retry_after_and_prompt_checks():
    rng = random.Random(0)
    for attempt in range(8):
        d = min(30.0, 0.5 * 2**attempt)
        assert all(d / 2 <= teacher.backoff_s(attempt, 0.5, 30.0, rng) <= d for _ in range(50))
    assert teacher.retry_after_s({"retry-after": "3"}) == 3.0
    assert teacher.retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert teacher.retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert teacher.retry_after_s({}) is None
    assert teacher.estimate_tokens([{"role": "user", "content": "abcdefgh"}]) == 2 + 4
    ok = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert teacher.prompt_problem(ok, 100) is None
    assert "malformed" in teacher.prompt_problem([], 100)
    assert "malformed" in teacher.prompt_problem([{"role": "user", "content": None}], 100)
    assert "empty" in teacher.prompt_problem([{"role": "system", "content": "x"}], 100)
    assert "over-long" in teacher.prompt_problem(ok, 5)
    assert teacher.completion_prompt(ok) == "be brief\n\n2+2?"
    k = [teacher.request_key("m", ok, teacher.sampling_params(TeacherConfig(endpoint=e))) for e in ("chat", "completions")]
    assert k[0] != k[1]
