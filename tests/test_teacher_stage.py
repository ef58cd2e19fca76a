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
        cut = victim.read_bytes()[:100]
        victim.write_bytes(cut)  # a shard cut short by the kill
        m3 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == unique + lost
        assert teacher.responses(folder).num_rows == unique
        # The reader never deleted it: it is kept, byte for byte, and reported.
        kept = [p for p in folder.iterdir() if p.name.startswith(victim.name + ".unreadable-")]
        assert len(kept) == 1 and kept[0].read_bytes() == cut and m3["quarantined"] == [kept[0].name]

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
        # 10 a second: the sends are 0.1 s apart, so the arrivals span (n - 1) · 0.1 s, less the
        # lateness of the first one's stamp (this busy process's server thread stamps them; under
        # load it ran 0.4 s late, and a plain mean rate read 11.1 a second), and not much more.
        span = t[-1] - t[0]
        assert len(t) == _unique(cfg, prompts) and (len(t) - 1) * 0.1 - 0.5 <= span < (len(t) - 1) / (0.85 * 10), span
        # No 3-second window holds more than the sends of 3.5 s (the same 0.5 s of stamp lateness,
        # which can crowd arrivals sent apart into one window), plus the one at its edge. Without
        # the governor all of them arrive within about a second.
        assert max(sum(1 for b in t if a <= b < a + 3.0) for a in t) <= 35 + 1


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


def test_a_run_mixing_both_modes_counts_each_answer_at_the_price_it_was_bought_at(tmp_path, monkeypatch, local_ray):
    """Half the prompts bought in batch mode ($0.50 per completion token), the rest online ($1):
    the online run's budget and its all-stored cost take the batch answers at the batch price."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={
        "mode": "batch", "batch_poll_s": 0.05, "batch_max_poll_s": 0.2, "max_tokens": 8,
        "price_per_million_completion_tokens": 1e6, "concurrency": 1, "num_actors": 1})
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    with LocalTeacher(table, port=port) as server:
        half = prompts.slice(0, prompts.num_rows // 2)
        m1 = teacher.run(cfg.teacher, half, "half", cfg.run_dir)
        bought_in_batch = len(server.billed)
        assert m1["mode"] == "batch" and m1["rows"]["ok"] == half.num_rows and server.request_count == 0
        assert set(teacher._stored(folder)["completion_tokens"].to_pylist()) == {4}  # (4 words an answer)
        assert m1["cost"]["this_run"] == m1["cost"]["all_stored"] == 0.5 * 4 * bought_in_batch

        # Online, the rest: a budget that fits only with the batch answers at their own price (the
        # last request reserves its worst case, 8 tokens, on top of what is spent).
        rest = _unique(cfg, prompts) - bought_in_batch
        assert 0 < rest < _unique(cfg, prompts)
        budget = m1["cost"]["all_stored"] + 4.0 * rest + 6.0
        assert budget < 4.0 * (bought_in_batch + rest)  # (the batch answers at the online price: over it)
        cfg.teacher = cfg.teacher.model_copy(update={"mode": "online", "max_cost": budget})
        m2 = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert m2["budget"]["stopped"] is None and m2["rows"]["ok"] == prompts.num_rows
        assert server.request_count == rest and max(server.billed.values()) == 1
        assert m2["cost"]["this_run"] == 4.0 * rest
        assert m2["cost"]["all_stored"] == pytest.approx(m1["cost"]["all_stored"] + m2["cost"]["this_run"])
        assert m2["tokens"]["all_stored"] == m1["tokens"]["all_stored"] + m2["tokens"]["this_run"]


def test_timeouts_and_dropped_connections_are_counted_at_their_worst_case(tmp_path, monkeypatch, local_ray):
    """The provider may bill a request whose answer never arrived, so the budget counts it at the
    worst case it reserved for it: with every call lost, $30 buys 3 tries of $8, not endless free ones."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    prompts = prompts.slice(0, 8)
    # $1 per completion token, 8 tokens at most: $8 a call at worst (prompt tokens are free).
    cfg.teacher = cfg.teacher.model_copy(update={
        "max_tokens": 8, "price_per_million_completion_tokens": 1e6, "max_cost": 30.0, "max_retries": 5,
        "timeout_s": 0.5, "backoff_s": 0.05, "max_backoff_s": 0.1, "concurrency": 4})
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    with LocalTeacher(table, port=port, faults=Faults(timeout=0.5, hang_s=2.0, dropped=0.5, seed=3)) as server:
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.request_count == 3 and not server.billed
        assert server.fault_counts["timeout"] and server.fault_counts["dropped"]
        assert "max_cost" in m["budget"]["stopped"]
        assert m["cost"]["this_run"] == m["cost"]["all_stored"] == 24.0
        stored = teacher._stored(folder)
        billed = [e for e in stored["error"].to_pylist() if e and e.startswith(teacher.BILLED_ATTEMPT)]
        assert len(billed) == 3 and all("worst case" in e for e in billed)
        # The next run's budget starts from what is stored: nothing more can be tried.
        m2 = teacher.run(cfg.teacher, prompts, "p2", cfg.run_dir)
        assert server.request_count == 3 and m2["cost"]["all_stored"] == 24.0 and m2["budget"]["stopped"]


def test_final_answers_are_rejected_with_their_reason_and_never_asked_again(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    cfg.teacher = cfg.teacher.model_copy(update={"max_retries": 3, "backoff_s": 0.05})
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    faults = Faults(length=0.15, content_filter=0.1, refusal=0.15, seed=5)
    with LocalTeacher(table, port=port, faults=faults) as server:
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        finals = sum(server.fault_counts[f] for f in ("length", "content_filter", "refusal"))
        assert finals and server.request_count == _unique(cfg, prompts)  # none asked twice
        assert max(server.billed.values()) == 1
        rejected = {r["id"]: r["error"] for r in pq.read_table(folder / "rejected.parquet").to_pylist()}
        by_reason = {f: sum(f in e for e in rejected.values()) for f in ("length", "content_filter", "refused")}
        # (prompts with identical messages share a request, so each final answer rejects >= 1 id)
        assert by_reason["length"] >= server.fault_counts["length"] and by_reason["refused"] >= server.fault_counts["refusal"]
        assert by_reason["content_filter"] >= server.fault_counts["content_filter"]
        assert m["rows"]["rejected_answers"] == len(rejected) and m["rows"]["failed"] == m["rows"]["not_asked"] == 0
        assert m["rows"]["ok"] + len(rejected) == prompts.num_rows
        assert m["rows"]["cut_off"] == by_reason["length"]
        # never trained on: later stages read `answers`, which has none of them
        assert not set(teacher.answers(cfg.teacher, prompts, folder)["id"].to_pylist()) & rejected.keys()
        # and never bought again, even by a run that is not skipped (other prompts hash)
        m2 = teacher.run(cfg.teacher, prompts, "p2", cfg.run_dir)
        assert server.request_count == _unique(cfg, prompts) and m2["rows"]["asked"] == 0
        assert m2["rows"]["rejected_answers"] == len(rejected)


def test_one_empty_sample_does_not_buy_the_good_ones_again(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    prompts = prompts.slice(0, 20)
    cfg.teacher = cfg.teacher.model_copy(update={"n": 3, "max_retries": 8, "backoff_s": 0.02, "max_backoff_s": 0.05})
    with LocalTeacher(table, port=port, faults=Faults(empty_sample=0.4, seed=2)) as server:
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.fault_counts["empty_sample"] >= 3
        assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["samples_ok"] == 3 * prompts.num_rows
        # every distinct prompt bought exactly its 3 samples: a retry asks only for the empty one
        assert set(server.samples_billed.values()) == {3} and len(server.samples_billed) == _unique(cfg, prompts) // 3


def test_retry_after_is_capped_and_insufficient_quota_stops_the_stage(tmp_path, monkeypatch, local_ray):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    prompts = prompts.slice(0, 20)
    cfg.teacher = cfg.teacher.model_copy(update={"max_retries": 10, "max_backoff_s": 0.2, "concurrency": 4})
    # A server asking for a minute's pause gets max_backoff_s.
    with LocalTeacher(table, port=port, faults=Faults(rate_limit=0.3, retry_after_s=60, seed=4)) as server:
        started = time.monotonic()
        m = teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
        assert server.fault_counts["rate_limit"] >= 3 and m["rows"]["ok"] == prompts.num_rows
        assert time.monotonic() - started < 30
    # Out of credit: every request would get it, so the stage stops at once, nothing retried.
    cfg.teacher = cfg.teacher.model_copy(update={"max_retries": 5})
    with LocalTeacher(table, port=port, faults=Faults(insufficient_quota=1.0)) as server, pytest.raises(
            Exception, match="insufficient_quota"):
        teacher.run(cfg.teacher, prompts, "p", str(tmp_path / "run2"))
    assert server.request_count <= cfg.teacher.concurrency


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


def test_the_local_teacher_listens_where_every_node_reaches_it(tmp_path, monkeypatch, local_ray):
    """With `base_url: null` the caller actors may run on any node. On a local Ray the local teacher
    listens on 127.0.0.1; a run that joins a cluster (RAY_ADDRESS, as in a job, or `ray.address`)
    puts it on the address Ray knows the driver's node by (Ray turns a loopback node address into
    the machine's, 192.0.2.2 here), unless `teacher.local_host` says where. A Ray task reaches the
    teacher at the address it is given. One machine cannot show a second node, and tests listen on
    127.0.0.1 only: the cluster address is checked, not listened on."""
    import urllib.parse
    import urllib.request

    import ray

    from proxykd import pipeline

    cfg = parse_config(tiny_config(tmp_path / "run"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pipeline.local_teacher_host(cfg) == "127.0.0.1"
    node = ray.get_runtime_context().get_node_id()
    address = [n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node][0]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert pipeline.local_teacher_host(cfg) == teacher.driver_node_address() == address
    assert pipeline.local_teacher_host(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": "auto"})}))\
        == address
    pinned = parse_config(tiny_config(tmp_path / "run", teacher={"local_host": "127.0.0.1"}))
    assert pipeline.local_teacher_host(pinned) == "127.0.0.1"

    @ray.remote(num_cpus=0)
    def models(url):
        return json.loads(urllib.request.urlopen(f"{url}/models", timeout=10).read())["data"][0]["id"]

    prompts, _ = build_prompts(cfg.data)
    with teacher._local_teacher(prompts, "127.0.0.1") as server:
        assert urllib.parse.urlparse(server.base_url).hostname == "127.0.0.1"
        assert ray.get(models.remote(server.base_url)) == "local-teacher"


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
    assert teacher.needs_governor(TeacherConfig(max_cost=1.0, price_per_million_prompt_tokens=1.0))
    assert not teacher.needs_governor(TeacherConfig())


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


def test_max_cost_without_prices_is_refused_at_config_time(tmp_path):
    from proxykd.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.max_cost needs the provider's prices"):
        parse_config(tiny_config(tmp_path, teacher={"max_cost": 10.0}))
    with pytest.raises(ValueError, match="max_cost needs"):
        TeacherConfig(max_cost=10.0, price_per_million_prompt_tokens=0.0)
    assert TeacherConfig(max_cost=10.0, price_per_million_completion_tokens=2.0).max_cost == 10.0
    assert TeacherConfig(max_total_tokens=1000).max_total_tokens == 1000  # a token budget needs no prices


def test_sample_outcome():
    assert teacher.sample_outcome("The answer is 4.", "stop") == ("ok", None)
    assert teacher.sample_outcome("", "stop") == ("retry", "empty answer")
    assert teacher.sample_outcome("  \n", "stop") == ("retry", "empty answer")
    assert teacher.sample_outcome("The answer", "length") == (
        "final", "finish_reason=length (cut off at teacher.max_tokens)")
    assert teacher.sample_outcome("", "content_filter") == (
        "final", "finish_reason=content_filter (not a finished answer)")
    assert teacher.sample_outcome(None, "stop", "I can't help with that.") == (
        "final", "refused (content null, finish_reason=stop): I can't help with that.")
    assert teacher.sample_outcome(None, "content_filter") == ("final", "refused (content null, finish_reason=content_filter)")


# ------------------------------------------------------------------ nothing paid for is lost


def _journal_row(i, error=None):
    return {"id": f"p{i}", "sample_index": 0, "messages": [{"role": "user", "content": f"q{i}"}],
            "response": f"a{i}", "finish_reason": "stop", "model": "m", "prompt_tokens": 1, "completion_tokens": 2,
            "request_key": f"k{i}", "error": error}


def test_compact_journals_keeps_every_readable_line_and_quarantines_a_damaged_journal(tmp_path, monkeypatch):
    clean = tmp_path / "journal-a.jsonl"
    damaged = tmp_path / "journal-b.jsonl"
    clean.write_text(json.dumps(_journal_row(0)) + "\n")
    damaged_bytes = b"\n".join([json.dumps(_journal_row(1)).encode(), b'{"id": "p2", "respo\xff', b"", b"[1, 2]",
                                json.dumps(_journal_row(3)).encode(), json.dumps(_journal_row(4)).encode()[:30]])
    damaged.write_bytes(damaged_bytes)
    events = []
    real_fsync, real_unlink = os.fsync, Path.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (events.append(("unlink", str(self))),
                                                                real_unlink(self, *a, **k))[1])

    assert teacher.compact_journals(tmp_path) == 3
    stored = teacher._stored(tmp_path)
    assert sorted(stored["id"].to_pylist()) == ["p0", "p1", "p3"]
    assert not clean.exists() and not damaged.exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("journal-b.jsonl.unreadable-")]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged_bytes  # every byte, for a human
    # the shard was on disk before the clean journal went
    shard = next(str(p) for p in tmp_path.glob("part-*.parquet"))
    gone = events.index(("unlink", str(clean)))
    assert any(e[0] == "fsync" and e[1].endswith(".tmp") and Path(e[1]).name == f".{Path(shard).name}.tmp"
               for e in events[:gone])


def test_the_journal_is_fsynced_before_the_driver_counts_a_batch(tmp_path, monkeypatch):
    cfg = TeacherConfig(max_tokens=8, concurrency=4)
    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    prompts = pa.table({"id": [f"p{i}" for i in range(6)], "messages": messages})
    todo, _, _ = teacher._todo(cfg, prompts, teacher.request_keys(cfg, prompts), set())
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size)),
                                                  real_fsync(fd))[1])
    with LocalTeacher({f"question {i}": f"answer {i}" for i in range(6)}) as server:
        caller = teacher.TeacherCaller(server.base_url, cfg.model_dump(), None, None, str(tmp_path))
        out = caller(todo)  # (no Ray: the actor's class called directly)
    assert out["outcome"].to_pylist() == ["ok"] * 6
    journal = next(tmp_path.glob("journal-*.jsonl"))
    size = journal.stat().st_size
    assert size > 0 and (str(journal), size) in synced  # all six lines on disk when the batch returned
