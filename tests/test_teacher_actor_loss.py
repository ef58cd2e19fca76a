"""A TeacherCaller actor killed mid-stage (kill -9): Ray Data restarts it and retries its batch,
and the restarted actor buys again only what was in flight at the kill."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa

from conftest import free_port
from proxykd import artifacts, teacher
from proxykd.config import TeacherConfig
from proxykd.local_teacher import Faults, LocalTeacher

PROMPTS = 384  # 6 batches of 64 (see `teacher.run`), 3 per actor
BATCH = 64
CONCURRENCY = 4


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # (the name in parentheses may hold spaces)
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _journal_holders(root: int, folder: Path) -> dict[int, Path]:
    """Processes under `root` (this test's raylet) with a journal of `folder` open: the
    TeacherCaller actors of this test's stage, and no other process on the machine."""
    tree, todo, found = _children(), [root], {}
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if target.parent == folder and target.name.startswith("journal-"):
                found[pid] = target
    return found


def _kill_mid_batch(folder: Path, raylet: int, done: threading.Event, out: dict) -> None:
    """SIGKILL the first actor seen between 16 and 40 answers into a batch of 64 (so that today's
    code would buy at least 16 answers again), and note what its journal held."""
    deadline, holders = time.time() + 60, {}
    while not done.is_set() and time.time() < deadline:
        if len(holders) < 2:  # (both actors found: no need to walk the process tree again)
            holders = _journal_holders(raylet, folder)
        for pid, journal in holders.items():
            try:
                lines = journal.read_bytes().count(b"\n")
            except OSError:
                continue
            if 16 <= lines % BATCH <= 40:
                os.kill(pid, signal.SIGKILL)
                out.update(pid=pid, journal=journal, lines=lines)
                return
        time.sleep(0.02)


def test_a_killed_actor_buys_again_only_its_calls_in_flight(tmp_path, monkeypatch, local_ray):
    import ray

    monkeypatch.setenv("PROXYKD_TEST_KEY", "sk-test")
    port = free_port()
    questions = [f"What is {i} + {i}?" for i in range(PROMPTS)]
    prompts = pa.table({"id": [f"p{i}" for i in range(PROMPTS)],
                        "messages": [[{"role": "user", "content": q}] for q in questions]})
    cfg = TeacherConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_env="PROXYKD_TEST_KEY", max_tokens=16,
                        max_retries=0, timeout_s=10, concurrency=CONCURRENCY, num_actors=2)
    run_dir = tmp_path / "run"
    folder = artifacts.stage_dir(str(run_dir), "teacher")
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed: dict = {}
    done = threading.Event()
    killer = threading.Thread(target=_kill_mid_batch, args=(folder, raylet, done, killed), daemon=True)
    # 0.1 s per answer: 2 actors x 4 in flight take about 5 s for the stage, the kill lands mid-stage.
    with LocalTeacher({q: f"The answer is {2 * i}." for i, q in enumerate(questions)}, port=port,
                      faults=Faults(latency_s=0.1)) as server:
        killer.start()
        try:
            m = teacher.run(cfg, prompts, "p", str(run_dir))
        finally:
            done.set()
            killer.join()
        received = dict(server.received)
        # Calls the server got whole: a request cut off by the kill before its body arrived (counted
        # by `request_count` on arrival) was never run, so never billable.
        requests = sum(received.values())

    assert killed, "no actor was caught mid-batch"
    assert not Path(f"/proc/{killed['pid']}").exists()
    assert set(received) == set(questions)  # every prompt asked
    duplicates = sum(c - 1 for c in received.values())
    # Only what was in flight at the kill is bought again; today's code bought the whole batch again.
    assert duplicates <= CONCURRENCY, (duplicates, killed)
    # The manifest counts every prompt answered exactly once.
    assert m["rows"]["ok"] == m["rows"]["samples_ok"] == PROMPTS and m["rows"]["failed"] == 0
    ok = teacher.responses(folder)
    assert ok.num_rows == PROMPTS and len(set(ok["request_key"].to_pylist())) == PROMPTS
    # Everything stored was bought by this run and is counted once in its totals; the requests
    # lost at the kill are the only ones the manifest could not see.
    assert m["tokens"]["this_run"] == m["tokens"]["all_stored"]
    assert m["requests"]["requests"] + duplicates == requests


def test_a_restarted_actor_skips_what_its_earlier_life_journaled(tmp_path, monkeypatch):
    """No Ray: the actor's class called directly, as a restart of actor "a1" whose journal holds
    an answer, a final answer, a billed attempt, a failure and a line cut short by the kill."""
    cfg = TeacherConfig(max_tokens=16, concurrency=4)
    questions = [f"question {i}" for i in range(5)]
    prompts = pa.table({"id": [f"p{i}" for i in range(5)],
                        "messages": [[{"role": "user", "content": q}] for q in questions]})
    keys = teacher.request_keys(cfg, prompts)
    todo, _, _ = teacher._todo(cfg, prompts, keys, set())

    def row(i, error=None, pt=3, ct=2):
        return json.dumps({"id": f"p{i}", "sample_index": 0, "messages": [{"role": "user", "content": questions[i]}],
                           "response": None if error else f"answer {i}", "finish_reason": "stop", "model": cfg.model,
                           "prompt_tokens": pt, "completion_tokens": ct, "request_key": keys[i], "error": error})

    lines = [row(0), row(1, teacher.FINAL + "finish_reason=length (cut off)", ct=16),
             row(2, teacher.BILLED_ATTEMPT + "timeout (counted at the worst case)", ct=16),
             row(3, "after 1 attempts: 500: boom", pt=0, ct=0), row(4)[:40]]
    (tmp_path / "journal-a1-0.jsonl").write_text("\n".join(lines))  # (the last line torn)
    (tmp_path / "journal-b2-0.jsonl").write_text(row(2) + "\n")  # another actor's: not read
    monkeypatch.setattr(teacher, "_actor_id", lambda: "a1")
    with LocalTeacher({q: f"answer {i}" for i, q in enumerate(questions)}) as server:
        out = teacher.TeacherCaller(server.base_url, cfg.model_dump(), None, None, str(tmp_path))(todo).to_pylist()
    assert dict(server.received) == {questions[2]: 1, questions[3]: 1, questions[4]: 1}
    assert [r["outcome"] for r in out] == ["ok", "rejected", "ok", "ok", "ok"]
    assert [r["requests"] for r in out] == [1, 1, 2, 1, 1]  # (the billed calls on record, plus this life's)
    assert [r["completion_tokens"] for r in out[:3]] == [2, 16, 16 + 2]
    assert len(list(tmp_path.glob("journal-a1-*.jsonl"))) == 2  # this life's journal beside the last one's
