"""The teacher stage in batch mode, against the local teacher's Files and Batches API through the
real `openai` client. No Ray: the batch loop runs on the driver."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import openai
import pytest

from conftest import free_port, tiny_config
from proxykd import artifacts, teacher, teacher_batch
from proxykd.config import TeacherConfig, parse_config
from proxykd.data import build_prompts, teacher_style_response
from proxykd.local_teacher import BatchFaults, Faults, LocalTeacher, lookup_key

FAST = {"mode": "batch", "batch_poll_s": 0.05, "batch_max_poll_s": 0.2, "progress_every_s": 0.5}


def _setup(tmp_path, monkeypatch, port, **teacher_cfg):
    monkeypatch.setenv("PROXYKD_TEST_KEY", "sk-test")
    cfg = parse_config(tiny_config(tmp_path / "run", teacher={
        "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "PROXYKD_TEST_KEY", **FAST, **teacher_cfg}))
    prompts, _ = build_prompts(cfg.data)
    table = {lookup_key(r["messages"]): teacher_style_response(r["reference"])
             for r in prompts.select(["messages", "reference"]).to_pylist()}
    table.update({teacher.completion_prompt(r["messages"]): teacher_style_response(r["reference"])
                  for r in prompts.select(["messages", "reference"]).to_pylist()})
    return cfg, prompts, table


def _stage(cfg, prompts):
    return teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)


def _unique(cfg, prompts):
    return len(set(teacher.request_keys(cfg.teacher, prompts)))


def _inputs(server):
    """The request lines of every batch the server got, batch by batch (in creation order)."""
    batches = sorted(server.batches.values(), key=lambda b: b["_n"])
    return [[json.loads(x) for x in server.files[b["input_file_id"]]["content"].splitlines()] for b in batches]


def _ledger(cfg):
    path = artifacts.stage_dir(cfg.run_dir, "teacher") / "batch" / "ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_batch_run_stores_the_online_rows_within_the_file_limits(tmp_path, monkeypatch, caplog):
    """Several files (request and byte limits), 5xx lines, cut lines and final answers: every prompt
    answered or rejected with its reason, nothing billed twice; a later online run buys nothing."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port, batch_max_requests=12, batch_max_bytes=3000,
                                 max_retries=4)
    folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    faults = Faults(seed=3, server_error=0.1, rate_limit=0.05, truncated_json=0.05, length=0.05)
    caplog.set_level(logging.INFO, logger="proxykd")
    with LocalTeacher(table, port=port, faults=faults, batch_faults=BatchFaults(in_progress_polls=2)) as server:
        m = _stage(cfg, prompts)
        unique = _unique(cfg, prompts)
        assert m["mode"] == "batch" and m["rows"]["failed"] == 0 and m["rows"]["not_asked"] == 0
        assert m["rows"]["ok"] + m["rows"]["rejected_answers"] == prompts.num_rows
        assert m["rows"]["rejected_answers"] >= 1 and m["rows"]["cut_off"] >= 1  # (length: final, stored)
        files = [server.files[b["input_file_id"]] for b in server.batches.values()]
        assert all(f["content"].count(b"\n") <= 12 and f["object"]["bytes"] <= 3000 for f in files)
        assert len(files) == m["batches"]["made"] >= 5 and m["requests"]["retries"] >= 1
        assert server.request_count == 0 and max(server.billed.values()) == 1
        assert "teacher (batch): batches running:" in caplog.text

        stored = teacher._stored(folder)
        errors = [e for e in stored["error"].to_pylist() if e]
        assert any(e.startswith(teacher.FINAL + "finish_reason=length") for e in errors)
        assert any(e.startswith(teacher.BILLED_ATTEMPT) for e in errors)  # a cut line: its worst case
        ok = teacher.responses(folder, teacher.request_keys(cfg.teacher, prompts))
        assert ok.num_rows + m["rows"]["rejected_answers"] == unique
        assert set(ok["model"].to_pylist()) == {"local-teacher"} and set(ok["finish_reason"].to_pylist()) == {"stop"}
        got = teacher.answers(cfg.teacher, prompts, folder)
        assert got.num_rows == m["rows"]["samples_ok"] == m["rows"]["ok"]
        assert not list(folder.glob("journal-*.jsonl")) and not list((folder / "batch").glob("b-*"))

        # A rerun asks nothing; an online run after it (manifest gone) buys nothing either.
        _stage(cfg, prompts)
        (folder / "manifest.json").unlink()
        cfg.teacher = cfg.teacher.model_copy(update={"mode": "online"})
        m2 = _stage(cfg, prompts)
        assert server.request_count == 0 and len(server.batches) == len(files)
        assert m2["responses_hash"] == m["responses_hash"]


def test_a_killed_stage_reattaches_to_its_batches_instead_of_buying_again(tmp_path, monkeypatch):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port, batch_max_requests=20)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        from proxykd import teacher
        from proxykd.config import RunConfig
        from proxykd.data import build_prompts
        cfg = RunConfig.model_validate_json(open({str(tmp_path / "cfg.json")!r}).read())
        prompts, _ = build_prompts(cfg.data)
        teacher.run(cfg.teacher, prompts, "p", cfg.run_dir)
    """))
    with LocalTeacher(table, port=port, batch_faults=BatchFaults(in_progress_s=2.0)) as server:
        proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, env=os.environ.copy(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while sum(e["event"] == "batch" for e in _ledger(cfg)) < 3:  # every batch made and on record
                assert proc.poll() is None, "the stage ended before it could be killed"
                assert time.time() < deadline
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        made = len(server.batches)
        assert made == 3 and all(b["status"] != "completed" for b in server.batches.values())

        m = _stage(cfg, prompts)
        assert len(server.batches) == made  # re-attached: no batch created again
        assert m["batches"] == {"made": 0, "reattached": 3, "ended": {"completed": 3}, "ids": []}
        assert m["rows"]["ok"] == prompts.num_rows and m["requests"]["requests"] == 0
        assert server.request_count == 0 and max(server.billed.values()) == 1
        assert sum(server.billed.values()) == _unique(cfg, prompts)


def test_a_batch_made_but_not_on_record_is_found_not_submitted_again(tmp_path, monkeypatch):
    """Killed between batches.create and its ledger line: the rerun finds the batch by its file."""
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    add = teacher_batch.Ledger.add

    def killed_before_the_batch_is_on_record(self, event, name, **fields):
        if event == "batch":
            raise KeyboardInterrupt
        add(self, event, name, **fields)

    with LocalTeacher(table, port=port, batch_faults=BatchFaults(in_progress_polls=1)) as server:
        monkeypatch.setattr(teacher_batch.Ledger, "add", killed_before_the_batch_is_on_record)
        with pytest.raises(KeyboardInterrupt):
            _stage(cfg, prompts)
        monkeypatch.setattr(teacher_batch.Ledger, "add", add)
        assert len(server.batches) == 1 and [e["event"] for e in _ledger(cfg)] == ["file"]
        m = _stage(cfg, prompts)
        assert len(server.batches) == 1 and m["rows"]["ok"] == prompts.num_rows
        assert [e["event"] for e in _ledger(cfg)] == ["file", "batch", "done"]
        assert m["batches"]["reattached"] == 1 and max(server.billed.values()) == 1


def test_failed_and_expired_batches_resubmit_only_their_unanswered_requests(tmp_path, monkeypatch):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port, max_retries=2)
    bf = BatchFaults(fail_first=1, expire_first=1, answered_before_stop=0.5)
    with LocalTeacher(table, port=port, batch_faults=bf) as server:
        m = _stage(cfg, prompts)
        unique = _unique(cfg, prompts)
        failed, expired, last = _inputs(server)
        assert len(failed) == len(expired) == unique  # failed validation: all of them again
        assert len(last) == unique - unique // 2  # only what the expired one did not answer
        assert not {x["custom_id"] for x in last} & {x["custom_id"] for x in expired[: unique // 2]}
        assert m["batches"]["ended"] == {"failed": 1, "expired": 1, "completed": 1}
        assert m["rows"]["ok"] == prompts.num_rows and max(server.billed.values()) == 1


def test_a_cancelled_batch_keeps_its_answers_and_the_rest_are_asked_on_the_next_run(tmp_path, monkeypatch):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port)
    with LocalTeacher(table, port=port, batch_faults=BatchFaults(in_progress_s=1.0)) as server:
        result = {}
        stage = threading.Thread(target=lambda: result.update(m=_stage(cfg, prompts)))
        stage.start()
        deadline = time.time() + 30
        while not server.batches:
            assert time.time() < deadline
            time.sleep(0.02)
        with openai.OpenAI(base_url=server.base_url, api_key="x") as client:
            assert client.batches.cancel(next(iter(server.batches))).status == "cancelling"
        stage.join(60)
        m, unique = result["m"], _unique(cfg, prompts)
        assert len(server.batches) == 1 and m["batches"]["ended"] == {"cancelled": 1}
        answered = teacher.responses(artifacts.stage_dir(cfg.run_dir, "teacher")).num_rows
        assert answered == unique // 2 and m["rows"]["failed"] > 0
        errors = teacher._stored(artifacts.stage_dir(cfg.run_dir, "teacher"))["error"].to_pylist()
        assert sum("cancelled" in (e or "") for e in errors) == unique - answered

        m2 = _stage(cfg, prompts)  # the next run asks only those
        assert len(_inputs(server)[1]) == unique - answered
        assert m2["rows"]["ok"] == prompts.num_rows and max(server.billed.values()) == 1


def test_the_budget_stops_before_a_batch_could_exceed_it(tmp_path, monkeypatch):
    port = free_port()
    # $1 per completion token online, $0.50 in a batch; a request's worst case is 8 tokens = $4.
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port, max_tokens=8,
                                 price_per_million_completion_tokens=1e6, max_cost=41.0)
    with LocalTeacher(table, port=port) as server:
        m = _stage(cfg, prompts)
        inputs = _inputs(server)
        assert len(inputs[0]) == 10  # 10 worst cases fit $41, 11 do not
        assert "teacher.max_cost=41.0 reached" in m["budget"]["stopped"]
        assert m["rows"]["not_asked"] > 0 and m["rows"]["failed"] == 0
        # Answers are 4 words: $2 each at the batch price, all counted at it.
        bought = sum(server.samples_billed.values())
        assert m["cost"]["all_stored"] == pytest.approx(0.5 * sum(
            teacher._stored(artifacts.stage_dir(cfg.run_dir, "teacher"))["completion_tokens"].to_pylist()))
        assert m["cost"]["all_stored"] <= 41.0 and 41.0 - m["cost"]["all_stored"] < 4.0 + 2.0
        assert bought == sum(len(x) for x in inputs) < _unique(cfg, prompts)

        cfg.teacher = cfg.teacher.model_copy(update={"max_cost": 1000.0})
        m2 = _stage(cfg, prompts)  # a higher budget buys the rest, nothing twice
        assert m2["rows"]["ok"] == prompts.num_rows and m2["budget"]["stopped"] is None
        assert max(server.billed.values()) == 1


def test_empty_samples_of_an_n_sample_request_are_asked_again_alone_on_completions(tmp_path, monkeypatch):
    port = free_port()
    cfg, prompts, table = _setup(tmp_path, monkeypatch, port, n=2, endpoint="completions", max_retries=5)
    with LocalTeacher(table, port=port, faults=Faults(seed=0, empty_sample=0.3)) as server:
        m = _stage(cfg, prompts)
        first, *again = _inputs(server)
        assert first[0]["url"] == "/v1/completions" and first[0]["body"]["n"] == 2
        assert again and all(x["body"]["n"] == 1 for batch in again for x in batch)
        assert m["rows"]["ok"] == prompts.num_rows and m["rows"]["samples_ok"] == 2 * prompts.num_rows


def test_batch_knobs_are_operational_and_batch_prices_default_to_the_discount():
    base = TeacherConfig(price_per_million_prompt_tokens=2.0, price_per_million_completion_tokens=8.0)
    batch = base.model_copy(update={"mode": "batch", "batch_max_requests": 10, "batch_discount": 0.25,
                                    "batch_poll_s": 1.0})
    assert teacher.config_hash(base, "p") == teacher.config_hash(batch, "p")
    assert teacher.batch_cost(batch, 1e6, 1e6) == pytest.approx(0.25 * 10.0)
    assert teacher.batch_cost(base, 1e6, 1e6) == pytest.approx(0.5 * 10.0)
    explicit = TeacherConfig(mode="batch", batch_price_per_million_completion_tokens=3.0, max_cost=1.0)
    assert teacher.batch_cost(explicit, 1e6, 1e6) == pytest.approx(3.0)  # (and max_cost is allowed)
    with pytest.raises(ValueError):
        TeacherConfig(mode="online", batch_price_per_million_completion_tokens=3.0, max_cost=1.0)


def test_the_local_batch_api_through_the_openai_client():
    """What the stage relies on: upload, a batch in_progress for N polls, output and error files
    in the provider's line format, cut lines, cancel, list, and a file that fails validation."""
    line = lambda i, url="/v1/chat/completions": json.dumps({  # noqa: E731
        "custom_id": f"r{i}", "method": "POST", "url": url,
        "body": {"model": "local-teacher", "messages": [{"role": "user", "content": "hi"}]}})
    faults, bf = Faults(seed=0, server_error=0.3), BatchFaults(in_progress_polls=2, malformed_line=0.2)
    with LocalTeacher({"hi": "hello there"}, faults=faults, batch_faults=bf) as server, \
            openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        file = client.files.create(file=("in.jsonl", "\n".join(map(line, range(20))).encode()), purpose="batch")
        assert file.purpose == "batch" and client.files.retrieve(file.id).bytes == file.bytes
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert [client.batches.retrieve(batch.id).status for _ in range(3)] == ["in_progress"] * 2 + ["completed"]
        batch = client.batches.retrieve(batch.id)
        out = client.files.content(batch.output_file_id).text.splitlines()
        err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
        readable = [json.loads(x) for x in out if x.endswith("}")]
        assert batch.request_counts.total == 20 == len(out) + len(err) and 0 < len(readable) < len(out)
        assert {x["response"]["body"]["choices"][0]["message"]["content"] for x in readable} == {"hello there"}
        assert err and {x["response"]["status_code"] for x in err} <= {500}
        assert batch.usage.output_tokens == 2 * len(out)
        assert sum(server.billed.values()) == len(readable) and server.request_count == 0

        other = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert client.batches.cancel(other.id).status == "cancelling"
        assert client.batches.retrieve(other.id).status == "cancelled"
        assert [b.id for b in client.batches.list(limit=1).data] == [other.id]  # newest first
        assert [b.id for b in client.batches.list(limit=1, after=other.id).data] == [batch.id]

        wrong = client.files.create(file=("w.jsonl", line(0, url="/v1/completions").encode()), purpose="batch")
        failed = client.batches.create(input_file_id=wrong.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        failed = client.batches.retrieve(failed.id)
        assert failed.status == "failed" and failed.errors.data[0].code == "mismatched_endpoint"
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
